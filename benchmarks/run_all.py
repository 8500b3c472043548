"""One command for the whole performance report: every op suite and the model-level benchmark.

    python benchmarks/run_all.py --device cuda --out benchmarks/results/h200.json
    python benchmarks/run_all.py --device cpu --out /tmp/cpu.json --quick      # a smoke test (about 2 min)

Writes one JSON (environment: device, versions, git commit, command; rows of every suite) and a markdown
table beside it (same name, .md). Plot it with ``python benchmarks/plot.py RESULTS.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import (
    bench_conditioned_attention,
    bench_max_similarity,
    bench_model,
    bench_weighted_mask,
)
from benchmarks.common import environment, write_results

SUITES = {
    "conditioned_attention": bench_conditioned_attention,
    "max_similarity": bench_max_similarity,
    "weighted_mask": bench_weighted_mask,
    "model": bench_model,
}
COLUMNS = ("op", "impl", "pass", "dtype", "shape", "median_ms", "speedup", "peak_mem_mib", "note")


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
    env = payload["environment"]
    lines = [
        f"Device: {env['device_name']} ({env['device']}); torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}; commit {env['git_commit']}",
        f"Command: `{env['command']}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(row, c) for c in COLUMNS) + " |" for row in payload["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--out", required=True, help="results JSON; the markdown table goes beside it")
    parser.add_argument("--quick", action="store_true", help="reduced shapes and repetitions")
    parser.add_argument("--suites", nargs="+", choices=sorted(SUITES), default=list(SUITES))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    rows, timings = [], {}
    for name in args.suites:
        start = time.perf_counter()
        try:
            rows += SUITES[name].run(args.device, args.quick)
        except Exception as err:  # a broken suite is reported in the results, the others still run
            traceback.print_exc()
            rows.append({"op": name, "impl": "suite", "pass": "", "error": f"{type(err).__name__}: {err}"})
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {timings[name]} s", flush=True)
    payload = {
        "environment": environment(args.device),
        "quick": args.quick,
        "suite_seconds": timings,
        "rows": rows,
    }
    path = write_results("run_all", payload, args.out)
    path.with_suffix(".md").write_text(markdown(payload))
    print(f"{path}\n{path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
