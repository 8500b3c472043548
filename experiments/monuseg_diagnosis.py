"""Where do the MoNuSeg text branch's points go? For runs of experiments/monuseg_cpu.py (folders under its
--runs): each run's training Dice (metrics.csv, mean of the last 10 epochs: augmented images, dropout on)
and, for models with a text branch, the scales at Conditioned Interaction at best.pt on the 24 training
images (eval mode, no augmentation): the RMS of stage4, of E (the projected note, valid tokens), of V (CI's
patch-embedded tokens with their position embedding) and of what the image attention adds to V, MHA(V, E')
(after the LayerNorm where ``interaction_norm`` is on), with the part of it that varies across the patches
of an image (RMS after subtracting each image's mean token). A text-off model has a higher training Dice
than the full one when the text branch costs fitting power; an added term far larger than V says the
residual V' = V + MHA(V, E') is ruled by the attention.

    python experiments/monuseg_diagnosis.py --data ../shared/data/monuseg --runs /tmp/monuseg_runs \\
        reclmis-seed0 no_text-seed0 --out experiments/results/monuseg_diagnosis_cpu.json

Diagnoses made at different times (run folders that are gone keep their rows) are gathered, each row with
its own environment, by

    python experiments/monuseg_diagnosis.py --combine experiments/results/monuseg_diagnosis_cpu.json new.json
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import environment, gather_rows, write_study
from reclmis.data import LViTDataset
from reclmis.model import RecLMIS
from reclmis.train import model_from_checkpoint


def _rms(t: torch.Tensor) -> float:
    return t.float().pow(2).mean().sqrt().item()


@torch.no_grad()
def ci_scales(model: RecLMIS, images: torch.Tensor, notes: Sequence[str]) -> dict[str, float]:
    """The RMS of CI's inputs and of the image attention's contribution, read by hooks during one eval
    forward pass (so the numbers are those of the model's own code path)."""
    ci, seen = model.interaction, {}
    hooks = [
        ci.register_forward_pre_hook(lambda m, args: seen.update(stage4=args[0], e=args[1], mask=args[2])),
        ci.image_attention.register_forward_pre_hook(lambda m, args: seen.update(v=args[0])),
        ci.image_norm.register_forward_hook(lambda m, args, out: seen.update(added=out)),
    ]
    was_training = model.training
    try:
        model.eval()
        model(images, *model.tokenize(notes))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    added = seen["added"]  # (B, N, C)
    return {
        "rms_stage4": _rms(seen["stage4"]),
        "rms_E": _rms(seen["e"][seen["mask"]]),
        "rms_V": _rms(seen["v"]),
        "rms_mha_v_e": _rms(added),
        "rms_mha_v_e_across_patches": _rms(added - added.mean(1, keepdim=True)),
        "ratio_mha_to_V": _rms(added) / _rms(seen["v"]),
    }


def diagnose(run: Path, data: str | Path) -> dict:
    with (run / "metrics.csv").open(newline="") as handle:
        epochs = list(csv.DictReader(handle))
    if len(epochs) < 10:
        raise ValueError(f"{run / 'metrics.csv'}: {len(epochs)} epochs, the diagnosis needs at least 10")
    last10 = [float(e["train_dice_score"]) for e in epochs[-10:]]
    row = {"run": run.name, "epochs": len(epochs), "train_dice_last10": sum(last10) / 10}
    model, state = model_from_checkpoint(run / "best.pt")
    row["best_epoch"] = state["epoch"] + 1
    if model.config.use_text:
        train = LViTDataset(data, "train", model.config.image_size)
        items = [train[i] for i in range(len(train))]
        images = torch.stack([item["image"] for item in items])
        row |= ci_scales(model, images, [item["text"] for item in items])
    return row


def combine(paths: list[str]) -> dict:
    """One diagnosis payload from several, each row with the environment of the diagnosis that made it."""
    _, rows = gather_rows(paths, same=(), run=lambda row: row["run"])
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="MoNuSeg in the LViT layout (required unless --combine)")
    parser.add_argument("--runs", help="the --runs folder of experiments/monuseg_cpu.py (unless --combine)")
    parser.add_argument("names", nargs="*", help="run folders under --runs (VARIANT-seedS)")
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="diagnosis files to gather into --out")
    parser.add_argument("--out", default=None, help="default experiments/results/monuseg_diagnosis_cpu.json")
    args = parser.parse_args()
    if args.combine:
        print(write_study("monuseg_diagnosis_cpu", combine(args.combine), args.out))
        return
    if not (args.data and args.runs and args.names):
        parser.error("--data, --runs and at least one run folder are required (unless --combine)")
    torch.set_num_threads(1)
    rows = [diagnose(Path(args.runs) / name, args.data) for name in args.names]
    payload = {"environment": environment("cpu"), "rows": rows}
    print(write_study("monuseg_diagnosis_cpu", payload, args.out))


if __name__ == "__main__":
    main()
