"""Conditioned reconstruction Psi (paper section III-C, Eq. 7 and 9).

CVR reconstructs the masked visual tokens from the text, conditioned on W_woi (Eq. 7):
    V_hat = Psi(V_m, E, W_woi)
CLR reconstructs the masked text tokens from the image, conditioned on W_poi (Eq. 9):
    E_hat = Psi(E_m, V, W_poi)
Psi is a stack of post-LayerNorm transformer decoder layers whose cross-attention is
``reclmis.ops.conditioned_attention``. Both run in training only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reclmis.ops import conditioned_attention


class ConditionedCrossAttention(nn.Module):
    """Multi-head cross-attention whose keys are weighted by a per-key condition (B, Nk)."""

    def __init__(self, width: int, heads: int, mode: str, backend: str = "auto") -> None:
        super().__init__()
        self.heads = heads
        self.mode = mode
        self.backend = backend
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, cond: torch.Tensor, memory_mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, nq, c = x.shape
        nk, d = memory.shape[1], c // self.heads
        q = self.q_proj(x).view(b, nq, self.heads, d).transpose(1, 2)  # (B, H, Nq, D)
        k, v = self.kv_proj(memory).view(b, nk, 2, self.heads, d).permute(2, 0, 3, 1, 4)  # 2 x (B, H, Nk, D)
        out = conditioned_attention(q, k, v, cond, memory_mask, mode=self.mode, backend=self.backend)
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, c))


class ReconstructorLayer(nn.Module):
    """Self-attention, conditioned cross-attention, FFN (2x width); post-LayerNorm, dropout on each branch."""

    def __init__(self, width: int, heads: int, dropout: float, mode: str, backend: str) -> None:
        super().__init__()
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attention = ConditionedCrossAttention(width, heads, mode, backend)
        self.ffn = nn.Sequential(
            nn.Linear(width, 2 * width), nn.ReLU(inplace=True), nn.Linear(2 * width, width)
        )
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.norm3 = nn.LayerNorm(width)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        x_mask: torch.Tensor | None,
        memory: torch.Tensor,
        cond: torch.Tensor,
        memory_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        padding = None if x_mask is None else ~x_mask
        h = self.self_attention(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        x = self.norm1(x + F.dropout(h, self.dropout, self.training))
        h = self.cross_attention(x, memory, cond, memory_mask)
        x = self.norm2(x + F.dropout(h, self.dropout, self.training))
        return self.norm3(x + F.dropout(self.ffn(x), self.dropout, self.training))


class ConditionedReconstructor(nn.Module):
    """Psi(X_m, M, W): reconstructs the masked tokens X_m (B, T, C) from the other modality's tokens
    M (B, Nk, C), attending to them under the condition W (B, Nk)."""

    def __init__(
        self, width: int, layers: int, heads: int, dropout: float, mode: str, backend: str = "auto"
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            ReconstructorLayer(width, heads, dropout, mode, backend) for _ in range(layers)
        )

    def forward(
        self,
        masked: torch.Tensor,
        masked_valid: torch.Tensor | None,
        memory: torch.Tensor,
        cond: torch.Tensor,
        memory_valid: torch.Tensor | None,
    ) -> torch.Tensor:
        x = masked
        for layer in self.layers:
            x = layer(x, masked_valid, memory, cond, memory_valid)
        return x
