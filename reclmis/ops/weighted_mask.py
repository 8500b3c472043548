"""Weighted masking (paper section III-C; DESIGN section 3.3).

Per row b with valid prefix length len_b, k_b = max(1, floor(ratio * len_b)) (0 when len_b = 0) distinct
valid positions are drawn by successive sampling without replacement with probability proportional to
weight (the law of numpy.random.choice(replace=False, p=w / w.sum())). When fewer than k_b valid
positions have positive weight, all of them are taken and the rest is drawn uniformly from the
zero-weight valid positions. The drawn positions of x are zeroed:

    x_masked = x * (1 - mask)[..., None]

The reference draws the sample by Gumbel-top-k: the k largest keys log(w_t) + G_t, G_t ~ Gumbel(0, 1),
are a successive sample without replacement proportional to w. The compiled op
``torch.ops.reclmis.weighted_mask`` (``csrc/``, loaded from ``reclmis._C`` when it is built) draws the
same law by an exponential race, E_t / w_t with E_t = -log(U_t) and U_t from a Philox counter keyed by
(seed, row, position), so that its CPU and CUDA kernels give the same mask for the same seed.

The op takes its seed as a one-element int64 tensor on x's device, which the kernels read from memory.
``seed=None`` draws it there with ``torch.randint`` from torch's generator for that device: no host sync, no
graph break under torch.compile, and a fresh seed at every replay of a CUDA graph (an int seed would be
baked into the captured graph and replay one mask at every step).
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import torch

from reclmis.ops._checks import (
    check_backend,
    check_dim,
    check_finite_nonnegative,
    check_same_device,
    check_tensor,
    checks_values,
)

_ZERO_WEIGHT_OFFSET = 1.0e4  # below any log(w) + G with w > 0 (log of the smallest double is -745)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CHECK_WEIGHTS_ENV = "RECLMIS_CHECK_WEIGHTS"

try:
    from reclmis import _C  # noqa: F401  (loading the library registers torch.ops.reclmis.weighted_mask)
except ImportError as error:
    _EXTENSION_ERROR: ImportError | None = error
else:
    _EXTENSION_ERROR = None
# A CPU-only build of reclmis._C (no usable CUDA toolkit at install time) has no kernel for CUDA tensors.
_EXTENSION_HAS_CUDA = _EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "reclmis::weighted_mask", "CUDA"
)
_NO_CUDA_KERNEL = (
    "reclmis._C was built without its CUDA kernel (see `reclmis info` for why); set CUDA_HOME to a CUDA "
    "toolkit matching torch's CUDA version and reinstall (`pip install -e . --no-build-isolation`)"
)


def extension_available() -> bool:
    """Whether the compiled op (reclmis._C) is built and loaded."""
    return _EXTENSION_ERROR is None


def mask_counts(lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    """k_b = max(1, floor(ratio * len_b)), 0 for empty rows; computed in float64 like the official code."""
    k = torch.floor(lengths.to(torch.float64) * ratio).to(torch.int64).clamp_min(1)
    return torch.where(lengths > 0, k, torch.zeros_like(k))


def seed_tensor(seed: int | None, device: torch.device) -> torch.Tensor:
    """The op's seed, a 0-dim int64 tensor on ``device``: ``seed`` itself (its 64 bits, filled on the device,
    no host-to-device copy), or one drawn there from torch's default generator of that device, so that
    torch.manual_seed governs it and a captured CUDA graph draws a new one at every replay."""
    if seed is None:
        return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)
    return torch.full((), _as_int64(int(seed)), dtype=torch.int64, device=device)


def _valid_positions(weight: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    positions = torch.arange(weight.shape[1], device=weight.device)
    if lengths is None:
        return torch.ones_like(weight, dtype=torch.bool)
    return positions[None, :] < lengths.to(weight.device)[:, None]


def weighted_mask_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    ratio: float,
    lengths: torch.Tensor | None = None,
    *,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-top-k oracle with the same law as the extension (not the same random stream).

    ``seed=None`` draws the uniforms from torch's default generator of x's device (traceable by
    torch.compile); an int seeds a private generator, which torch.compile does not trace (a graph break).
    Reads no data on the host: a length outside [0, T] is clamped and a negative, NaN or infinite weight
    counts as zero, as in the CUDA kernel (``weighted_mask`` checks both first, in eager mode).
    """
    b, t = weight.shape
    positions = torch.arange(t, device=x.device)
    lengths = torch.full((b,), t, device=x.device) if lengths is None else lengths.to(x.device).clamp(0, t)
    valid = positions[None, :] < lengths[:, None]
    generator = None if seed is None else torch.Generator(device=x.device).manual_seed(_as_int64(int(seed)))
    uniform = torch.rand((b, t), generator=generator, device=x.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float64).tiny)))
    w = weight.to(torch.float64)
    keys = torch.where((w > 0) & torch.isfinite(w), torch.log(w) + gumbel, gumbel - _ZERO_WEIGHT_OFFSET)
    keys = keys.masked_fill(~valid, float("-inf"))
    order = keys.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, positions.expand(b, t).contiguous())
    mask = rank < mask_counts(lengths, ratio)[:, None]
    return x * (~mask)[..., None].to(x.dtype), mask


def _validate(x, weight, ratio, lengths) -> None:
    """Checks that need no data: types, shapes, devices and the ratio."""
    check_tensor("x", x, 3, _FLOAT_DTYPES)
    check_tensor("weight", weight, 2, _FLOAT_DTYPES)
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


def _validate_lengths(lengths: torch.Tensor | None, tokens: int) -> None:
    """lengths in [0, T]: reads the data (one host sync for CUDA lengths)."""
    if lengths is None:
        return
    bad = (lengths < 0) | (lengths > tokens)
    if bool(bad.any()):
        raise ValueError(f"lengths must lie in [0, {tokens}] (tokens of x), found {lengths[bad][0].item()}")


def _validate_weights(weight: torch.Tensor, lengths: torch.Tensor | None) -> None:
    """Weights at valid positions finite and >= 0 (padded positions are never read); one host sync."""
    check_finite_nonnegative("weight", weight, _valid_positions(weight, lengths))


@functools.cache
def _warn_reference_on_cuda() -> None:
    """The fallback of backend="auto" for CUDA tensors without a CUDA kernel, said once per process."""
    warnings.warn(
        f"weighted_mask runs its PyTorch reference on CUDA tensors: {_NO_CUDA_KERNEL}", stacklevel=4
    )


def _use_extension(backend: str, device: torch.device) -> bool:
    check_backend(backend, ("auto", "reference", "extension"))
    if backend == "extension" and _EXTENSION_ERROR is not None:
        raise RuntimeError(
            "weighted_mask(backend='extension') needs the compiled op reclmis._C, which is not built or does "
            "not load (`pip install -e .` or `python setup.py build_ext --inplace` builds it): "
            f"{_EXTENSION_ERROR}"
        )
    if device.type == "cuda" and _EXTENSION_ERROR is None and not _EXTENSION_HAS_CUDA:
        if backend == "extension":
            raise RuntimeError(f"weighted_mask(backend='extension') got CUDA tensors, but {_NO_CUDA_KERNEL}")
        if backend == "auto":
            _warn_reference_on_cuda()
        return False
    return backend == "extension" or (backend == "auto" and _EXTENSION_ERROR is None)


def _as_int64(seed: int) -> int:
    """The seed's 64 bits as a signed int64, the op's argument type."""
    seed %= 2**64
    return seed - 2**64 if seed >= 2**63 else seed


def weighted_mask(
    x: torch.Tensor,
    weight: torch.Tensor,
    ratio: float,
    lengths: torch.Tensor | None = None,
    *,
    seed: int | None = None,
    backend: str = "auto",
    check_weights: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero k = max(1, floor(ratio*len)) valid tokens of x (B,T,C) per row, drawn by weight (B,T) >= 0.

    Returns (x_masked, mask) with mask (B,T) bool, True = masked; the gradient flows to x at unmasked
    positions only. ``lengths`` (B,) int holds the valid prefix lengths (None: all T positions).
    ``seed=None`` draws a seed on x's device from torch's default generator, so torch.manual_seed makes it
    reproducible; the step needs no host sync and stays one graph under torch.compile and CUDA graphs.

    ``backend``: "extension" runs the compiled op ``torch.ops.reclmis.weighted_mask`` (CPU and CUDA
    kernels; the same seed gives the same mask on both devices); "reference" the Gumbel-top-k oracle (the
    same law from another random stream); "auto" (default) uses the extension on CPU and CUDA whenever
    ``reclmis._C`` is importable, and falls back to the reference only if the extension is not built, or
    (with a warning, once) for CUDA tensors when it was built without its CUDA kernel.

    Errors: types, shapes, devices and ratio in [0, 1] are always checked. Lengths outside [0, T] and
    negative, NaN or infinite weights at valid positions (padding is never read) raise a ValueError in
    eager mode, the rule of every op: the CPU kernel checks them as it reads them, the CUDA kernel flags
    the rows on the device and the op reads the flags back (one host sync), the reference checks them on
    the host. While torch.compile traces the op or a CUDA graph captures it, no host sync is allowed: the
    CUDA kernel and the reference then clamp such a length to [0, T] and count such a weight as zero (the
    CPU kernel still raises, which costs no sync). ``check_weights`` overrides the CUDA kernel's check:
    False never syncs (not even in eager mode; the reference then skips its host checks too), True always
    reads the flags back (refused inside a CUDA graph capture); None (default) checks in eager mode only, or also inside compiled steps with the
    environment variable RECLMIS_CHECK_WEIGHTS=1, for debugging training runs.
    """
    _validate(x, weight, ratio, lengths)
    if not _use_extension(backend, x.device):
        if check_weights is not False and checks_values(x):
            _validate_lengths(lengths, x.shape[1])
            _validate_weights(weight, lengths)
        return weighted_mask_reference(x, weight, ratio, lengths, seed=seed)
    if check_weights is None:
        check_weights = checks_values(x) or os.environ.get(CHECK_WEIGHTS_ENV) == "1"
    return torch.ops.reclmis.weighted_mask(
        x, weight, float(ratio), lengths, seed_tensor(seed, x.device), bool(check_weights)
    )


def _weighted_mask_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    ratio: float,
    lengths: torch.Tensor | None,
    seed: torch.Tensor,
    check_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output metadata of the compiled op, for torch.compile and other fake-tensor tracing."""
    x_masked = torch.empty_like(x, memory_format=torch.contiguous_format)
    return x_masked, weight.new_empty(weight.shape, dtype=torch.bool)


def _setup_context(ctx, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_x: torch.Tensor, grad_mask: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradient to x only, zero at the masked positions; none to the weights (the draw is discrete)."""
    (mask,) = ctx.saved_tensors
    return grad_x.masked_fill(mask[..., None], 0), None, None, None, None, None


if _EXTENSION_ERROR is None:
    torch.library.register_fake("reclmis::weighted_mask", _weighted_mask_fake)
    torch.library.register_autograd("reclmis::weighted_mask", _backward, setup_context=_setup_context)
