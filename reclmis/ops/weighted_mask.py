"""Weighted masking (paper section III-C; DESIGN section 3.3).

Per row b with valid prefix length len_b, k_b = max(1, floor(ratio * len_b)) (0 when len_b = 0) distinct
valid positions are drawn by successive sampling without replacement with probability proportional to
weight (the law of numpy.random.choice(replace=False, p=w / w.sum())). When fewer than k_b valid
positions have positive weight, all of them are taken and the rest is drawn uniformly from the
zero-weight valid positions. The drawn positions of x are zeroed:

    x_masked = x * (1 - mask)[..., None]

The reference draws the sample by Gumbel-top-k: the k largest keys log(w_t) + G_t, G_t ~ Gumbel(0, 1),
are a successive sample without replacement proportional to w.
"""

from __future__ import annotations

import math

import torch

from reclmis.ops._checks import check_dim, check_same_device, check_tensor

_ZERO_WEIGHT_OFFSET = 1.0e4  # below any log(w) + G with w > 0 (log of the smallest double is -745)


def mask_counts(lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    """k_b = max(1, floor(ratio * len_b)), 0 for empty rows; computed in float64 like the official code."""
    k = torch.floor(lengths.to(torch.float64) * ratio).to(torch.int64).clamp_min(1)
    return torch.where(lengths > 0, k, torch.zeros_like(k))


def draw_seed(seed: int | None) -> int:
    """The seed itself, or one drawn from torch's default CPU generator (so torch.manual_seed governs)."""
    if seed is not None:
        return int(seed)
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def weighted_mask_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    ratio: float,
    lengths: torch.Tensor | None = None,
    *,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-top-k oracle with the same law as the extension (not the same random stream)."""
    b, t = weight.shape
    positions = torch.arange(t, device=x.device)
    lengths = torch.full((b,), t, device=x.device) if lengths is None else lengths.to(x.device)
    valid = positions[None, :] < lengths[:, None]
    generator = torch.Generator(device=x.device).manual_seed(draw_seed(seed))
    uniform = torch.rand((b, t), generator=generator, device=x.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float64).tiny)))
    w = weight.to(torch.float64)
    keys = torch.where(w > 0, torch.log(w) + gumbel, gumbel - _ZERO_WEIGHT_OFFSET)
    keys = keys.masked_fill(~valid, float("-inf"))
    order = keys.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, positions.expand(b, t).contiguous())
    mask = rank < mask_counts(lengths, ratio)[:, None]
    return x * (~mask)[..., None].to(x.dtype), mask


def _validate(x, weight, ratio, lengths) -> None:
    check_tensor("x", x, 3, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    check_tensor("weight", weight, 2, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    check_dim("weight", weight, 0, x.shape[0], "batch of x")
    check_dim("weight", weight, 1, x.shape[1], "tokens of x")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise TypeError(f"ratio must be a finite float in [0, 1], got {ratio!r}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if lengths is not None:
        check_tensor("lengths", lengths, 1, (torch.int32, torch.int64))
        check_dim("lengths", lengths, 0, x.shape[0], "batch of x")
    check_same_device("x", x, weight=weight, lengths=lengths)


def _validate_values(weight: torch.Tensor, lengths: torch.Tensor | None) -> None:
    """Value checks that read the data (one host sync); the reference always runs them."""
    t = weight.shape[1]
    if lengths is not None and bool(((lengths < 0) | (lengths > t)).any()):
        bad = lengths[(lengths < 0) | (lengths > t)][0].item()
        raise ValueError(f"lengths must lie in [0, {t}] (tokens of x), found {bad}")
    finite_nonneg = torch.isfinite(weight) & (weight >= 0)
    if not bool(finite_nonneg.all()):
        row = int((~finite_nonneg).any(1).nonzero()[0, 0])
        raise ValueError(f"weight must be finite and >= 0; row {row} holds a negative, NaN or infinite value")


def weighted_mask(
    x: torch.Tensor,
    weight: torch.Tensor,
    ratio: float,
    lengths: torch.Tensor | None = None,
    *,
    seed: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero k = max(1, floor(ratio*len)) valid tokens of x (B,T,C) per row, drawn by weight (B,T) >= 0.

    Returns (x_masked, mask) with mask (B,T) bool, True = masked; the gradient flows to x at unmasked
    positions only. ``seed=None`` draws a seed from torch's default generator. ``backend``: "auto",
    "reference" or "extension" (the compiled reclmis._C op).
    """
    _validate(x, weight, ratio, lengths)
    if backend not in ("auto", "reference", "extension"):
        raise ValueError(f"backend must be one of ('auto', 'reference', 'extension'), got {backend!r}")
    if backend == "extension":
        raise RuntimeError(
            "weighted_mask(backend='extension') needs the compiled reclmis._C op, which arrives with the "
            "C++/CUDA extension issue; use backend='reference'"
        )
    _validate_values(weight, lengths)
    return weighted_mask_reference(x, weight, ratio, lengths, seed=seed)
