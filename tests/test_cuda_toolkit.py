"""The CUDA toolkit search of setup.py (reclmis/cuda_toolkit.py) on fake toolkit layouts.

A fake toolkit is a folder with include/cuda_runtime.h and a bin/nvcc script that answers ``--version``
and ``--dryrun`` as nvcc does; PATH, CUDA_HOME and CUDA_PATH are passed to the search explicitly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reclmis import cuda_toolkit
from reclmis.cuda_toolkit import find_toolkit, nvcc_release, nvcc_top

TORCH_CUDA = "13.0"


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def make_toolkit(root: Path, version: str = "13.0", headers: bool = True) -> Path:
    """A toolkit whose nvcc prints its release and, under --dryrun, its TOP (as nvcc does, on stderr)."""
    _script(
        root / "bin" / "nvcc",
        f'case "$1" in\n'
        f'  --version) echo "Cuda compilation tools, release {version}, V{version}.88" ;;\n'
        f'  --dryrun) echo "#$ TOP={root}/bin/.." >&2 ;;\n'
        f'  *) echo "nvcc fake: $*" >&2; exit 1 ;;\n'
        f"esac",
    )
    if headers:
        (root / "include").mkdir(parents=True, exist_ok=True)
        (root / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    return root


def wrapper(folder: Path, toolkit: Path) -> Path:
    """A bin folder outside the toolkit whose nvcc is a script calling the toolkit's nvcc."""
    _script(folder / "nvcc", f'exec {toolkit}/bin/nvcc "$@"')
    return folder


@pytest.fixture(autouse=True)
def no_default_toolkit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conventional location points to an empty folder unless a test puts a toolkit there."""
    monkeypatch.setattr(cuda_toolkit, "DEFAULT_HOME", tmp_path / "usr-local-cuda")


def test_wrapper_script_on_path_is_followed_to_its_toolkit(tmp_path: Path) -> None:
    toolkit = make_toolkit(tmp_path / "cuda-13.0")
    bin_ = wrapper(tmp_path / "usr" / "bin", toolkit)
    (tmp_path / "usr" / "include").mkdir()  # the wrapper's parent is no toolkit: no cuda_runtime.h there
    search = find_toolkit(TORCH_CUDA, environ={"PATH": str(bin_)})
    assert search.toolkit is not None, search.reason
    assert search.toolkit.home == toolkit.resolve()
    assert search.toolkit.version == "13.0"
    assert "runs" in search.toolkit.found_by


def test_symlink_on_path_is_resolved(tmp_path: Path) -> None:
    toolkit = make_toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    search = find_toolkit(TORCH_CUDA, environ={"PATH": str(tmp_path / "bin")})
    assert search.toolkit is not None, search.reason
    assert search.toolkit.home == toolkit.resolve()
    assert "->" in search.toolkit.found_by


def test_nvcc_inside_a_toolkit_on_path(tmp_path: Path) -> None:
    toolkit = make_toolkit(tmp_path / "cuda")
    search = find_toolkit(TORCH_CUDA, environ={"PATH": str(toolkit / "bin")})
    assert search.toolkit is not None and search.toolkit.home == toolkit.resolve()
    assert search.toolkit.found_by == "nvcc on PATH"


@pytest.mark.parametrize("variable", ["CUDA_HOME", "CUDA_PATH"])
def test_cuda_home_wins_over_path(tmp_path: Path, variable: str) -> None:
    chosen = make_toolkit(tmp_path / "chosen")
    other = wrapper(tmp_path / "bin", make_toolkit(tmp_path / "other"))
    search = find_toolkit(TORCH_CUDA, environ={variable: str(chosen), "PATH": str(other)})
    assert search.toolkit is not None and search.toolkit.home == chosen
    assert search.toolkit.found_by == variable


def test_unusable_cuda_home_is_reported_not_replaced(tmp_path: Path) -> None:
    broken = make_toolkit(tmp_path / "broken", headers=False)
    good = wrapper(tmp_path / "bin", make_toolkit(tmp_path / "good"))
    search = find_toolkit(TORCH_CUDA, environ={"CUDA_HOME": str(broken), "PATH": str(good)})
    assert search.toolkit is None
    assert f"CUDA_HOME: {broken / 'include'} has no cuda_runtime.h" in search.reason
    assert "set CUDA_HOME to a CUDA 13.x toolkit and reinstall" in search.reason
    assert "\n" not in search.reason


def test_headers_missing_everywhere(tmp_path: Path) -> None:
    toolkit = make_toolkit(tmp_path / "cuda-13.0", headers=False)
    search = find_toolkit(TORCH_CUDA, environ={"PATH": str(wrapper(tmp_path / "bin", toolkit))})
    assert search.toolkit is None
    assert f"{toolkit.resolve() / 'include'} has no cuda_runtime.h" in search.reason
    assert "default location" in search.reason


def test_default_location_when_nvcc_is_not_on_path(tmp_path: Path) -> None:
    make_toolkit(cuda_toolkit.DEFAULT_HOME)
    search = find_toolkit(TORCH_CUDA, environ={"PATH": str(tmp_path / "empty")})
    assert search.toolkit is not None and search.toolkit.home == cuda_toolkit.DEFAULT_HOME
    assert search.toolkit.found_by == "default location"


def test_wrapper_that_cannot_say_where_falls_back_to_default(tmp_path: Path) -> None:
    make_toolkit(cuda_toolkit.DEFAULT_HOME)
    bin_ = tmp_path / "bin"
    _script(bin_ / "nvcc", "exit 1")
    search = find_toolkit(TORCH_CUDA, environ={"PATH": str(bin_)})
    assert search.toolkit is not None and search.toolkit.found_by == "default location"


def test_major_version_must_match_torch(tmp_path: Path) -> None:
    toolkit = make_toolkit(tmp_path / "cuda-12.4", version="12.4")
    search = find_toolkit(TORCH_CUDA, environ={"CUDA_HOME": str(toolkit)})
    assert search.toolkit is None
    assert "holds CUDA 12.4, torch is built for CUDA 13.0" in search.reason


def test_minor_version_may_differ(tmp_path: Path) -> None:
    toolkit = make_toolkit(tmp_path / "cuda-13.1", version="13.1")
    search = find_toolkit(TORCH_CUDA, environ={"CUDA_HOME": str(toolkit)})
    assert search.toolkit is not None and search.toolkit.version == "13.1"


def test_nvcc_that_does_not_run(tmp_path: Path) -> None:
    toolkit = make_toolkit(tmp_path / "cuda")
    _script(toolkit / "bin" / "nvcc", "exit 1")
    search = find_toolkit(TORCH_CUDA, environ={"CUDA_HOME": str(toolkit)})
    assert search.toolkit is None and "--version` fails" in search.reason


def test_cpu_only_torch_needs_no_toolkit(tmp_path: Path) -> None:
    make_toolkit(cuda_toolkit.DEFAULT_HOME)
    search = find_toolkit(None, "2.13.0+cpu", environ={})
    assert search.toolkit is None
    assert search.reason.startswith("torch 2.13.0+cpu is a CPU-only build; for the CUDA kernel install")


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="no nvcc on PATH: the real layout of this machine is not checked")
def test_finds_this_machines_toolkit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real nvcc's --version and --dryrun read as the fakes assume (here nvcc may well be a wrapper)."""
    monkeypatch.setattr(cuda_toolkit, "DEFAULT_HOME", Path("/nonexistent"))
    release = nvcc_release(NVCC)
    assert release is not None
    top = nvcc_top(NVCC)
    assert top is not None and (top / "bin" / "nvcc").is_file()
    environ = {"PATH": os.environ["PATH"]}
    search = find_toolkit(f"{release[0]}.{release[1]}", environ=environ)
    assert search.toolkit is not None, search.reason
    assert (search.toolkit.home / "include" / "cuda_runtime.h").is_file()
