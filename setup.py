"""Build script: the Python package, the Triton kernels (``kernels/`` installed as ``reclmis.kernels``)
and, once ``csrc/`` holds sources, the ``reclmis._C`` extension."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _extensions() -> tuple[list, dict]:
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension("reclmis._C", sources, include_dirs=[str(ROOT / "csrc")], extra_compile_args=["-O3"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=[*find_packages(include=["reclmis", "reclmis.*"]), "reclmis.kernels"],
    package_dir={"reclmis.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
