"""Gathers what `make demo` wrote (DEMO/test.json with its shuffled-notes probe, DEMO/counterfactual.json and
DEMO/run/metrics.csv) into one results file with the environment of the interpreter that runs it. Run it
with the demo's own environment, from the clone that ran `make demo`:

    git clone <main> demo-clone && cd demo-clone && make demo
    .venv/bin/python experiments/demo_results.py demo --out experiments/results/make_demo_cpu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import environment, write_study


def demo_results(demo: Path) -> dict:
    paths = {name: demo / name for name in ("test.json", "counterfactual.json", "run/metrics.csv")}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"not written by a finished `make demo`: {', '.join(missing)}")
    test = json.loads(paths["test.json"].read_text())
    if "probe" not in test:
        raise ValueError(f"{paths['test.json']}: no 'probe' (make demo evaluates with --notes shuffled)")
    with paths["run/metrics.csv"].open(newline="") as handle:
        epochs = list(csv.DictReader(handle))
    return {
        "test": {k: v for k, v in test.items() if k != "probe"},
        "test_shuffled_notes": test["probe"],
        "counterfactual": json.loads(paths["counterfactual.json"].read_text()),
        "val_dice_per_epoch": [round(float(e["val_dice"]), 4) for e in epochs],
        "train_minutes": round(sum(float(e["seconds"]) for e in epochs) / 60, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("demo", help="the folder `make demo` wrote (its DEMO, default demo)")
    parser.add_argument("--out", default=None, help="default experiments/results/make_demo_cpu.json")
    parser.add_argument("--note", default=None, help="a remark kept with the environment (e.g. the load)")
    args = parser.parse_args()
    env = environment("cpu")
    env["command"] = "git clone <main> demo-clone && cd demo-clone && make demo"
    if args.note:
        env["note"] = args.note
    payload = {"environment": env, "recipe": "configs/synthetic_tiny.yaml", **demo_results(Path(args.demo))}
    path = write_study("make_demo_cpu", payload, args.out)
    print(f"{path}: test Dice {payload['test']['dice']:.4f}, shuffled notes "
          f"{payload['test_shuffled_notes']['dice']:.4f}, counterfactual {payload['counterfactual']['dice']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
