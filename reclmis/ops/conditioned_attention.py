"""Conditioned cross-attention (paper Eq. 7 and 9; DESIGN section 3.1).

The condition ``cond`` (B, Nk) weights every key of a sample, shared by all heads and queries:
W_woi (words of interest) when visual tokens query the text in the CVR, W_poi (patches of interest) when
text tokens query the image in the CLR.

    mode "scale"    (Eq. 7):       A = softmax(q k^T / sqrt(D) * cond)
    mode "reweight" (official):    A = softmax(q k^T / sqrt(D) + log(cond + 1e-10))
                                     = renormalise(softmax(q k^T / sqrt(D)) * (cond + 1e-10))
    out = A v
"""

from __future__ import annotations

import torch

from reclmis.ops._checks import check_dim, check_same_device, check_tensor, resolve_triton_backend

MODES = ("scale", "reweight")
HEAD_DIMS = (16, 32, 64, 128, 256)
REWEIGHT_EPS = 1e-10


def conditioned_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cond: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    *,
    mode: str = "scale",
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Plain PyTorch oracle, computed in fp32: materialises the (B, H, Nq, Nk) probabilities.

    ``causal`` (the official reconstructors' self-attention, Nq = Nk): query i attends to keys j <= i only.
    The fused kernels have no per-query mask, so this form exists in the reference alone.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    c = cond.float()[:, None, None, :]  # (B, 1, 1, Nk)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    logits = logits * c if mode == "scale" else logits + torch.log(c + REWEIGHT_EPS)
    valid = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        past = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()[None, None]
        valid = past if valid is None else valid & past
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
        # A row with no valid key attends to nothing: zero output, zero gradients, never NaN.
        has_key = valid.any(-1, keepdim=True)
        probs = torch.softmax(logits.masked_fill(~has_key, 0.0), dim=-1) * has_key
    else:
        probs = torch.softmax(logits, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.float()).to(q.dtype)


def _validate(q, k, v, cond, key_padding_mask, mode, scale) -> None:
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    check_tensor("cond", cond, 2)
    b, h, _, d = q.shape
    nk = k.shape[2]
    for name, t in (("k", k), ("v", v)):
        check_dim(name, t, 0, b, "batch of q")
        check_dim(name, t, 1, h, "heads of q")
        check_dim(name, t, 3, d, "head dim of q")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
    check_dim("v", v, 2, nk, "keys of k")
    check_dim("cond", cond, 0, b, "batch of q")
    check_dim("cond", cond, 1, nk, "keys of k")
    if q.shape[2] < 1 or nk < 1:
        raise ValueError(
            f"q and k need at least one query and one key, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if d not in HEAD_DIMS:
        raise ValueError(f"q has head dim {d} (shape {tuple(q.shape)}); supported head dims are {HEAD_DIMS}")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, 2, (torch.bool,))
        check_dim("key_padding_mask", key_padding_mask, 0, b, "batch of q")
        check_dim("key_padding_mask", key_padding_mask, 1, nk, "keys of k")
    check_same_device("q", q, k=k, v=v, cond=cond, key_padding_mask=key_padding_mask)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")


def conditioned_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cond: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    *,
    mode: str = "scale",
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of q (B,H,Nq,D) over k, v (B,H,Nk,D) with per-key condition cond (B,Nk) >= 0.

    key_padding_mask (B,Nk) bool marks valid keys (True). Returns (B,H,Nq,D) in q's dtype; softmax
    statistics are fp32. A query row with no valid key returns zeros. Differentiable in q, k, v, cond.
    ``backend``: "auto" (Triton on CUDA, reference elsewhere), "reference" or "triton". The Triton path
    runs the torch.library ops ``torch.ops.reclmis.conditioned_attention_fwd`` / ``_bwd`` (traceable by
    torch.compile with fullgraph=True, capturable in CUDA graphs); it computes the dot products of fp32
    inputs in TF32 on the GPU (about 1e-3 relative error; "reference" keeps full fp32 products).
    """
    _validate(q, k, v, cond, key_padding_mask, mode, scale)
    if resolve_triton_backend(backend, q.device, "conditioned_attention") == "reference":
        return conditioned_attention_reference(q, k, v, cond, key_padding_mask, mode=mode, scale=scale)
    from reclmis.kernels.conditioned_attention import conditioned_attention_triton

    return conditioned_attention_triton(q, k, v, cond, key_padding_mask, mode=mode, scale=scale)
