"""``reclmis info``: what this installation runs, and why.

torch's build and the GPU, what the compiled extension ``reclmis._C`` holds (its CPU kernel, its CUDA kernel
and the GPU architectures of the machine code inside it, read from the library file itself), the CUDA
toolkit a rebuild would use, and whether the Triton kernels run compiled, interpreted or not at all (the
ops then run their PyTorch references).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from reclmis.cuda_toolkit import find_toolkit

# The releases the Triton kernels and the extension are tested with: torch 2.13 (CPU wheel) with Triton 3.9
# and torch 2.14 (CUDA wheel) with Triton 3.8 run the whole suite in CI; torch 2.11 (CUDA 13.0) with Triton
# 3.6 installs offline, builds the CUDA kernel and compiles every kernel launch for sm_90
# (benchmarks/results/offline_install_dry_run.json), and the launcher compiles against its headers
# (tests/test_csrc_nvcc.py).
TESTED = {"torch": ("2.11", "2.13", "2.14"), "triton": ("3.6", "3.8", "3.9")}
# Triton's CPU interpreter up to 3.6 converts arrays to scalars in a way numpy 2.4 refuses.
INTERPRETER_NUMPY_LIMIT = {"triton_up_to": (3, 6), "numpy_below": (2, 4)}

_ELF_MAGIC = b"\x7fELF"
_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_PTX, _FATBIN_CUBIN = 1, 2


def _elf_section(data: bytes, name: str) -> bytes:
    """The contents of section ``name`` of a little-endian ELF64 file, b"" when it has none."""
    if data[:4] != _ELF_MAGIC or data[4] != 2 or data[5] != 1:
        return b""
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:  # (name offset, file offset, size)
        sh_name, _, _, _, sh_offset, sh_size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return sh_name, sh_offset, sh_size

    _, names_offset, _ = header(shstrndx)
    for i in range(shnum):
        sh_name, offset, size = header(i)
        end = data.index(b"\0", names_offset + sh_name)
        if data[names_offset + sh_name : end].decode() == name:
            return data[offset : offset + size]
    return b""


def fatbin_architectures(library: Path | str) -> tuple[list[str], list[str]]:
    """(["sm_86", ...], ["compute_90", ...]): the GPU machine code (cubin) and the PTX that nvcc embedded in
    a shared library, read from its .nv_fatbin section (one fat binary per CUDA source file).

    A fat binary is a 16-byte header (magic 0xBA55ED50, version, header size, size of the entries) and
    entries, each a header (kind 1 = PTX, 2 = cubin; its own size; the payload's size; the architecture as
    10 * major + minor at byte 28) followed by its payload.
    """
    section = _elf_section(Path(library).read_bytes(), ".nv_fatbin")
    cubins, ptx = set(), set()
    start = 0
    while start + 16 <= len(section):
        magic, _, header_size, entries_size = struct.unpack_from("<IHHQ", section, start)
        if magic != _FATBIN_MAGIC:  # padding between the fat binaries of two object files
            start += 8
            continue
        entry, end = start + header_size, start + header_size + entries_size
        while entry + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", section, entry)
            (arch,) = struct.unpack_from("<I", section, entry + 28)
            if kind == _FATBIN_CUBIN:
                cubins.add(f"sm_{arch}")
            elif kind == _FATBIN_PTX:
                ptx.add(f"compute_{arch}")
            entry += entry_header + payload
        start = end
    return sorted(cubins, key=_arch_number), sorted(ptx, key=_arch_number)


def _arch_number(arch: str) -> int:
    """86 for "sm_86" or "compute_86": 10 * major + minor."""
    return int(arch.rpartition("_")[2])


def extension_info() -> dict[str, Any]:
    """What reclmis._C holds: whether it loads, its file, its CPU and CUDA kernels, the CUDA architectures."""
    try:
        from reclmis import _C
    except ImportError as error:
        return {"loaded": False, "error": str(error)}
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    cubins, ptx = fatbin_architectures(_C.__file__)
    return {
        "loaded": True,
        "path": _C.__file__,
        "cpu_kernel": has_kernel("reclmis::weighted_mask", "CPU"),
        "cuda_kernel": has_kernel("reclmis::weighted_mask", "CUDA"),
        "cuda_archs": cubins,
        "ptx": ptx,
    }


def gpu_info() -> list[dict[str, Any]]:
    """Name, compute capability and memory of each visible CUDA device (none with a CPU-only torch)."""
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "name": props.name,
                "arch": f"sm_{props.major}{props.minor}",
                "memory_gib": props.total_memory / 2**30,
            }
        )
    return devices


def runs_on(gpu_arch: str, cubins: list[str], ptx: list[str]) -> bool:
    """Whether a GPU of ``gpu_arch`` runs one of the cubins (same major, minor not above the GPU's) or
    JIT-compiles one of the PTX (an architecture not above the GPU's)."""
    major, minor = divmod(_arch_number(gpu_arch), 10)
    for arch in cubins:
        cubin_major, cubin_minor = divmod(_arch_number(arch), 10)
        if cubin_major == major and cubin_minor <= minor:
            return True
    return any(_arch_number(arch) <= _arch_number(gpu_arch) for arch in ptx)


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "2.11.0+cu130" or "3.6.0"."""
    major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:2])
    return major, minor


def tested(package: str, version: str | None) -> bool:
    """Whether ``version`` of torch or triton is a release the kernels and the extension are tested with."""
    return version is not None and f"{_release(version)[0]}.{_release(version)[1]}" in TESTED[package]


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's CPU interpreter fails with this numpy (None when it does not): Triton 3.6 and older need
    numpy < 2.4 there. Compiled kernels on a GPU are not affected."""
    limit = INTERPRETER_NUMPY_LIMIT
    if _release(triton_version) <= limit["triton_up_to"] and _release(numpy_version) >= limit["numpy_below"]:
        below = ".".join(map(str, limit["numpy_below"]))
        return (
            f"Triton {triton_version}'s CPU interpreter (TRITON_INTERPRET=1) needs numpy<{below}, numpy "
            f"{numpy_version} is installed: pip install 'numpy<{below}' (or Triton 3.8 or newer)"
        )
    return None


def triton_info(cuda_available: bool) -> dict[str, Any]:
    """Triton's version and how the kernels of conditioned_attention and max_similarity run with
    backend="auto": "compiled", "interpreted" or "not run" (the ops then run their PyTorch references)."""
    try:
        import triton
    except ImportError as error:
        return {"version": None, "mode": "not run", "why": f"triton does not import ({error})"}
    import numpy

    from reclmis.kernels import _runtime

    if _runtime.interpreting():
        why = "TRITON_INTERPRET=1 runs them in Triton's CPU interpreter (slow; how the tests run them)"
        problem = interpreter_problem(triton.__version__, numpy.__version__)
        return {"version": triton.__version__, "mode": "interpreted", "why": why, "problem": problem}
    if cuda_available:
        why = "for CUDA tensors; CPU tensors run the PyTorch references"
        return {"version": triton.__version__, "mode": "compiled", "why": why}
    why = "no CUDA device, the ops run their PyTorch references (TRITON_INTERPRET=1 runs the kernels on CPU)"
    return {"version": triton.__version__, "mode": "not run", "why": why}


def collect() -> dict[str, Any]:
    """Everything ``reclmis info`` reports, as plain data (``reclmis info --json`` prints it)."""
    from reclmis import __version__

    search = find_toolkit(torch.version.cuda, torch.__version__)
    toolkit = search.toolkit
    gpus = gpu_info()
    return {
        "reclmis": __version__,
        "torch": torch.__version__,
        "tested": {package: list(versions) for package, versions in TESTED.items()},
        "torch_cuda": torch.version.cuda,
        "gpus": gpus,
        "extension": extension_info(),
        "toolkit": (
            {"home": str(toolkit.home), "version": toolkit.version, "found_by": toolkit.found_by}
            if toolkit
            else {"home": None, "why": search.reason}
        ),
        "triton": triton_info(bool(gpus)),
    }


def _extension_lines(ext: dict[str, Any], gpus: list[dict[str, Any]], torch_cuda: str | None) -> list[str]:
    if not ext["loaded"]:
        return [
            f"reclmis._C     not loaded ({ext['error']}): weighted_mask runs its PyTorch reference; "
            "`pip install -e . --no-build-isolation` builds it"
        ]
    kernels = ["CPU kernel"] if ext["cpu_kernel"] else []
    if ext["cuda_kernel"]:
        code = ", ".join(ext["cuda_archs"] + [f"{a} PTX" for a in ext["ptx"]]) or "no GPU code found"
        kernels.append(f"CUDA kernel ({code})")
    lines = [f"reclmis._C     {' + '.join(kernels) or 'no kernels'}: {ext['path']}"]
    if not ext["cuda_kernel"] and torch_cuda:
        lines.append(
            "               no CUDA kernel: weighted_mask on CUDA tensors runs its PyTorch reference "
            "(see the toolkit line, then reinstall)"
        )
    for gpu in gpus:
        if ext["cuda_kernel"] and not runs_on(gpu["arch"], ext["cuda_archs"], ext["ptx"]):
            major, minor = divmod(_arch_number(gpu["arch"]), 10)
            lines.append(
                f"               warning: no code for this {gpu['arch']} GPU; rebuild with "
                f"TORCH_CUDA_ARCH_LIST={major}.{minor} (pip install -e . --no-build-isolation)"
            )
    return lines


def format_report(info: dict[str, Any]) -> str:
    """The report of ``reclmis info``, one topic a line."""
    build = f"CUDA {info['torch_cuda']} build" if info["torch_cuda"] else "CPU-only build"
    lines = [
        f"reclmis        {info['reclmis']}",
        f"torch          {info['torch']} ({build}); {_tested_note('torch', info['torch'])}",
    ]
    if info["gpus"]:
        for index, gpu in enumerate(info["gpus"]):
            lines.append(f"GPU {index:<10} {gpu['name']} ({gpu['arch']}, {gpu['memory_gib']:.0f} GiB)")
    else:
        lines.append("GPU            none visible to torch")
    lines += _extension_lines(info["extension"], info["gpus"], info["torch_cuda"])
    toolkit = info["toolkit"]
    if toolkit["home"]:
        lines.append(
            f"CUDA toolkit   {toolkit['home']} (nvcc {toolkit['version']}), found via {toolkit['found_by']}"
        )
    else:
        lines.append(
            f"CUDA toolkit   {'none usable' if info['torch_cuda'] else 'not used'}: {toolkit['why']}"
        )
    triton = info["triton"]
    version = triton["version"]
    tested_note = f" ({_tested_note('triton', version)})" if version else ""
    lines.append(
        f"Triton         {version or 'unavailable'}{tested_note}, kernels {triton['mode']}: {triton['why']}"
    )
    if triton.get("problem"):
        lines.append(f"               warning: {triton['problem']}")
    return "\n".join(lines)


def _tested_note(package: str, version: str) -> str:
    releases = ", ".join(TESTED[package])
    return f"tested with {releases}" if tested(package, version) else f"untested (tested with {releases})"


def main(as_json: bool = False) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if as_json else format_report(info))
    return 0
