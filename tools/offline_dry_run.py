"""Dry run of the air-gapped install, without a GPU (docs/install.md): does the wheelhouse carry everything?

    python3 tools/offline_dry_run.py --cache /work/cache          # about 10 min the first time (3 GB of torch)
    python3 tools/offline_dry_run.py --cache /work/cache --reuse-site --with-tests

1. ``tools/wheelhouse.py download``: the wheelhouse for the GPU image (Python 3.12, manylinux x86_64).
2. A site like the image's: a Python 3.12 virtual environment (``--python``, else ``python3.12`` on PATH or
   pyenv's) with torch 2.11.0 (CUDA 13.0) and triton 3.6.0 from PyPI, and the image's other packages;
   numpy<2.4, because step 5 runs Triton 3.6's CPU interpreter, which fails with numpy 2.4 and newer.
3. A copy of the checkout's tracked files with the wheelhouse in it, as it reaches the node.
4. ``tools/wheelhouse.py install`` there with TORCH_CUDA_ARCH_LIST=9.0 (what benchmarks/gpu_session.sh sets
   on an H200), the pip configuration cleared and, where ``unshare`` can, no network at all.
5. ``reclmis info --json`` (the CUDA kernel for sm_90 must be there) and every Triton launch of the fused
   ops at the paper shapes (tools/kernel_report/tests: PAPER_CASES) compiled for sm_90 ahead of time.
6. With ``--with-tests``: the kernels' tests, the masking op's and the kernel report's in that site, with the
   kernels in Triton 3.6's interpreter (INTERPRETER_TESTS).

Writes benchmarks/results/offline_install_dry_run.json (or --out): each step's command, seconds, status and
output tail, the versions, the wheelhouse's manifest and the compile facts of every launch. Exit status 0
when every step passed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "offline_install_dry_run.json"
TORCH, TRITON = "2.11.0", "3.6.0"
# The GPU image's other packages (issue 35), and numpy<2.4 for Triton 3.6's interpreter (step 5).
SITE_PACKAGES = [
    f"torch=={TORCH}", f"triton=={TRITON}", "numpy<2.4", "transformers==5.17.0", "tokenizers==0.23.2",
    "pytest", "pytest-benchmark", "tensorboard", "tqdm", "pyyaml", "pillow", "matplotlib", "safetensors",
    "ninja",
]  # fmt: skip
ARCH = "9.0"  # H200
# --with-tests: the Triton kernels' tests, the masking op's and the kernel report's, in the site's interpreter
INTERPRETER_TESTS = [
    "tests/test_conditioned_attention.py", "tests/test_max_similarity.py", "tests/test_weighted_mask.py",
    "tools/kernel_report/tests",
]  # fmt: skip


def find_python312(explicit: str | None) -> str:
    """A CPython 3.12 interpreter: ``explicit``, ``python3.12`` on PATH, or pyenv's newest 3.12."""
    candidates = [explicit] if explicit else [shutil.which("python3.12")]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += [str(p / "bin" / "python3.12") for p in sorted(pyenv.glob("3.12.*"), reverse=True)]
    for candidate in filter(None, candidates):
        try:
            version = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                capture_output=True, text=True, check=False,
            ).stdout.strip()  # fmt: skip
        except OSError:
            continue
        if version == "True":
            return candidate
    sys.exit("dry run: no Python 3.12 found (--python PATH, python3.12 on PATH, or pyenv install 3.12)")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Steps:
    """Runs commands as named steps, recording each one's command, seconds, status and output tail."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def run(self, name: str, command: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        print(f"dry run: {name}: {' '.join(command)}", flush=True)
        start, cpu_start = time.perf_counter(), _children_cpu_seconds()
        result = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
        cpu = _children_cpu_seconds() - cpu_start
        output = "\n".join(
            line
            for line in (result.stdout + result.stderr).splitlines()
            if "is ignored: it is neither" not in line
        )  # this machine's pip configuration names local indexes that may be absent
        record = {
            "step": name,
            "command": " ".join(command),
            "seconds": round(time.perf_counter() - start, 1),
            "cpu_seconds": round(cpu, 1),  # user + system of the processes it ran, for time estimates
            "status": "passed" if result.returncode == 0 else "failed",
            "returncode": result.returncode,
            "output_tail": output[-3000:],
        }
        self.records.append(record)
        print(f"dry run: {name}: {record['status']} in {record['seconds']} s", flush=True)
        if result.returncode != 0:
            print(output[-3000:], file=sys.stderr)
        return result

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.records.append({"step": name, "status": "passed" if ok else "failed", "detail": detail})
        print(f"dry run: {name}: {'passed' if ok else 'FAILED'}: {detail}", flush=True)
        return ok

    @property
    def passed(self) -> bool:
        return all(r["status"] == "passed" for r in self.records)


def offline_env(triton_cache: Path) -> dict[str, str]:
    """The environment of the node: no pip configuration or index, the CUDA architecture of an H200, and an
    empty Triton cache (every launch is compiled, as on a fresh node)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PIP_") and k not in ("CUDA_HOME", "CUDA_PATH")
    }
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1", TORCH_CUDA_ARCH_LIST=ARCH)
    env["TRITON_CACHE_DIR"] = str(triton_cache)
    return env


def no_network_prefix() -> tuple[list[str], str]:
    """``unshare --net`` (a network namespace with no interfaces) where it works, else nothing."""
    unshare = shutil.which("unshare")
    if (
        unshare
        and subprocess.run([unshare, "--net", "true"], capture_output=True, check=False).returncode == 0
    ):
        return [unshare, "--net"], "none: the offline steps ran in a network namespace without interfaces"
    return [], "not isolated (unshare --net unavailable): pip configuration cleared, --no-index"


def copy_checkout(dest: Path) -> None:
    """The files git tracks or does not ignore (uncommitted edits included): what reaches a node."""
    if dest.exists():
        shutil.rmtree(dest)
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def compile_kernels(out: Path) -> int:
    """Step 5 (run by the site's Python in the checkout copy): every launch of the paper cases for sm_90."""
    os.environ["TRITON_INTERPRET"] = (
        "1"  # launches are captured in the interpreter, before triton is imported
    )
    sys.path.insert(0, str(ROOT))
    from tools.kernel_report.counting import compile_launches
    from tools.kernel_report.report import capture_launches
    from tools.kernel_report.tests.test_kernel_report import PAPER_CASES

    captured = [(case, launch) for case in PAPER_CASES for launch in capture_launches(case)]
    facts = compile_launches([launch["spec"] for _, launch in captured], targets=(90,), jobs=2)
    rows = []
    for (case, launch), fact in zip(captured, facts, strict=True):
        sm90 = fact["sm_90"]
        rows.append(
            {
                "op": case.op, "case": case.label, "dtype": case.dtype, "direction": launch["direction"],
                "kernel": launch["kernel"], "compiled": "error" not in sm90,
                **{k: sm90[k] for k in ("shared_bytes", "registers", "spill_store_bytes", "wgmma", "mma_sync",
                                        "num_warps", "num_stages", "error") if k in sm90},
            }
        )  # fmt: skip
    out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if rows and all(row["compiled"] for row in rows) else 1


def dry_run(args: argparse.Namespace) -> int:
    cache = Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    steps = Steps()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    wheelhouse = Path(args.wheelhouse).resolve() if args.wheelhouse else cache / "wheelhouse-py312"
    if not args.wheelhouse:
        steps.run("wheelhouse", [sys.executable, str(ROOT / "tools" / "wheelhouse.py"), "download",
                                 "--out", str(wheelhouse)])  # fmt: skip

    python312 = find_python312(args.python)
    site = cache / f"site-py312-torch{TORCH}"
    site_python = str(site / "bin" / "python")
    if not (args.reuse_site and Path(site_python).exists()):
        if site.exists():
            shutil.rmtree(site)
        steps.run("site venv", [python312, "-m", "venv", str(site)])
    steps.run("site packages (online, as the image has them)",
              [site_python, "-m", "pip", "install", "--quiet", *SITE_PACKAGES])  # fmt: skip
    steps.run(
        "site without the project", [site_python, "-m", "pip", "uninstall", "--yes", "--quiet", "reclmis"]
    )
    versions = json.loads(
        subprocess.run(
            [site_python, "-c", "import json, sys, torch, triton, numpy; print(json.dumps({'python': "
             "sys.version.split()[0], 'torch': torch.__version__, 'torch_cuda': torch.version.cuda, "
             "'triton': triton.__version__, 'numpy': numpy.__version__}))"],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    steps.check(
        "site versions",
        versions["python"].startswith("3.12.")
        and versions["torch"].startswith(TORCH)
        and versions["triton"] == TRITON,
        json.dumps(versions),
    )

    checkout = cache / "dry-run-checkout"
    git = ["git", "-C", str(ROOT)]  # the commit of the files copied, taken as they are copied
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                            text=True, check=False)  # fmt: skip
    copy_checkout(checkout)
    shutil.copytree(wheelhouse, checkout / "wheelhouse")
    prefix, network = no_network_prefix()
    env = offline_env(checkout / "build" / "triton-cache")
    steps.run(
        "offline install", [*prefix, site_python, "tools/wheelhouse.py", "install"], cwd=checkout, env=env
    )
    info_run = steps.run("reclmis info", [*prefix, site_python, "-m", "reclmis", "info", "--json"],
                         cwd=checkout, env=env)  # fmt: skip
    info = json.loads(info_run.stdout) if info_run.returncode == 0 else {}
    ext = info.get("extension", {})
    steps.check(
        "CUDA kernel for sm_90",
        bool(ext.get("cuda_kernel")) and ext.get("cuda_archs") == ["sm_90"],
        f"reclmis._C: cpu_kernel={ext.get('cpu_kernel')}, cuda_kernel={ext.get('cuda_kernel')}, "
        f"cuda_archs={ext.get('cuda_archs')}, ptx={ext.get('ptx')}",
    )
    facts_file = cache / "dry-run-kernels.json"
    steps.run("every launch compiled for sm_90",
              [*prefix, site_python, "tools/offline_dry_run.py", "compile-kernels", "--out", str(facts_file)],
              cwd=checkout, env=env)  # fmt: skip
    kernels = json.loads(facts_file.read_text()) if facts_file.exists() else []
    if args.with_tests:
        tests = steps.run("kernel tests in Triton 3.6's interpreter",
                          [*prefix, site_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *INTERPRETER_TESTS],
                          cwd=checkout, env={**env, "TRITON_INTERPRET": "1"})  # fmt: skip
        steps.records[-1]["summary"] = (tests.stdout.strip().splitlines() or [""])[-1]

    manifest = json.loads((wheelhouse / "manifest.json").read_text())
    payload = {
        "passed": steps.passed,
        "environment": {
            **versions,
            "nvcc": info.get("toolkit", {}),
            "network": network,
            "git_commit": commit.stdout.strip(),
            "git_dirty": bool(status.stdout.strip()),
            "command": " ".join(["python3", *sys.argv]),
            "time_utc": started,
        },
        "numpy_note": "numpy<2.4 in this site: step 5 captures the launches in Triton 3.6's CPU interpreter, which "
        "fails with numpy 2.4 and newer; the GPU image's numpy 2.5.2 serves the compiled kernels",
        "wheelhouse": {k: manifest[k] for k in ("python", "platform", "provided", "wheels", "total_bytes")},
        "steps": steps.records,
        "reclmis_info": info,
        "kernels": {
            "launches": len(kernels),
            "compiled_for_sm_90": sum(row["compiled"] for row in kernels),
            "rows": kernels,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    if not args.keep_checkout:
        shutil.rmtree(checkout)
    print(f"dry run: {'passed' if steps.passed else 'FAILED'}; {out}")
    return 0 if steps.passed else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command")
    inner = commands.add_parser("compile-kernels", help="step 5, run by the site's Python")
    inner.add_argument("--out", required=True)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "reclmis"), help="downloads, venvs")
    parser.add_argument(
        "--python", help="a Python 3.12 interpreter (default: python3.12 on PATH, or pyenv's)"
    )
    parser.add_argument("--wheelhouse", help="an existing wheelhouse (default: made in step 1)")
    parser.add_argument("--reuse-site", action="store_true", help="keep the site venv of an earlier run")
    parser.add_argument("--keep-checkout", action="store_true", help="keep the checkout copy after the run")
    parser.add_argument(
        "--with-tests", action="store_true", help="also the kernel tests in Triton 3.6's interpreter (6 min)"
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the results file")
    args = parser.parse_args()
    if args.command == "compile-kernels":
        return compile_kernels(Path(args.out))
    return dry_run(args)


if __name__ == "__main__":
    sys.exit(main())
