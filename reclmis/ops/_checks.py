"""Input validation shared by the public ops: every error names the offending argument and its shape."""

from __future__ import annotations

import torch

from reclmis.kernels import _runtime

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t: object, ndim: int, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {t.dtype} (shape {tuple(t.shape)})")


def check_dim(name: str, t: torch.Tensor, dim: int, expected: int, meaning: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name} has size {t.shape[dim]} in dimension {dim} (shape {tuple(t.shape)}), "
            f"expected {expected} ({meaning})"
        )


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def checks_values(t: torch.Tensor) -> bool:
    """Whether the ops read input values back to the host to check them here: in eager mode, not while
    torch.compile traces the op or a CUDA graph captures work on t's device, where a host read would break
    the graph or the capture. The rule of every op: value errors in eager mode, never a host sync in a
    compiled or captured step."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_finite_nonnegative(name: str, t: torch.Tensor, valid: torch.Tensor | None = None) -> None:
    """A ValueError naming ``name`` and the first entry of the 2-D ``t`` (where ``valid``) that is negative,
    NaN or infinite. Reads ``t`` on the host (one synchronisation for CUDA tensors): call it where
    ``checks_values``."""
    bad = ~(torch.isfinite(t) & (t >= 0))
    if valid is not None:
        bad &= valid
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} must be finite and >= 0; row {row} holds {t[row, col].item()} at column {col}"
        )


def check_backend(backend: str, allowed: tuple[str, ...]) -> None:
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")


def resolve_triton_backend(backend: str, op: str, name: str, t: torch.Tensor) -> str:
    """Map ``backend`` to "reference" or "triton" for the op's input ``t`` (argument ``name``), whose device
    and dtype the kernels' dot products take.

    "auto" picks the fused kernel for CUDA tensors when Triton is installed and can compute t's dtype, and
    the reference elsewhere. "triton" on CPU tensors runs in Triton's interpreter only (how CI tests
    kernels), which has no bfloat16: its dots would return garbage, so that is an error.
    """
    check_backend(backend, ("auto", "reference", "triton"))
    if backend == "auto":
        if t.device.type != "cuda" or not _runtime.triton_available():
            return "reference"
        return "reference" if t.dtype == torch.bfloat16 and _runtime.interpreting() else "triton"
    if backend == "triton":
        if not _runtime.triton_available():
            raise RuntimeError(f"{op}(backend='triton') needs the triton package, which is not installed")
        _runtime.check_device(t.device, op)
        if t.dtype == torch.bfloat16 and _runtime.interpreting():
            raise TypeError(
                f"{op}(backend='triton') cannot compute {name} of dtype {t.dtype} in Triton's interpreter "
                "(TRITON_INTERPRET=1), which has no bfloat16: use backend='reference' or float16/float32 "
                "here, or the compiled kernels on a GPU"
            )
    return backend
