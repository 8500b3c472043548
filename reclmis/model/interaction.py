"""Conditioned Interaction (paper section III-B) and the heads that score patches and words of interest.

W_poi (patches-of-interest weights, B x N) says how much each visual token matters to the note;
W_woi (words-of-interest weights, B x L) says how much each word matters to the image. Both are
distributions: W_poi sums to 1 over the N patches, W_woi over the valid tokens of each note.
"""

from __future__ import annotations

import torch
from torch import nn

from reclmis.config import INJECTIONS


def masked_conv1d(conv: nn.Conv1d, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Conv1d over tokens x (B, L, C) that sees padded positions as zeros, like the sequence border."""
    x = x * mask[..., None].to(x.dtype)
    return conv(x.transpose(1, 2)).transpose(1, 2)


class MaskedBatchNorm1d(nn.Module):
    """BatchNorm over the valid tokens of x (B, L, C): statistics from masked sums, not from gathering the
    valid tokens, so the step needs no host synchronisation. Padded positions come out as zeros. Its state
    dict is nn.BatchNorm1d's; ``sync_batchnorm`` leaves it per process (it normalises a handful of words)."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        valid = mask[..., None].float()  # (B, L, 1); statistics in fp32 whatever the autocast dtype
        xf = x.float()
        if self.training:
            count = valid.sum().clamp_min(1)
            mean = (xf * valid).sum((0, 1)) / count
            var = ((xf - mean).pow(2) * valid).sum((0, 1)) / count
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * count / (count - 1).clamp_min(1), self.momentum)
                self.num_batches_tracked.add_(1)
        else:
            mean, var = self.running_mean, self.running_var
        return (((xf - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias) * valid).to(x.dtype)


class MaskedConvBNReLU(nn.Module):
    """Conv1d (kernel 3) -> BN -> ReLU over the valid tokens only; padded positions come out as zeros."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size=3, padding=1)
        self.norm = MaskedBatchNorm1d(channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(masked_conv1d(self.conv, x, mask), mask))


class ConditionedInteraction(nn.Module):
    """Conditioned Interaction (CI) and the way the note enters the segmentation path.

    From the stage-4 tokens V4 (B, N, C) and the projected note E (B, L, C):

        V  = dropout(patch_embedding(V4) + position embedding)
        E' = E + MHA(query=E, key/value=V), then Conv1d-BN-ReLU over the valid words
        A  = MHA(query=V, key/value=E')           what the note says to each patch
        V' = V + A                                CI's visual output, which W_poi reads

    ``injection`` chooses the decoder's input D:

    - "gated":    D = V4 + tanh(s * alpha) * A, with a gate alpha (C,) per channel initialised at 0 and
      ``gate_speed`` s (Adam moves alpha by about the learning rate per step: s scales how fast). At
      initialisation the decoder receives the stage-4 features exactly as the image-only network does, and
      training opens the note's path (Flamingo's tanh-gated cross-attention);
    - "zero_init": D = V4 + Z(A), Z a linear map of the channels initialised at zero (ControlNet's zero
      convolution): the image-only network at initialisation too, but the first step already gives Z a
      gradient along every direction of A, so the path opens within steps rather than epochs;
    - "residual": D = V';
    - "official": no residual sums, as the official module: E' = MHA(E, V), D = V' = A.

    With ``note_gate`` the note also scales the visual tokens in the residual form: V' = g * V + A,
    g = 2 sigmoid(Linear(A)) per patch and channel, the Linear zero-initialised so that g starts at 1. With
    ``norm`` each attention's output is layer-normalised before its sum (E' = E + LN(MHA(E, V)), A = LN(...)),
    which bounds what the note adds whatever scale the attention weights drift to.

    Returns (V', D, E'): V' and E' (B, N, C) and (B, L, C), D (B, C, g, g) in V4's layout.
    """

    def __init__(
        self,
        width: int,
        num_patches: int,
        heads: int,
        dropout: float = 0.1,
        injection: str = "gated",
        note_gate: bool = False,
        norm: bool = False,
        gate_speed: float = 1.0,
    ) -> None:
        super().__init__()
        if injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {INJECTIONS}, got {injection!r}")
        if note_gate and injection != "residual":
            raise ValueError("the note gate scales the residual visual tokens: it needs injection='residual'")
        self.injection = injection
        self.alpha = nn.Parameter(torch.zeros(width)) if injection == "gated" else None
        self.gate_speed = gate_speed
        self.zero_projection = nn.Linear(width, width) if injection == "zero_init" else None
        if self.zero_projection is not None:
            nn.init.zeros_(self.zero_projection.weight)
            nn.init.zeros_(self.zero_projection.bias)
        self.note_gate = nn.Linear(width, width) if note_gate else None
        if self.note_gate is not None:
            nn.init.zeros_(self.note_gate.weight)
            nn.init.zeros_(self.note_gate.bias)
        self.text_norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.image_norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.patch_embedding = nn.Conv2d(width, width, kernel_size=1)
        self.position_embedding = nn.Parameter(torch.zeros(1, num_patches, width))
        self.dropout = nn.Dropout(dropout)
        self.text_attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.image_attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.text_refine = MaskedConvBNReLU(width)

    def forward(
        self, stage4: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # stage4 (B, C, g, g); text (B, L, C); text_mask (B, L) bool
        v = self.patch_embedding(stage4).flatten(2).transpose(1, 2)  # (B, N, C)
        v = self.dropout(v + self.position_embedding)
        e = self.text_norm(self.text_attention(text, v, v, need_weights=False)[0])  # (B, L, C)
        if self.injection != "official":
            e = e + text
        attended = self.image_attention(v, e, e, key_padding_mask=~text_mask, need_weights=False)[0]
        attended = self.image_norm(attended)  # A (B, N, C)
        if self.note_gate is not None:
            v = 2 * torch.sigmoid(self.note_gate(attended)) * v
        v = attended if self.injection == "official" else v + attended
        if self.alpha is not None:
            note = attended.transpose(1, 2).reshape(stage4.shape)
            decoder_input = stage4 + torch.tanh(self.gate_speed * self.alpha)[:, None, None] * note
        elif self.zero_projection is not None:
            note = self.zero_projection(attended).transpose(1, 2).reshape(stage4.shape)
            decoder_input = stage4 + note
        else:
            decoder_input = v.transpose(1, 2).reshape(stage4.shape)
        return v, decoder_input, self.text_refine(e, text_mask)


class InterestWeights(nn.Module):
    """softmax over valid tokens of MLP(dropout(x)): Linear-ReLU-Linear(1). Gives W_poi from V', W_woi
    from E'. The dropout (training only) is the official MosMedData+ and MoNuSeg configuration's (0.5).

    The last layer has no bias: the softmax is invariant to it, so it would never receive a gradient.
    """

    def __init__(self, width: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, 1, bias=False)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.mlp(self.dropout(x)).squeeze(-1).float()  # (B, T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)
