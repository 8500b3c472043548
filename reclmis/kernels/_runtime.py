"""Where the Triton kernels run: compiled for the GPU, or in Triton's CPU interpreter (as in the tests).

Imports no triton at import time, so that ``reclmis.ops`` imports on machines without triton (macOS).
``triton.jit`` fixes a function's flavour when it decorates it, from TRITON_INTERPRET at that moment: Triton's
own library (``tl.sum``, ``tl.max``, ...) when triton is first imported, a kernel module's kernels when that
module is. Kernels run only with a library of their own flavour, so TRITON_INTERPRET=1 must be set before
anything imports triton (the test suite's conftest.py does).
"""

from __future__ import annotations

import functools

import torch

INTERPRETER_HINT = (
    "on CPU tensors the Triton kernels run only in Triton's interpreter, with TRITON_INTERPRET=1 set before "
    "triton is first imported (how the tests run them)"
)


@functools.cache
def triton_available() -> bool:
    """Whether the triton package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter here: the flavour of Triton's own library (importing
    triton when nothing has yet). False without triton."""
    if not triton_available():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def check_flavour(kernel: object, module: str) -> None:
    """Refuse a kernel module whose kernels took another flavour than Triton's library: TRITON_INTERPRET
    changed between the first import of triton and that of ``module``, and its kernels cannot run."""
    from triton.runtime.interpreter import InterpretedFunction

    ours = isinstance(kernel, InterpretedFunction)
    if ours != interpreting():
        raise ImportError(
            f"{module} was imported with TRITON_INTERPRET={int(ours)} but triton with "
            f"TRITON_INTERPRET={int(not ours)}: set it (or leave it unset) before triton is first imported"
        )


def check_device(device: torch.device, op: str) -> None:
    """The CPU guard: compiled kernels take CUDA tensors only."""
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"{op}(backend='triton') needs CUDA tensors, got {device} tensors: the Triton kernels are "
            f"compiled for the GPU here; {INTERPRETER_HINT}"
        )
