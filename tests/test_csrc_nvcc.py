"""The CUDA kernel of reclmis._C compiles with plain nvcc for sm_86 (RTX 3090) and sm_90 (H100/H200).

CI has nvcc but no CUDA torch, so the kernel file is torch-free and compiled on its own here; the
torch-side launcher (csrc/weighted_mask_cuda.cpp) is only built into a CUDA extension, and is checked here
by the host compiler against the CUDA headers that torch's CPU wheel ships too (syntax and types only).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
KERNEL = CSRC / "weighted_mask_kernel.cu"
LAUNCHER = CSRC / "weighted_mask_cuda.cpp"
ARCHS = ("sm_86", "sm_90")


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()


@pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (CUDA_HOME or PATH): the CUDA compile check is skipped"
)
def test_cuda_kernel_compiles_for_sm86_and_sm90(tmp_path: Path) -> None:
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
    command = [NVCC, "-c", str(KERNEL), "-o", str(tmp_path / "kernel.o"), *gencode]
    command += ["-O3", "--Werror", "all-warnings", "-Xptxas", "-v"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # ptxas reports every kernel it compiles, per architecture; none may spill registers to local memory.
    for arch in ARCHS:
        assert re.search(
            rf"Compiling entry function '\w*weighted_mask_kernel\w*' for '{arch}'", result.stderr
        ), arch
    spills = re.findall(r"(\d+) bytes spill stores", result.stderr)
    assert spills and all(s == "0" for s in spills), result.stderr


def _torch_cuda_headers() -> list[str] | None:
    """Include paths of torch's C++ API when they hold c10's CUDA headers (the CPU wheel ships them)."""
    from torch.utils.cpp_extension import include_paths

    paths = include_paths()
    return paths if any((Path(p) / "c10" / "cuda" / "CUDAStream.h").exists() for p in paths) else None


@pytest.mark.skipif(
    NVCC is None or shutil.which("c++") is None or _torch_cuda_headers() is None,
    reason="needs nvcc (for the CUDA headers), a C++ compiler and torch's c10/cuda headers",
)
def test_cuda_launcher_compiles_against_torch_headers(tmp_path: Path) -> None:
    # nvcc names its include folder (the nvcc on PATH may be a wrapper outside the toolkit)
    dryrun = subprocess.run([NVCC, "--dryrun", "-c", "x.cu"], capture_output=True, text=True).stderr
    cuda_include = re.search(r'INCLUDES="-I([^"]+)"', dryrun)
    assert cuda_include, dryrun
    # The one header a CUDA build of torch generates at configure time; the CPU wheel lacks it.
    macros = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{p}" for p in [*_torch_cuda_headers(), tmp_path, cuda_include[1].strip(), CSRC]]
    command = ["c++", "-std=c++20", "-fsyntax-only", "-Werror", *includes, str(LAUNCHER)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
