"""The MoNuSeg study (docs/experiments/monuseg.md): configs/monuseg_cpu.yaml trained on 2 CPU cores, then
evaluated on Test_Folder (best.pt, chosen by validation Dice, and last.pt), for the rows of the paper's
Table III that run here and this project's switches:

- gated:               the recipe as it is: the gated text injection (interaction_injection: gated), the
                       text tower trained from scratch;
- gated_minilm:        the same with the frozen pretrained all-MiniLM-L6-v2 as text encoder (notes of 12
                       tokens, its tokenizer's longest MoNuSeg note), the paper's setting of a frozen
                       pretrained tower under the official auxiliary weights;
- residual_minilm:     CI's residual injection with the frozen all-MiniLM-L6-v2: whether a pretrained
                       encoder alone closes the gap to the image-only network;
- no_text:             the text branch off (Table III, row e): a U-Net with PLAM.

The rows measured before the gated injection existed, with CI's residual injection
(interaction_injection: residual), reproduce with these variants:

- reclmis:             the recipe then (note-consistent flips and turns, same-note pairs no negatives);
- no_ccl, no_recon:    without the contrastive loss; without both reconstructions (CVR and CLR);
- no_aux:              without all three (CI alone: the note reaches the decoder, no auxiliary loss);
- aux_tenth:           the three auxiliary losses at a tenth of their weights in Eq. 11;
- aux_hundredth:       at a hundredth (the demo recipe's weights);
- gate:                the note gate in CI (interaction_gate);
- norm:                each CI attention's output layer-normalised before the residual sum (interaction_norm);
- same_note_negatives: the official contrastive loss (pairs with the same note are negatives);
- official_aug:        the official augmentation (flips and turns that leave the note as it is);
- photometric:         no flips or rotations.

Models with a text branch are also scored with shuffled and with constant notes (``reclmis evaluate
--notes``), which says how much of the score comes from reading the note.

    python experiments/monuseg_cpu.py --data ../shared/data/monuseg --out experiments/results/monuseg_cpu.json

Runs made side by side (one variant and seed per process, one thread each) are gathered into one file, each
row keeping the environment (commit, command, threads) of the run that made it:

    OMP_NUM_THREADS=1 python experiments/monuseg_cpu.py --data ../shared/data/monuseg --runs RUNS \
        --variants reclmis --seeds 1 --out /tmp/reclmis_s1.json
    python experiments/monuseg_cpu.py --combine /tmp/*_s*.json --out experiments/results/monuseg_cpu.json

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

from experiments.common import environment, gather_rows, write_study
from experiments.variants import MINILM, RESIDUAL, auxiliary_weights, with_text_encoder
from reclmis.config import load_recipe
from reclmis.data.note_probe import NOTE_PROBES
from reclmis.inference import evaluate
from reclmis.train import Trainer, model_from_checkpoint

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "monuseg_cpu.yaml"
# name -> (model config changes, train config changes)
VARIANTS = {
    "gated": ({"interaction_injection": "gated"}, {}),
    "gated_minilm": ({"text_encoder": MINILM, "max_text_len": 12}, {}),
    "residual_minilm": (RESIDUAL | {"text_encoder": MINILM, "max_text_len": 12}, {}),
    "no_text": ({"use_text": False}, {}),
    "reclmis": (RESIDUAL, {}),
    "no_ccl": (RESIDUAL | {"use_ccl": False}, {}),
    "no_recon": (RESIDUAL | {"use_cvr": False, "use_clr": False}, {}),
    "no_aux": (RESIDUAL | {"use_ccl": False, "use_cvr": False, "use_clr": False}, {}),
    "aux_tenth": (RESIDUAL | {"loss_weights": auxiliary_weights(10)}, {}),
    "aux_hundredth": (RESIDUAL | {"loss_weights": auxiliary_weights(100)}, {}),
    "gate": (RESIDUAL | {"interaction_gate": True}, {}),
    "norm": (RESIDUAL | {"interaction_norm": True}, {}),
    "same_note_negatives": (RESIDUAL | {"ccl_exclude_same_notes": False}, {}),
    "official_aug": (RESIDUAL, {"augment": "official"}),
    "photometric": (RESIDUAL, {"augment": "photometric"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="MoNuSeg in the LViT layout (required unless --combine)")
    parser.add_argument(
        "--out", default=None, help="results JSON (default experiments/results/monuseg_cpu.json)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--runs", default=None, help="keep the run folders here (default: a temporary folder)"
    )
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="results files to gather into --out")
    args = parser.parse_args()
    if args.combine:
        print(write_study("monuseg_cpu", combine(args.combine), args.out))
        return
    if args.data is None:
        parser.error("--data is required (unless --combine)")
    model_config, train_config = load_recipe(RECIPE)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        runs = Path(args.runs or scratch)
        for name in args.variants:
            for seed in args.seeds:
                out = runs / f"{name}-seed{seed}"
                model_changes, train_changes = VARIANTS[name]
                model_changes = with_text_encoder(model_changes)
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
                row = {"variant": name, "seed": seed, "train_minutes": round(minutes, 1), "resumed": resume,
                       "best_epoch": state["epoch"] + 1, "val_dice": state["best_dice"],
                       "test": evaluate(model, args.data, "test", progress=False)}  # fmt: skip
                if model.config.use_text:
                    for probe in NOTE_PROBES:
                        row[f"test_{probe}_notes"] = evaluate(
                            model, args.data, "test", progress=False, notes=probe
                        )
                last, _ = model_from_checkpoint(out / "last.pt")
                row["test_last"] = evaluate(last, args.data, "test", progress=False)
                rows.append(row)
                probes = "".join(f", {p} notes {100 * row[f'test_{p}_notes']['dice']:.2f}" for p in NOTE_PROBES
                                 if f"test_{p}_notes" in row)  # fmt: skip
                print(f"{name} seed {seed}: test Dice {100 * row['test']['dice']:.2f} (last.pt "
                      f"{100 * row['test_last']['dice']:.2f}{probes}; {minutes:.1f} min, best epoch "
                      f"{state['epoch'] + 1})", flush=True)  # fmt: skip
    env = environment("cpu") | {"torch_threads": torch.get_num_threads()}
    print(write_study("monuseg_cpu", {"environment": env} | _tables(RECIPE.name, rows), args.out))


def combine(paths: list[str]) -> dict:
    """One results payload from several of the same recipe, each row with its run's environment."""
    parts, rows = gather_rows(paths, same=("recipe",), run=lambda row: (row["variant"], row["seed"]))
    return _tables(parts[0]["recipe"], rows)


def _tables(recipe: str, rows: list[dict]) -> dict:
    """The payload's recipe, variants (their config changes), rows and per-variant summary over seeds."""
    names = list(dict.fromkeys(row["variant"] for row in rows))
    return {
        "recipe": recipe,
        "variants": {name: {"model": VARIANTS[name][0], "train": VARIANTS[name][1]} for name in names},
        "rows": rows,
        "summary": {name: _summary([r for r in rows if r["variant"] == name]) for name in names},
    }


def _summary(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every score of the runs (best.pt, last.pt, probes)."""
    scores = [key for key in runs[0] if key.startswith("test")]
    return {
        key: {
            metric: {
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
            for metric in ("dice", "iou", "pooled_dice", "pooled_iou")
            if all(metric in r[key] for r in runs)
            for values in [[r[key][metric] for r in runs]]
        }
        for key in scores
    }


def _training_minutes(metrics_csv: Path) -> float:
    """Training plus validation time of a run, summed over its epochs (a resumed run counts each once)."""
    with metrics_csv.open() as f:
        return sum(float(row["seconds"]) for row in csv.DictReader(f)) / 60


if __name__ == "__main__":
    main()
