"""Build script: the Python package (its Triton kernels in ``reclmis/kernels``) and the ``reclmis._C``
extension from ``csrc/`` (the weighted-masking op).

``reclmis._C`` is always built with the CPU kernel. The CUDA kernel joins it, for sm_86 (RTX 3090) and
sm_90 (H100/H200) or the architectures in TORCH_CUDA_ARCH_LIST, when torch is a CUDA build and a usable
CUDA toolkit is found (``reclmis/cuda_toolkit.py``: CUDA_HOME, else the nvcc on PATH followed through
symlinks and wrapper scripts, else /usr/local/cuda). The CUDA part is optional and never fails the install:
without a usable toolkit, or when its build fails, the CPU kernel alone is built and one line says why and
how to get the CUDA kernel (pip shows it with -v; `reclmis info` reports the toolkit search afterwards).
Ninja is used when installed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
# -ffp-contract=off: the CPU kernel must round like the CUDA one, which the shared core pins to one rounding
# per operation; a fused multiply-add would change the random keys (csrc/weighted_mask_core.h).
CXX_FLAGS = ["-O3", "-ffp-contract=off"]
NVCC_ARCH_FLAGS = ["-gencode", "arch=compute_86,code=sm_86", "-gencode", "arch=compute_90,code=sm_90"]
# What a failed CUDA build takes from the CPU-only extension before building again. The include folders stay,
# so that the C++ object compiled in the failed attempt has the same command line and is reused.
FALLBACK_ATTRIBUTES = ("sources", "library_dirs", "libraries", "extra_compile_args")


def _load_cuda_toolkit_module():
    """reclmis/cuda_toolkit.py by path: importing the package would need its dependencies, not yet installed."""
    spec = importlib.util.spec_from_file_location(
        "_reclmis_cuda_toolkit", ROOT / "reclmis" / "cuda_toolkit.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _say(message: str) -> None:
    print(f"reclmis._C: {message}", file=sys.stderr)


def _cuda_home() -> str | None:
    """The toolkit to build the CUDA kernel with, or None after saying why not and how to get it."""
    import torch

    search = _load_cuda_toolkit_module().find_toolkit(torch.version.cuda, torch.__version__)
    if search.toolkit is None:
        _say(f"building the CPU kernel only: {search.reason}")
        return None
    return str(search.toolkit.home)


def _nvcc_flags() -> list[str]:
    """-O3 and the default architectures, which TORCH_CUDA_ARCH_LIST replaces (torch's convention)."""
    return ["-O3"] if os.environ.get("TORCH_CUDA_ARCH_LIST") else ["-O3", *NVCC_ARCH_FLAGS]


def _openmp_flags() -> list[str]:
    """-fopenmp when torch parallelises with OpenMP: at::parallel_for is then inline OpenMP code, serial in
    an extension built without the flag."""
    import torch

    return ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []


def _extensions() -> tuple[list, dict]:
    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp") if not p.stem.endswith("_cuda"))
    if not cpu_sources:
        return [], {}
    cuda_home = _cuda_home()
    if cuda_home is not None:
        # torch reads CUDA_HOME when cpp_extension is first imported; its own guess misses wrappers.
        os.environ["CUDA_HOME"] = cuda_home
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, get_cxx_compiler

    openmp = _openmp_flags()

    def cpu_extension() -> CppExtension:
        return CppExtension(
            "reclmis._C",
            cpu_sources,
            include_dirs=[str(CSRC)],
            extra_compile_args=CXX_FLAGS + openmp,
            extra_link_args=openmp,
        )

    class BuildReclmisExtension(BuildExtension):
        """torch's BuildExtension, failing with a plain message when the C++ compiler is missing, and
        building the CPU kernel alone when the optional CUDA kernel fails to build."""

        def build_extensions(self) -> None:
            compiler = get_cxx_compiler()
            if shutil.which(compiler) is None:
                sys.exit(
                    f"error: building reclmis._C needs a C++ compiler, and `{compiler}` (the CXX environment "
                    "variable, or the platform default) is not on PATH. Install one (e.g. `apt-get install g++`) "
                    "or point CXX at it."
                )
            if cuda_home is None:
                super().build_extensions()
                return
            # BuildExtension wraps the compiler's compile methods; a second attempt must start unwrapped.
            saved = (self.compiler.compile, self.compiler._compile, list(self.compiler.src_extensions))
            try:
                super().build_extensions()
            except Exception as error:  # the CUDA part is optional: any failure falls back to the CPU kernel
                summary = ": ".join([type(error).__name__, *str(error).splitlines()[:1]])
                _say(
                    f"building the CPU kernel only: the CUDA kernel failed to build with {cuda_home} "
                    f"({summary}); the compiler's messages are above (pip shows them with -v), fix them or "
                    "set CUDA_HOME to another toolkit, and reinstall"
                )
                self.compiler.compile, self.compiler._compile, self.compiler.src_extensions = saved
                fallback = cpu_extension()
                for ext in self.extensions:
                    for attr in FALLBACK_ATTRIBUTES:
                        setattr(ext, attr, getattr(fallback, attr))
                super().build_extensions()

    if cuda_home is None:
        ext = cpu_extension()
    else:
        cpp_extension.CUDA_HOME = cuda_home  # in case cpp_extension was imported before
        cuda_sources = sorted(
            str(p.relative_to(ROOT)) for p in [*CSRC.glob("*_cuda.cpp"), *CSRC.glob("*.cu")]
        )
        ext = CUDAExtension(
            "reclmis._C",
            cpu_sources + cuda_sources,
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": CXX_FLAGS + openmp, "nvcc": _nvcc_flags()},
            extra_link_args=openmp,
        )
    build = BuildReclmisExtension.with_options(use_ninja=cpp_extension.is_ninja_available())
    return [ext], {"build_ext": build}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["reclmis", "reclmis.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
