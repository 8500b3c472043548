"""The CUDA kernel of reclmis._C compiles with plain nvcc for sm_86 (RTX 3090) and sm_90 (H100/H200).

CI has nvcc but no CUDA torch, so the kernel file is torch-free and compiled on its own here; the
torch-side launcher (csrc/weighted_mask_cuda.cpp) is only built into a CUDA extension, and is checked here
by the host compiler (syntax and types only), with the C++ standard torch builds extensions with, against the
installed torch's headers (its CPU wheel ships the CUDA ones too) and against those of the oldest torch that
pyproject.toml allows (from that release's wheel, downloaded once into RECLMIS_CACHE; skipped, saying why,
when it cannot be downloaded).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
# The oldest torch the package declares; its headers come from its wheel, downloaded once into the cache.
OLDEST_TORCH = re.search(r'"torch>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())[1]
CACHE = Path(os.environ.get("RECLMIS_CACHE") or Path.home() / ".cache" / "reclmis")
DOWNLOAD_TIMEOUT_S = 900
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


def _cxx_standard(cpp_extension_source: str) -> str:
    """The C++ standard torch's cpp_extension builds extensions with (c++17 in torch 2.11, c++20 later)."""
    match = re.search(r"common_cflags \+= \['-std=(c\+\+\d+)'", cpp_extension_source)
    return match[1] if match else "c++17"


@dataclass(frozen=True)
class TorchHeaders:
    """The C++ include paths of one torch release and the C++ standard its extensions are built with."""

    version: str
    include_paths: tuple[Path, ...]
    std: str


def _installed_torch_headers() -> TorchHeaders | None:
    """The installed torch's headers when they hold c10's CUDA headers (its CPU wheel ships them too)."""
    import torch
    import torch.utils.cpp_extension as cpp_extension

    paths = tuple(Path(p) for p in cpp_extension.include_paths())
    if not any((p / "c10" / "cuda" / "CUDAStream.h").exists() for p in paths):
        return None
    return TorchHeaders(torch.__version__, paths, _cxx_standard(inspect.getsource(cpp_extension)))


def _cached_torch_headers(version: str) -> tuple[TorchHeaders | None, str]:
    """torch ``version``'s headers (and its cpp_extension.py) from RECLMIS_CACHE (default ~/.cache/reclmis),
    taken once from its Linux CUDA wheel on PyPI; (None, why) when the wheel cannot be downloaded."""
    folder = CACHE / f"torch-{version}-headers"
    if not (folder / "include").is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--quiet"]
            command += ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
            command += [
                "--abi",
                "cp312",
                "--platform",
                "manylinux_2_28_x86_64",
                "-d",
                tmp,
                f"torch=={version}",
            ]
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return None, f"downloading torch {version}'s wheel took over {DOWNLOAD_TIMEOUT_S} s"
            wheels = list(Path(tmp).glob("torch-*.whl"))
            if result.returncode != 0 or not wheels:
                why = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
                return None, f"torch {version}'s wheel could not be downloaded (offline?): {why}"
            staging = Path(tmp) / "headers"
            with zipfile.ZipFile(wheels[0]) as wheel:
                for name in wheel.namelist():
                    if name.startswith("torch/include/") or name == "torch/utils/cpp_extension.py":
                        wheel.extract(name, staging)
            with contextlib.suppress(OSError):  # another process cached it first
                (staging / "torch").rename(folder)
    include = folder / "include"
    std = _cxx_standard((folder / "utils" / "cpp_extension.py").read_text())
    return TorchHeaders(version, (include, include / "torch" / "csrc" / "api" / "include"), std), ""


@pytest.fixture(params=["installed", "oldest_supported"])
def torch_headers(request: pytest.FixtureRequest) -> TorchHeaders:
    """The installed torch's headers, and those of the oldest torch pyproject.toml allows."""
    if request.param == "installed":
        headers = _installed_torch_headers()
        if headers is None:
            pytest.skip("the installed torch ships no c10/cuda headers")
        return headers
    headers, why = _cached_torch_headers(OLDEST_TORCH)
    if headers is None:
        pytest.skip(why)
    return headers


@pytest.mark.skipif(
    NVCC is None or shutil.which("c++") is None,
    reason="needs nvcc (for the CUDA headers) and a C++ compiler",
)
def test_cuda_launcher_compiles_against_torch_headers(tmp_path: Path, torch_headers: TorchHeaders) -> None:
    # nvcc names its include folder (the nvcc on PATH may be a wrapper outside the toolkit)
    dryrun = subprocess.run([NVCC, "--dryrun", "-c", "x.cu"], capture_output=True, text=True).stderr
    cuda_include = re.search(r'INCLUDES="-I([^"]+)"', dryrun)
    assert cuda_include, dryrun
    # The one header a CUDA build of torch generates at configure time; the CPU wheel lacks it (a CUDA
    # wheel's own copy comes first in the search order).
    macros = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    paths = [*torch_headers.include_paths, tmp_path, cuda_include[1].strip(), CSRC]
    command = ["c++", f"-std={torch_headers.std}", "-fsyntax-only", "-Werror", *(f"-I{p}" for p in paths)]
    result = subprocess.run([*command, str(LAUNCHER)], capture_output=True, text=True)
    assert result.returncode == 0, f"against torch {torch_headers.version}:\n{result.stderr[-4000:]}"
