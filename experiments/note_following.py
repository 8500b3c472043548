"""Does the model read the note? The demo recipe on generated data, evaluated on the test split and on its
counterfactual copy (same images, notes and masks naming other lesions), for these variants:

- reclmis:           the recipe as it is (the default model; augment: full, the notes' positional words
                     moved with every flip and turn; the auxiliary losses at a hundredth of the official
                     weights);
- gated:             the gated text injection (interaction_injection: gated, the default);
- gated_minilm:      the same with the frozen pretrained all-MiniLM-L6-v2 as text encoder;
- residual:          CI's residual injection (interaction_injection: residual, the default before the gated);
- photometric:       blur and colour augmentation only (no flips or rotations);
- official_aug:      the official augmentation: flips and rotations that leave the note as it is;
- gate:              the note gate in CI (interaction_gate; needs the residual injection);
- norm:              each CI attention's output layer-normalised before the residual sum (interaction_norm);
- no_ccl:            without the contrastive loss L_CCL (paper Table III);
- no_aux:            CI alone: without L_CCL and both reconstructions (CVR, CLR);
- aux_tenth:         the three auxiliary losses (CVR, CLR, L_CCL) at a tenth of the official weights;
- aux_hundredth:     at a hundredth (the recipe's own weights);
- official_weights:  at the official weights (the model's default and the paper recipes');
- same_note_negatives: the official contrastive loss, whose negatives include pairs of images with the same
                     note;
- official_ci:       CI exactly as the official code (interaction_injection: official, no residual sums: the
                     note reaches the decoder only through attention patterns);
- official_causal:   the reconstructors with the official code's causal mask;
- single_cosine:     one cosine annealing over the 40 epochs (down to 1e-6) in place of the default, official
                     warm restarts every 10 epochs down to 1e-4;
- no_text:           the text branch switched off (paper Table III, row e), a U-Net with PLAM;
- linear_dice_seg:   L_seg = 5 (Dice + BCE) with a linear Dice denominator (the official: 5 (0.5 Dice + 0.5 BCE),
                     squared denominator);
- no_memory:         reconstructors without the memory stack (the masked tokens attend to the raw source).

A model that follows the note scores about the same on both splits; one that ignores it cannot, because the
counterfactual masks cover other lesions of the same pictures. Each row also holds the test split scored
with shuffled notes (another image's) and with one constant note (``reclmis evaluate --notes``): a model
that reads its note loses Dice there. Rows keep the validation Dice of every epoch too, which shows when a
model starts reading its note (a jump from the image-only plateau). The tables of
docs/experiments/note_following.md are generated from these results files (experiments/tables.py).

    python experiments/note_following.py --out experiments/results/note_following_cpu.json
    python experiments/note_following.py --threads 1 --variants gate --out /tmp/gate.json   # one variant alone
    python experiments/note_following.py --combine /tmp/*.json --out experiments/results/note_following_cpu.json

``--combine`` gathers the rows of several results files (runs made side by side, one thread each) into one,
each row keeping the environment (commit, command, threads) of the run that made it.
    python experiments/note_following.py --variants linear_dice_seg no_memory \
        --out experiments/results/note_following_ablations_cpu.json
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import environment, gather_rows, write_study
from experiments.variants import MINILM, RESIDUAL, auxiliary_weights, with_text_encoder
from reclmis.config import load_recipe
from reclmis.data import make_synthetic
from reclmis.data.note_probe import NOTE_PROBES
from reclmis.inference import evaluate
from reclmis.train import Trainer, model_from_checkpoint

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "synthetic_tiny.yaml"
VARIANTS = {  # changes to the recipe's model and train sections
    "reclmis": {},
    "gated": {"model": {"interaction_injection": "gated"}},
    "gated_minilm": {"model": {"text_encoder": MINILM, "max_text_len": 28}},  # its tokenizer's notes: <= 25
    "zero_init": {"model": {"interaction_injection": "zero_init"}},
    "gated_fast": {"model": {"interaction_injection": "gated", "injection_gate_speed": 50.0}},
    "gated_official_weights": {
        "model": {"interaction_injection": "gated", "loss_weights": auxiliary_weights()}
    },
    "zero_init_official_weights": {
        "model": {"interaction_injection": "zero_init", "loss_weights": auxiliary_weights()}
    },
    "zero_init_minilm": {
        "model": {"interaction_injection": "zero_init", "text_encoder": MINILM, "max_text_len": 28}
    },
    "residual": {"model": RESIDUAL},
    "photometric": {"train": {"augment": "photometric"}},
    "official_aug": {"train": {"augment": "official"}},
    "gate": {"model": RESIDUAL | {"interaction_gate": True}},
    "norm": {"model": {"interaction_norm": True}},
    "no_ccl": {"model": {"use_ccl": False}},
    "no_aux": {"model": {"use_ccl": False, "use_cvr": False, "use_clr": False}},
    "aux_tenth": {"model": {"loss_weights": auxiliary_weights(10)}},
    "aux_hundredth": {"model": {"loss_weights": auxiliary_weights(100)}},
    "official_weights": {"model": {"loss_weights": auxiliary_weights()}},
    "same_note_negatives": {"model": {"ccl_exclude_same_notes": False}},
    "official_ci": {"model": {"interaction_injection": "official"}},
    "official_causal": {"model": {"recon_causal": True}},
    "single_cosine": {"train": {"scheduler": "cosine", "min_lr": 1e-6}},
    "no_text": {"model": {"use_text": False}},
    "linear_dice_seg": {
        "model": {"loss_weights": {"dice": 1.0, "bce": 1.0}, "dice_squared": False, "dice_smooth": 1.0}
    },
    "no_memory": {"model": {"recon_memory_layers": 0}},
}


def run(work: Path, seed: int, variants: list[str]) -> list[dict]:
    data = make_synthetic(work / "data", seed=seed)
    model_config, train_config = load_recipe(RECIPE)
    train_config.seed = seed
    rows = []
    for name in variants:
        out = work / name
        changes = VARIANTS[name]
        model_cfg = model_config.replace(**with_text_encoder(changes.get("model", {})))
        train_cfg = dataclasses.replace(train_config, **changes.get("train", {}))
        start = time.perf_counter()
        Trainer(model_cfg, train_cfg, data, out, progress=False).fit()
        minutes = (time.perf_counter() - start) / 60
        model, state = model_from_checkpoint(out / "best.pt")
        with (out / "metrics.csv").open(newline="") as handle:
            epochs = list(csv.DictReader(handle))
        row = {"variant": name, "changes": changes, "train_minutes": round(minutes, 2),
               "best_epoch": state["epoch"] + 1,
               "last_epoch_train": {k[6:]: float(v) for k, v in epochs[-1].items() if k.startswith("train_")},
               "val_dice_per_epoch": [round(float(e["val_dice"]), 4) for e in epochs]}  # fmt: skip
        for split, root in (("test", data), ("counterfactual", data / "counterfactual")):
            metrics = evaluate(model, root, "test", progress=False)
            row[split] = {"dice": metrics["dice"], "iou": metrics["iou"], "n": metrics["n"]}
        if model.config.use_text:
            for probe in NOTE_PROBES:
                metrics = evaluate(model, data, "test", progress=False, notes=probe)
                row[f"test_{probe}_notes"] = {
                    "dice": metrics["dice"],
                    "iou": metrics["iou"],
                    "n": metrics["n"],
                }
        rows.append(row)
        print(f"{name:<12} test Dice {row['test']['dice']:.4f}  counterfactual Dice "
              f"{row['counterfactual']['dice']:.4f}  ({minutes:.1f} min)", flush=True)  # fmt: skip
    return rows


def combine(paths: list[str]) -> dict:
    """One results payload from several, each row with its run's environment; same recipe and seed only."""
    parts, rows = gather_rows(paths, same=("recipe", "seed"), run=lambda row: row["variant"])
    return {"recipe": parts[0]["recipe"], "seed": parts[0]["seed"], "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=None, help="results JSON (default experiments/results/note_following_cpu.json)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        default=["reclmis", "photometric", "official_ci", "no_text"],
    )
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="results files to gather into --out")
    args = parser.parse_args()
    if args.combine:
        print(write_study("note_following_cpu", combine(args.combine), args.out))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        rows = run(Path(work), args.seed, args.variants)
    payload = {"environment": environment("cpu"), "recipe": str(RECIPE.name), "seed": args.seed, "rows": rows}
    payload["environment"]["torch_threads"] = torch.get_num_threads()
    print(write_study("note_following_cpu", payload, args.out))


if __name__ == "__main__":
    main()
