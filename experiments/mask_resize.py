"""How much the official mask resizing changes the ground truth: every mask of a dataset resized to the
model's input nearest (this project's default) and bilinear then > 0 (the official loader), per split.
Reports the foreground pixels of each, the growth, and the mean per-image Dice of the nearest masks
scored against the bilinear ones (what a perfect nearest-trained model loses under the official masks).

    python experiments/mask_resize.py --data ../shared/data/monuseg --out experiments/results/mask_resize_monuseg.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import environment, write_study
from reclmis.data import LViTDataset
from reclmis.metrics import dice_iou


def measure_split(root: Path, split: str, size: int) -> dict:
    masks = {
        mode: [item["mask"] > 0.5 for item in LViTDataset(root, split, size, cache=False, mask_resize=mode)]
        for mode in ("nearest", "bilinear")
    }
    nearest, bilinear = (sum(int(m.sum()) for m in masks[mode]) for mode in ("nearest", "bilinear"))
    dice = [
        float(dice_iou(a[None], b[None])[0]) for a, b in zip(masks["nearest"], masks["bilinear"], strict=True)
    ]
    return {
        "split": split,
        "images": len(dice),
        "foreground_nearest": nearest,
        "foreground_bilinear": bilinear,
        "growth": bilinear / nearest - 1,
        "dice_nearest_vs_bilinear": sum(dice) / len(dice),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="dataset root in the LViT layout")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", help="results JSON (default experiments/results/mask_resize_<data>.json)")
    args = parser.parse_args()
    root = Path(args.data)
    rows = [measure_split(root, split, args.image_size) for split in ("train", "val", "test")]
    for row in rows:
        print(f"{row['split']:<6} {row['images']:>4} images  foreground +{100 * row['growth']:.1f}%  "
              f"Dice(nearest, bilinear) {100 * row['dice_nearest_vs_bilinear']:.2f}")  # fmt: skip
    payload = {
        "environment": environment("cpu"),
        "data": root.name,
        "image_size": args.image_size,
        "rows": rows,
    }
    print(write_study(f"mask_resize_{root.name}", payload, args.out))


if __name__ == "__main__":
    main()
