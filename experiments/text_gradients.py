"""Who trains the text tower? At initialisation, the gradient that each term of Eq. 11 sends into the text
tower trained from scratch (text_encoder and text_projection), for a recipe's model on its training images
(no augmentation, train mode): the norm of each term's own gradient (unweighted), and the norms of the
summed auxiliary gradient (L_V2T, L_T2V, L_CCL) and of the segmentation gradient (L_Dice, L_BCE) under the
official weights and under the auxiliary losses at a tenth and at a hundredth. Averaged over the first
batches of the split. The model has CI's residual injection, as when the study was made: under the gated
injection (the default) the segmentation loss sends the tower no gradient at initialisation, by design.

    python experiments/text_gradients.py --recipe configs/synthetic_tiny.yaml --seeds 0 1 2 3 \\
        --out experiments/results/text_gradients_demo_cpu.json      # the demo's generated data, per seed
    python experiments/text_gradients.py --recipe configs/monuseg_cpu.yaml --data ../shared/data/monuseg \\
        --seeds 0 1 2 --out experiments/results/text_gradients_monuseg_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import environment, write_study
from experiments.variants import RESIDUAL, auxiliary_weights
from reclmis.config import AUXILIARY_TERMS, SEGMENTATION_TERMS, LossWeights, load_recipe
from reclmis.data import LViTDataset, make_synthetic
from reclmis.model import RecLMIS

WEIGHTINGS = {
    "official": LossWeights(),
    "auxiliary_tenth": LossWeights(**auxiliary_weights(10)),
    "auxiliary_hundredth": LossWeights(**auxiliary_weights(100)),  # the demo recipe's
}


def _grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> tuple[torch.Tensor | None, ...]:
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def _norm(grads: tuple[torch.Tensor | None, ...]) -> float:
    return sum(g.float().pow(2).sum() for g in grads if g is not None).sqrt().item()


def text_gradients(recipe: Path, data: Path, seed: int, batches: int) -> dict:
    model_config, train_config = load_recipe(recipe)
    model_config = model_config.replace(**RESIDUAL)
    if model_config.text_encoder is not None:
        raise ValueError(f"{recipe}: the text tower is loaded (text_encoder), not trained from scratch")
    train = LViTDataset(data, "train", model_config.image_size)
    size = train_config.batch_size
    if len(train) < batches * size:
        raise ValueError(f"{data}: {len(train)} training images, fewer than {batches} batches of {size}")
    torch.manual_seed(seed)
    model = RecLMIS.build(model_config, [train[i]["text"] for i in range(len(train))]).train()
    params = [p for n, p in model.named_parameters() if n.startswith(("text_encoder.", "text_projection."))]
    terms = AUXILIARY_TERMS + SEGMENTATION_TERMS
    raw = {name: 0.0 for name in terms}
    summed = {(w, part): 0.0 for w in WEIGHTINGS for part in ("auxiliary", "segmentation")}
    for b in range(batches):
        items = [train[i] for i in range(b * size, (b + 1) * size)]
        images = torch.stack([item["image"] for item in items])
        masks = torch.stack([item["mask"] for item in items])
        losses = model(images, *model.tokenize([item["text"] for item in items]), masks).losses
        for name in terms:
            raw[name] += _norm(_grad(losses[name], params)) / batches
        for wname, w in WEIGHTINGS.items():
            weight = w.per_term()
            for part, names in (("auxiliary", AUXILIARY_TERMS), ("segmentation", SEGMENTATION_TERMS)):
                loss = sum(weight[n] * losses[n] for n in names)
                summed[wname, part] += _norm(_grad(loss, params)) / batches
    weighted = {
        wname: {
            "weights": dataclasses.asdict(w),
            "auxiliary": summed[wname, "auxiliary"],
            "segmentation": summed[wname, "segmentation"],
            "auxiliary_over_segmentation": summed[wname, "auxiliary"] / summed[wname, "segmentation"],
        }
        for wname, w in WEIGHTINGS.items()
    }
    return {"seed": seed, "batches": batches, "batch_size": size, "unweighted": raw, "weighted": weighted}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", required=True, help="a YAML recipe whose text tower trains from scratch")
    parser.add_argument("--data", default=None, help="LViT layout (default: the demo's generated data)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--out", default=None, help="default experiments/results/text_gradients_cpu.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            data = Path(args.data) if args.data else make_synthetic(Path(scratch) / f"data{seed}", seed=seed)
            rows.append(text_gradients(Path(args.recipe), data, seed, args.batches))
            weighted = rows[-1]["weighted"]
            print(f"seed {seed}: auxiliary / segmentation gradient into the text tower "
                  f"{weighted['official']['auxiliary_over_segmentation']:.1f}x (official weights), "
                  f"{weighted['auxiliary_tenth']['auxiliary_over_segmentation']:.1f}x (a tenth), "
                  f"{weighted['auxiliary_hundredth']['auxiliary_over_segmentation']:.2f}x (a hundredth)")  # fmt: skip
    payload = {"environment": environment("cpu"), "recipe": Path(args.recipe).name, "rows": rows}
    print(write_study("text_gradients_cpu", payload, args.out))


if __name__ == "__main__":
    main()
