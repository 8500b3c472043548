"""Build script: the Python package, the Triton kernels (``kernels/`` installed as ``reclmis.kernels``)
and the ``reclmis._C`` extension from ``csrc/`` (the weighted-masking op).

``reclmis._C`` is always built with the CPU kernel; the CUDA kernel joins it, for sm_86 (RTX 3090) and
sm_90 (H100/H200), when torch is a CUDA build and nvcc is found (CUDA_HOME). Ninja is used when installed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
# -ffp-contract=off: the CPU kernel must round like the CUDA one, which the shared core pins to one rounding
# per operation; a fused multiply-add would change the random keys (csrc/weighted_mask_core.h).
CXX_FLAGS = ["-O3", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "-gencode", "arch=compute_86,code=sm_86", "-gencode", "arch=compute_90,code=sm_90"]


def _cuda_toolkit() -> str | None:
    """Why the CUDA kernel cannot be built, or None when a CUDA torch and nvcc are both present."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    return None


def _openmp_flags() -> list[str]:
    """-fopenmp when torch parallelises with OpenMP: at::parallel_for is then inline OpenMP code, serial in
    an extension built without the flag."""
    import torch

    return ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []


def _extensions() -> tuple[list, dict]:
    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp") if not p.stem.endswith("_cuda"))
    if not cpu_sources:
        return [], {}
    from torch.utils.cpp_extension import (
        BuildExtension,
        CppExtension,
        CUDAExtension,
        get_cxx_compiler,
        is_ninja_available,
    )

    class BuildReclmisExtension(BuildExtension):
        """torch's BuildExtension, failing with a plain message when the C++ compiler is missing."""

        def build_extensions(self) -> None:
            compiler = get_cxx_compiler()
            if shutil.which(compiler) is None:
                sys.exit(
                    f"error: building reclmis._C needs a C++ compiler, and `{compiler}` (the CXX environment "
                    "variable, or the platform default) is not on PATH. Install one (e.g. `apt-get install g++`) "
                    "or point CXX at it."
                )
            super().build_extensions()

    no_cuda = _cuda_toolkit()
    openmp = _openmp_flags()
    common = {"include_dirs": [str(CSRC)], "extra_link_args": openmp}
    if no_cuda is None:
        cuda_sources = sorted(
            str(p.relative_to(ROOT)) for p in [*CSRC.glob("*_cuda.cpp"), *CSRC.glob("*.cu")]
        )
        ext = CUDAExtension(
            "reclmis._C",
            cpu_sources + cuda_sources,
            extra_compile_args={"cxx": CXX_FLAGS + openmp, "nvcc": NVCC_FLAGS},
            **common,
        )
    else:
        print(f"reclmis._C: building the CPU kernel only; {no_cuda}", file=sys.stderr)
        ext = CppExtension("reclmis._C", cpu_sources, extra_compile_args=CXX_FLAGS + openmp, **common)
    return [ext], {"build_ext": BuildReclmisExtension.with_options(use_ninja=is_ninja_available())}


ext_modules, cmdclass = _extensions()

setup(
    packages=[*find_packages(include=["reclmis", "reclmis.*"]), "reclmis.kernels"],
    package_dir={"reclmis.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
