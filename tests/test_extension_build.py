"""The optional CUDA part of reclmis._C: a failed CUDA build still installs the CPU kernel, and
weighted_mask on CUDA tensors without a CUDA kernel falls back (said once) or names the fix."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from reclmis.ops import weighted_mask

wm = importlib.import_module("reclmis.ops.weighted_mask")  # the module; reclmis.ops.weighted_mask is the op
ROOT = Path(__file__).resolve().parents[1]
LOAD_AND_LIST_KERNELS = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("reclmis._C", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(*(torch._C._dispatch_has_kernel_for_dispatch_key("reclmis::weighted_mask", k) for k in ("CPU", "CUDA")))
"""


@pytest.mark.skipif(not torch.version.cuda, reason="torch is a CPU-only build: setup.py builds no CUDA part")
def test_failing_cuda_build_falls_back_to_the_cpu_kernel(tmp_path: Path) -> None:
    """A toolkit that passes the search (headers, version) but whose nvcc cannot compile."""
    toolkit = tmp_path / "cuda"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("#error this toolkit is broken\n")
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = --version ] && echo "Cuda compilation tools, release {torch.version.cuda}" && exit 0\n'
        "exit 1\n"
    )
    nvcc.chmod(0o755)
    build = [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib")]
    build += ["--build-temp", str(tmp_path / "tmp")]
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_PATH", "TORCH_CUDA_ARCH_LIST")}
    env["CUDA_HOME"] = str(toolkit)
    result = subprocess.run(build, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if line.startswith("reclmis._C:")]
    assert len(said) == 1, result.stderr[-3000:]
    assert said[0].startswith(
        f"reclmis._C: building the CPU kernel only: the CUDA kernel failed to build with {toolkit}"
    )
    assert "reinstall" in said[0]
    (library,) = (tmp_path / "lib" / "reclmis").glob("_C*.so")
    kernels = subprocess.run(
        [sys.executable, "-c", LOAD_AND_LIST_KERNELS, str(library)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert kernels.stdout.split() == ["True", "False"]


@pytest.fixture
def extension_without_cuda_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    if not wm.extension_available():
        pytest.skip(f"reclmis._C does not load: {wm._EXTENSION_ERROR}")
    monkeypatch.setattr(wm, "_EXTENSION_HAS_CUDA", False)
    wm._warn_reference_on_cuda.cache_clear()


@pytest.mark.usefixtures("extension_without_cuda_kernel")
def test_cuda_tensors_without_cuda_kernel_take_the_reference_said_once() -> None:
    cuda = torch.device("cuda")
    with pytest.warns(UserWarning, match="reference on CUDA tensors.*set CUDA_HOME"):
        assert not wm._use_extension("auto", cuda)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not wm._use_extension("auto", cuda)
        assert not wm._use_extension("reference", cuda)
        assert wm._use_extension("auto", torch.device("cpu"))


@pytest.mark.usefixtures("extension_without_cuda_kernel")
def test_cuda_tensors_without_cuda_kernel_and_backend_extension_name_the_fix() -> None:
    with pytest.raises(RuntimeError, match=r"without its CUDA kernel.*set CUDA_HOME.*reinstall"):
        wm._use_extension("extension", torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.usefixtures("extension_without_cuda_kernel")
def test_weighted_mask_on_gpu_without_cuda_kernel_runs_the_reference() -> None:
    x, w = torch.randn(4, 10, 8, device="cuda"), torch.rand(4, 10, device="cuda")
    with pytest.warns(UserWarning, match="reference on CUDA tensors"):
        x_masked, mask = weighted_mask(x, w, 0.5, seed=3)
    expected = wm.weighted_mask_reference(x, w, 0.5, seed=3)
    assert torch.equal(mask, expected[1]) and torch.equal(x_masked, expected[0])
