"""Test session set-up.

Without a CUDA device the Triton kernels run under Triton's CPU interpreter (DESIGN section 4). Triton reads
TRITON_INTERPRET when it is first imported, and several libraries import it, so the flag is set here, before
any test module is collected. On a CUDA machine the kernels compile as usual (`pytest -m gpu`). Triton 3.6's
interpreter needs numpy<2.4: with a newer numpy the session stops at once, saying so, rather than failing
every kernel test with numpy's "only 0-dimensional arrays can be converted to Python scalars".
"""

import importlib.metadata
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from reclmis.info import interpreter_problem

    try:
        triton, numpy = (importlib.metadata.version(name) for name in ("triton", "numpy"))
    except importlib.metadata.PackageNotFoundError:  # no Triton: the kernel tests skip, saying so
        return
    problem = interpreter_problem(triton, numpy)
    if problem is not None:
        raise pytest.UsageError(problem)
