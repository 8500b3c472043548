"""The MoNuSeg result of the README: configs/monuseg_cpu.yaml trained on 2 CPU cores, then evaluated on
Test_Folder, for two seeds, with the text branch on (RecLMIS) and off (paper Table III, row e).

    python benchmarks/monuseg_cpu.py --data ../shared/data/monuseg --out benchmarks/results/monuseg_cpu.json

Each run's training time is the sum of its epoch times in metrics.csv; the recipe is sized to stay under
40 minutes per run on 2 cores. With --runs, an interrupted run is continued from its last.pt (exact resume)
and a finished one is only evaluated, so the script can be rerun after a crash or a time limit.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, write_results
from reclmis.config import load_recipe
from reclmis.inference import evaluate
from reclmis.train import Trainer, model_from_checkpoint

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "monuseg_cpu.yaml"
# name -> (model config changes, train config changes); the first two are the README's table
VARIANTS = {
    "reclmis": ({}, {}),
    "no_text": ({"use_text": False}, {}),
    "reclmis_photometric": ({}, {"augment": "photometric"}),  # notes name positions: no flips/rotations
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="MoNuSeg in the LViT layout")
    parser.add_argument(
        "--out", default=None, help="results JSON (default benchmarks/results/monuseg_cpu.json)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["reclmis", "no_text"])
    parser.add_argument(
        "--runs", default=None, help="keep the run folders here (default: a temporary folder)"
    )
    args = parser.parse_args()
    model_config, train_config = load_recipe(RECIPE)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        runs = Path(args.runs or scratch)
        for name in args.variants:
            for seed in args.seeds:
                out = runs / f"{name}-seed{seed}"
                model_changes, train_changes = VARIANTS[name]
                resume = (out / "last.pt").is_file()
                Trainer(
                    model_config.replace(**model_changes),
                    dataclasses.replace(train_config, seed=seed, **train_changes),
                    args.data,
                    out,
                    resume=resume,
                    progress=False,
                ).fit()
                minutes = _training_minutes(out / "metrics.csv")
                model, state = model_from_checkpoint(out / "best.pt")
                test = evaluate(model, args.data, "test", progress=False)
                rows.append({"variant": name, "seed": seed, "train_minutes": round(minutes, 1), "resumed": resume,
                             "best_epoch": state["epoch"] + 1, "val_dice": state["best_dice"], "test": test})  # fmt: skip
                print(f"{name} seed {seed}: test Dice {100 * test['dice']:.2f} IoU {100 * test['iou']:.2f} "
                      f"({minutes:.1f} min, best epoch {state['epoch'] + 1})", flush=True)  # fmt: skip
    summary = {}
    for name in args.variants:
        runs_of = [r["test"] for r in rows if r["variant"] == name]
        summary[name] = {
            metric: {"mean": statistics.mean(r[metric] for r in runs_of),
                     "std": statistics.stdev(r[metric] for r in runs_of) if len(runs_of) > 1 else 0.0}
            for metric in ("dice", "iou")
        }  # fmt: skip
    env = environment("cpu") | {"torch_threads": torch.get_num_threads()}
    variants = {name: {"model": VARIANTS[name][0], "train": VARIANTS[name][1]} for name in args.variants}
    payload = {
        "environment": env,
        "recipe": RECIPE.name,
        "variants": variants,
        "rows": rows,
        "summary": summary,
    }
    print(write_results("monuseg_cpu", payload, args.out))


def _training_minutes(metrics_csv: Path) -> float:
    """Training plus validation time of a run, summed over its epochs (a resumed run counts each once)."""
    with metrics_csv.open() as f:
        return sum(float(row["seconds"]) for row in csv.DictReader(f)) / 60


if __name__ == "__main__":
    main()
