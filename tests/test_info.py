"""``reclmis info``: the report, the architectures read from a library's fat binaries, the Triton mode."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reclmis import info
from reclmis.cli import main

NVCC = shutil.which("nvcc")


def test_info_command_reports_this_installation(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    report = capsys.readouterr().out
    ext = info.extension_info()
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    assert f"torch          {torch.__version__} ({build}); " in report
    assert "tested with 2.11, 2.13, 2.14" in report
    assert ext["loaded"] and ext["cpu_kernel"], ext
    assert f"reclmis._C     CPU kernel{' + CUDA kernel' if ext['cuda_kernel'] else ''}" in report
    assert "CUDA toolkit   " in report and "Triton         " in report


def test_python_m_reclmis_info_json() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "reclmis", "info", "--json"], capture_output=True, text=True, check=True
    )
    data = json.loads(result.stdout)
    assert data["torch"] == torch.__version__ and data["torch_cuda"] == torch.version.cuda
    assert data["extension"]["loaded"] and data["extension"]["cpu_kernel"]
    if not torch.version.cuda:
        assert not data["extension"]["cuda_kernel"] and data["toolkit"]["home"] is None


@pytest.mark.skipif(
    NVCC is None, reason="no nvcc on PATH: fat binary parsing is not checked on nvcc's output"
)
def test_fatbin_architectures_of_an_nvcc_library(tmp_path: Path) -> None:
    source = tmp_path / "k.cu"
    source.write_text("__global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\n")
    library = tmp_path / "libk.so"
    gencode = ["-gencode", "arch=compute_86,code=sm_86", "-gencode", "arch=compute_90,code=compute_90"]
    command = [NVCC, "-shared", "-Xcompiler", "-fPIC", *gencode, str(source), "-o", str(library)]
    subprocess.run(command, capture_output=True, text=True, check=True)
    assert info.fatbin_architectures(library) == (["sm_86"], ["compute_90"])


def test_fatbin_architectures_of_the_extension() -> None:
    """GPU code exactly when reclmis._C holds the CUDA kernel; none in a library without (python itself)."""
    ext = info.extension_info()
    cubins, ptx = info.fatbin_architectures(ext["path"])
    assert bool(cubins or ptx) == ext["cuda_kernel"]
    assert info.fatbin_architectures(sys.executable) == ([], [])


@pytest.mark.parametrize(
    ("gpu", "cubins", "ptx", "runs"),
    [
        ("sm_86", ["sm_86", "sm_90"], [], True),
        ("sm_89", ["sm_86", "sm_90"], [], True),  # same major, higher minor
        ("sm_80", ["sm_86", "sm_90"], [], False),
        ("sm_100", ["sm_86", "sm_90"], [], False),
        ("sm_120", ["sm_86"], ["compute_90"], True),  # PTX is compiled for newer GPUs
        ("sm_80", ["sm_86"], ["compute_90"], False),
    ],
)
def test_runs_on(gpu: str, cubins: list[str], ptx: list[str], runs: bool) -> None:
    assert info.runs_on(gpu, cubins, ptx) is runs


def _info(**changes) -> dict:
    base = {
        "reclmis": "0.1.0",
        "torch": "2.14.1+cu130",
        "torch_cuda": "13.0",
        "gpus": [{"name": "NVIDIA A100-SXM4-80GB", "arch": "sm_80", "memory_gib": 79.2}],
        "extension": {
            "loaded": True,
            "path": "/x/_C.so",
            "cpu_kernel": True,
            "cuda_kernel": True,
            "cuda_archs": ["sm_86", "sm_90"],
            "ptx": [],
        },
        "toolkit": {"home": "/usr/local/cuda-13.0", "version": "13.0", "found_by": "CUDA_HOME"},
        "triton": {"version": "3.8.0", "mode": "compiled", "why": "for CUDA tensors"},
    }
    return {**base, **changes}


def test_report_warns_when_the_gpu_has_no_code() -> None:
    report = info.format_report(_info())
    assert "GPU 0          NVIDIA A100-SXM4-80GB (sm_80, 79 GiB)" in report
    assert "reclmis._C     CPU kernel + CUDA kernel (sm_86, sm_90): /x/_C.so" in report
    assert "warning: no code for this sm_80 GPU; rebuild with TORCH_CUDA_ARCH_LIST=8.0" in report
    blackwell = [{"name": "NVIDIA RTX PRO 6000", "arch": "sm_120", "memory_gib": 95.0}]
    assert "TORCH_CUDA_ARCH_LIST=12.0 " in info.format_report(_info(gpus=blackwell))
    hopper = [{"name": "NVIDIA H200", "arch": "sm_90", "memory_gib": 139.8}]
    assert "warning" not in info.format_report(_info(gpus=hopper))


def test_report_of_a_build_without_cuda_kernel() -> None:
    extension = {**_info()["extension"], "cuda_kernel": False, "cuda_archs": []}
    why = "no usable CUDA toolkit (nvcc on PATH: /usr/local/include has no cuda_runtime.h)"
    report = info.format_report(_info(extension=extension, toolkit={"home": None, "why": why}))
    assert "reclmis._C     CPU kernel: /x/_C.so" in report
    assert "no CUDA kernel: weighted_mask on CUDA tensors runs its PyTorch reference" in report
    assert f"CUDA toolkit   none usable: {why}" in report
    assert "warning" not in report


def test_report_when_the_extension_does_not_load() -> None:
    report = info.format_report(_info(extension={"loaded": False, "error": "No module named 'reclmis._C'"}))
    assert (
        "reclmis._C     not loaded (No module named 'reclmis._C'): weighted_mask runs its PyTorch" in report
    )


@pytest.mark.parametrize(
    ("interpret", "cuda", "mode"),
    [("1", False, "interpreted"), ("0", True, "compiled"), ("0", False, "not run")],
)
def test_triton_mode(monkeypatch: pytest.MonkeyPatch, interpret: str, cuda: bool, mode: str) -> None:
    pytest.importorskip("triton")
    from reclmis.kernels import _runtime

    monkeypatch.setattr(_runtime, "interpreting", lambda: interpret == "1")  # the flavour triton took
    assert info.triton_info(cuda)["mode"] == mode


def test_tested_releases() -> None:
    assert all(info.tested("torch", version) for version in ("2.11.0+cu130", "2.13.0+cpu", "2.14.1"))
    assert not any(info.tested("torch", version) for version in ("2.12.0", "2.10.0"))
    assert all(info.tested("triton", version) for version in ("3.6.0", "3.8.1", "3.9.0"))
    assert not any(info.tested("triton", version) for version in ("3.5.1", None))


def test_report_names_the_tested_releases() -> None:
    report = info.format_report(_info(torch="2.12.0+cu130"))
    assert "torch          2.12.0+cu130 (CUDA 13.0 build); untested (tested with 2.11, 2.13, 2.14)" in report
    assert "Triton         3.8.0 (tested with 3.6, 3.8, 3.9), kernels compiled" in report
    assert info.TESTED == {"torch": ("2.11", "2.13", "2.14"), "triton": ("3.6", "3.8", "3.9")}


@pytest.mark.parametrize(
    ("triton", "numpy", "fails"),
    [
        ("3.6.0", "2.4.0", True),
        ("3.6.0", "2.5.2", True),
        ("3.6.0", "2.3.5", False),
        ("3.8.0", "2.5.2", False),
    ],
)
def test_interpreter_numpy_limit(triton: str, numpy: str, fails: bool) -> None:
    problem = info.interpreter_problem(triton, numpy)
    assert (problem is not None) is fails
    if fails:
        assert f"numpy<2.4, numpy {numpy} is installed: pip install 'numpy<2.4'" in problem


def test_report_warns_about_the_interpreter_numpy_limit() -> None:
    problem = info.interpreter_problem("3.6.0", "2.5.2")
    triton = {"version": "3.6.0", "mode": "interpreted", "why": "TRITON_INTERPRET=1", "problem": problem}
    assert f"               warning: {problem}" in info.format_report(_info(triton=triton, gpus=[]))
