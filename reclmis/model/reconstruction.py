"""Conditioned reconstruction Psi (paper section III-C, Eq. 7 and 9), with the official code's structure.

CVR reconstructs the masked visual tokens from the text, conditioned on W_woi (Eq. 7):
    V_hat = Psi(V_m, E, W_woi)
CLR reconstructs the masked text tokens from the image, conditioned on W_poi (Eq. 9):
    E_hat = Psi(E_m, V, W_poi)

Psi has two stacks of post-LayerNorm layers (the official ``DualTransformer``):

- the *memory* stack encodes the condition source S (E for CVR, V for CLR): self-attention over S whose
  keys are weighted by S's own W, then a feed-forward network of twice the width;
- the *reconstruction* stack rebuilds the masked tokens X_m: self-attention over X_m, cross-attention to
  the memory under the same W, then the feed-forward network.

Both attentions under W are ``reclmis.ops.conditioned_attention``. The official layers are decoder layers
in both stacks, so each memory layer also holds cross-attention weights that never run (8.4M parameters
at 4+4 layers); they are not created here. With ``causal`` the self-attentions get the official code's
causal mask (position i attends to positions <= i); the fused kernels have no per-query mask, so that
ablation runs the op's PyTorch reference with ``causal=True``. Psi runs in training only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reclmis.ops import conditioned_attention, conditioned_attention_reference


class ConditionedAttention(nn.Module):
    """Multi-head attention of queries x (B, Nq, C) over keys/values y (B, Nk, C) whose keys are weighted by
    a per-key condition W (B, Nk): self-attention when y is x, cross-attention otherwise."""

    def __init__(self, width: int, heads: int, mode: str, backend: str = "auto") -> None:
        super().__init__()
        self.heads = heads
        self.mode = mode
        self.backend = backend
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        cond: torch.Tensor,
        y_valid: torch.Tensor | None,
        causal: bool = False,
    ) -> torch.Tensor:
        b, nq, c = x.shape
        nk, d = y.shape[1], c // self.heads
        q = self.q_proj(x).view(b, nq, self.heads, d).transpose(1, 2)  # (B, H, Nq, D)
        k, v = self.kv_proj(y).view(b, nk, 2, self.heads, d).permute(2, 0, 3, 1, 4)  # 2 x (B, H, Nk, D)
        if causal:
            out = conditioned_attention_reference(q, k, v, cond, y_valid, mode=self.mode, causal=True)
        else:
            out = conditioned_attention(q, k, v, cond, y_valid, mode=self.mode, backend=self.backend)
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, c))


def feed_forward(width: int) -> nn.Sequential:
    """The official FFN: Linear(C, 2C) - ReLU - Linear(2C, C)."""
    return nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(inplace=True), nn.Linear(2 * width, width))


class MemoryLayer(nn.Module):
    """Memory stack layer: S <- LN(S + SelfAttn_W(S)); S <- LN(S + FFN(S)); dropout on each branch."""

    def __init__(self, width: int, heads: int, dropout: float, mode: str, backend: str) -> None:
        super().__init__()
        self.self_attention = ConditionedAttention(width, heads, mode, backend)
        self.ffn = feed_forward(width)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.dropout = dropout

    def forward(
        self, s: torch.Tensor, cond: torch.Tensor, s_valid: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        h = self.self_attention(s, s, cond, s_valid, causal)
        s = self.norm1(s + F.dropout(h, self.dropout, self.training))
        return self.norm2(s + F.dropout(self.ffn(s), self.dropout, self.training))


class ReconstructionLayer(nn.Module):
    """Reconstruction stack layer: X <- LN(X + SelfAttn(X)); X <- LN(X + CrossAttn_W(X, memory));
    X <- LN(X + FFN(X)); dropout on each branch."""

    def __init__(self, width: int, heads: int, dropout: float, mode: str, backend: str) -> None:
        super().__init__()
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attention = ConditionedAttention(width, heads, mode, backend)
        self.ffn = feed_forward(width)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.norm3 = nn.LayerNorm(width)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        x_valid: torch.Tensor | None,
        memory: torch.Tensor,
        cond: torch.Tensor,
        memory_valid: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        padding = None if x_valid is None else ~x_valid
        future = None
        if causal:
            future = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        h = self.self_attention(x, x, x, key_padding_mask=padding, attn_mask=future, need_weights=False)[0]
        x = self.norm1(x + F.dropout(h, self.dropout, self.training))
        h = self.cross_attention(x, memory, cond, memory_valid)
        x = self.norm2(x + F.dropout(h, self.dropout, self.training))
        return self.norm3(x + F.dropout(self.ffn(x), self.dropout, self.training))


class ConditionedReconstructor(nn.Module):
    """Psi(X_m, S, W): rebuilds the masked tokens X_m (B, T, C) from the condition source S (B, Nk, C),
    which the memory stack first encodes under W (B, Nk), a distribution over S's valid tokens."""

    def __init__(
        self,
        width: int,
        memory_layers: int,
        layers: int,
        heads: int,
        dropout: float,
        mode: str,
        backend: str = "auto",
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.causal = causal
        self.memory = nn.ModuleList(
            MemoryLayer(width, heads, dropout, mode, backend) for _ in range(memory_layers)
        )
        self.layers = nn.ModuleList(
            ReconstructionLayer(width, heads, dropout, mode, backend) for _ in range(layers)
        )

    def encode(
        self, source: torch.Tensor, cond: torch.Tensor, source_valid: torch.Tensor | None
    ) -> torch.Tensor:
        """The memory (B, Nk, C): the condition source after the memory stack."""
        for layer in self.memory:
            source = layer(source, cond, source_valid, self.causal)
        return source

    def forward(
        self,
        masked: torch.Tensor,
        masked_valid: torch.Tensor | None,
        source: torch.Tensor,
        cond: torch.Tensor,
        source_valid: torch.Tensor | None,
    ) -> torch.Tensor:
        memory = self.encode(source, cond, source_valid)
        x = masked
        for layer in self.layers:
            x = layer(x, masked_valid, memory, cond, source_valid, self.causal)
        return x
