"""One command for the whole performance report: every op suite and the model-level benchmark.

    python3 benchmarks/run_all.py --device cuda --out benchmarks/results/h200.json
    python3 benchmarks/run_all.py --device cpu --out /tmp/cpu.json --quick      # a smoke test (about 2 min)
    python3 benchmarks/run_all.py --device cuda --session --suites conditioned_attention max_similarity \
        weighted_mask --out build/ops.json                                     # benchmarks/gpu_session.sh

Each suite writes its own results file as it finishes (``<out stem>.<suite>.json`` beside ``--out``: its
rows, the environment and its seconds), so a run cut short keeps the suites that finished; at the end one
JSON holds them all (environment: device, versions, git commit, command; rows of every suite), with a
markdown table beside it (same name, .md). Plot it with ``python3 benchmarks/plot.py RESULTS.json``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, markdown, write_results

SUITES = {  # suite -> module, imported when its suite runs
    "conditioned_attention": "benchmarks.bench_conditioned_attention",
    "max_similarity": "benchmarks.bench_max_similarity",
    "weighted_mask": "benchmarks.bench_weighted_mask",
    "model": "benchmarks.bench_model",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--out", required=True, help="results JSON; the markdown table goes beside it")
    parser.add_argument("--quick", action="store_true", help="reduced shapes and repetitions")
    parser.add_argument("--suites", nargs="+", choices=sorted(SUITES), default=list(SUITES))
    parser.add_argument(
        "--session",
        action="store_true",
        help="the GPU session's scope: paper shapes and B=256, fewer repetitions (op suites only)",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.session and "model" in args.suites:
        parser.error("--session covers the op suites; the model's is bench_model.py --compile --session")
    out = Path(args.out)
    env = environment(args.device)
    rows, timings = [], {}
    for name in args.suites:
        start = time.perf_counter()
        options = {"session": True} if args.session else {}
        try:
            suite_rows = importlib.import_module(SUITES[name]).run(args.device, args.quick, **options)
        except Exception as err:  # a broken suite is reported in the results, the others still run
            traceback.print_exc()
            suite_rows = [{"op": name, "impl": "suite", "pass": "", "error": f"{type(err).__name__}: {err}"}]
        rows += suite_rows
        timings[name] = round(time.perf_counter() - start, 1)
        suite = {"environment": env, "quick": args.quick, "session": args.session, "suite": name,
                 "suite_seconds": timings[name], "rows": suite_rows}  # fmt: skip
        suite_path = write_results(name, suite, out.with_name(f"{out.stem}.{name}.json"))
        print(f"{name}: {timings[name]} s, {suite_path}", flush=True)
    payload = {
        "environment": env,
        "quick": args.quick,
        "session": args.session,
        "suite_seconds": timings,
        "rows": rows,
    }
    path = write_results("run_all", payload, out)
    path.with_suffix(".md").write_text(markdown(payload))
    print(f"{path}\n{path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
