"""Finding a CUDA toolkit that can build the CUDA kernel of ``reclmis._C``.

A toolkit is usable when its ``bin/nvcc`` runs, its ``include/`` holds ``cuda_runtime.h`` (torch's CUDA
headers include it) and nvcc's major version equals that of torch's CUDA build (torch refuses to build
otherwise). The search, first usable wins:

1. ``CUDA_HOME`` or ``CUDA_PATH`` when set, and then only there: an explicit choice is never overridden;
2. the ``nvcc`` on PATH: the parent of its folder after resolving symlinks, and when that holds no
   toolkit (``nvcc`` is a wrapper script in some ``bin/``), the toolkit the wrapper calls, which
   ``nvcc --dryrun`` names in its ``TOP=`` line;
3. the conventional location ``/usr/local/cuda``.

torch's own guess is the parent of the folder of the ``nvcc`` on PATH, unresolved, which fails for the
wrapper and symlink layouts. This module needs only the standard library: setup.py loads it by path,
before the package's dependencies are installed, and ``reclmis info`` reports the same search.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = Path("/usr/local/cuda")
HEADER = Path("include") / "cuda_runtime.h"
_RELEASE = re.compile(r"release (\d+)\.(\d+)")
_TOP = re.compile(r"^#\$ TOP=(.+)$", re.MULTILINE)
_TIMEOUT_S = 60


@dataclass(frozen=True)
class Toolkit:
    """A usable CUDA toolkit: its root folder, nvcc's release ("13.0") and how the search found it."""

    home: Path
    version: str
    found_by: str


@dataclass(frozen=True)
class ToolkitSearch:
    """The search's answer: a toolkit, or None and one sentence saying why none and how to get one."""

    toolkit: Toolkit | None
    reason: str = ""


def nvcc_release(nvcc: Path | str) -> tuple[int, int] | None:
    """(major, minor) of ``nvcc --version``, or None when it does not run or prints no release."""
    try:
        result = subprocess.run(
            [str(nvcc), "--version"], capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = _RELEASE.search(result.stdout)
    return (int(match.group(1)), int(match.group(2))) if result.returncode == 0 and match else None


def nvcc_top(nvcc: Path | str) -> Path | None:
    """The toolkit root that an ``nvcc`` command runs, from its ``--dryrun`` (which compiles nothing)."""
    command = [str(nvcc), "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    match = _TOP.search(result.stderr + result.stdout)
    return Path(match.group(1).strip().strip('"')).resolve() if match else None


def check_toolkit(home: Path, torch_cuda: str) -> tuple[str, str]:
    """(nvcc's release, "") when ``home`` is a toolkit usable with torch's CUDA ``torch_cuda``, else
    ("", what is wrong with it)."""
    nvcc = home / "bin" / "nvcc"
    if not home.is_dir():
        return "", f"{home} does not exist"
    if not nvcc.is_file():
        return "", f"{nvcc} does not exist"
    if not (home / HEADER).is_file():
        return "", f"{home / 'include'} has no cuda_runtime.h"
    release = nvcc_release(nvcc)
    if release is None:
        return "", f"`{nvcc} --version` fails or prints no release"
    version = f"{release[0]}.{release[1]}"
    if str(release[0]) != torch_cuda.split(".")[0]:
        return "", f"{home} holds CUDA {version}, torch is built for CUDA {torch_cuda} (majors must agree)"
    return version, ""


def _candidates(environ: Mapping[str, str]) -> Iterator[tuple[Path, str]]:
    """(toolkit root, how it was found), in the search order; the wrapper is run only when needed."""
    explicit = [name for name in ("CUDA_HOME", "CUDA_PATH") if environ.get(name)]
    if explicit:
        yield Path(environ[explicit[0]]), explicit[0]
        return
    nvcc = shutil.which("nvcc", path=environ.get("PATH", os.defpath))
    if nvcc is not None:
        real = Path(nvcc).resolve()
        how = "nvcc on PATH" if real == Path(nvcc).absolute() else f"nvcc on PATH ({nvcc} -> {real})"
        yield real.parent.parent, how
        top = nvcc_top(nvcc)
        if top is not None and top != real.parent.parent:
            yield top, f"nvcc on PATH ({nvcc} runs {top / 'bin' / 'nvcc'})"
    yield DEFAULT_HOME, "default location"


def find_toolkit(
    torch_cuda: str | None, torch_version: str = "", environ: Mapping[str, str] | None = None
) -> ToolkitSearch:
    """The first usable toolkit for torch's CUDA version ``torch_cuda`` (None for a CPU-only torch)."""
    if not torch_cuda:
        return ToolkitSearch(
            None,
            f"torch {torch_version} is a CPU-only build; for the CUDA kernel install a CUDA build of torch "
            "(on Linux `pip install torch`) and reinstall reclmis",
        )
    problems = []
    for home, how in _candidates(os.environ if environ is None else environ):
        version, problem = check_toolkit(home, torch_cuda)
        if not problem:
            return ToolkitSearch(Toolkit(home, version, how))
        problems.append(f"{how}: {problem}")
    major = torch_cuda.split(".")[0]
    return ToolkitSearch(
        None,
        f"no usable CUDA toolkit ({'; '.join(problems)}); for the CUDA kernel set CUDA_HOME to a CUDA "
        f"{major}.x toolkit and reinstall reclmis",
    )
