"""Benchmark of the training input pipeline: images per second delivered to the step.

Implementations, on the same cached synthetic split (``make_synthetic`` at the image size, grey pictures
as QaTa-COV19's; every step of the augmentation costs the same on colour ones), the paper's augmentation
with notes moved in the radiological frame, batch 32, drop_last, one epoch per timed round:

  dataloader           today's path without a cache: DataLoader (no workers: one process) over the
                       preloaded LViTDataset, TrainAugmentation per sample, NoteCollator tokenising each
                       batch
  cached_batched       CachedLoader: the split as uint8 tensors, batches gathered by index, the
                       augmentation drawn per batch on the host and applied by the batched ops on --device,
                       tokens from a NoteTable; on CUDA with the split in host memory (batches pinned and
                       copied) and, as cached_batched_gpu_cache, on the GPU
  cached_batched_host  (CPU only) the host's share of cached_batched when the ops run on a GPU: gathering
                       the uint8 rows, drawing the parameters, the notes' rows and tokens; the float
                       conversion and the ops themselves left out (the device's work)

Rounds alternate between the implementations, so a change in the machine's load hits each alike; a row
gives the median and every round's images/s, and the 1-minute load average before and after. With
--max-load the measurement waits (up to --wait-s) for the load average to fall below it.

Then each step of the augmentation alone (op "augmentation_step": blur, the intensity and colour steps,
the geometry, and all of them), the batched ops (apply_parameters) against the per-sample transform
(TrainAugmentation.apply, sample after sample) on the same drawn parameters with the other steps neutral:
the time per batch of each, on --device and on the CPU respectively. Script mode:

    python benchmarks/bench_input_pipeline.py --device cpu --threads 1 --max-load 1.5
    python benchmarks/bench_input_pipeline.py --device cuda
    python benchmarks/bench_input_pipeline.py --device cpu --quick     # 64x64, a smoke test
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from reclmis.config import RecLMISConfig
from reclmis.data import LViTDataset, TrainAugmentation, make_synthetic
from reclmis.data.augment import apply_parameters, draw_parameters
from reclmis.data.cached import CachedLoader, CachedSplit
from reclmis.data.note_table import NoteTable
from reclmis.data.transforms import AugmentParameters
from reclmis.model import NoteTokenizer
from reclmis.train.trainer import NoteCollator

try:
    from benchmarks.common import environment, measure, script_parser, write_results
except ModuleNotFoundError:  # run as a script: benchmarks/ itself is on sys.path
    from common import environment, measure, script_parser, write_results

FRAME = "radiological"


def _pipelines(root: str, image_size: int, batch: int, device: str) -> dict[str, Callable[[], int]]:
    """One epoch of each implementation, returning the images it delivered (on the device when it returns)."""
    config = RecLMISConfig.preset("paper")
    dataset = LViTDataset(root, "train", image_size, transform=TrainAugmentation(note_frame=FRAME))
    dataset.preload()
    tokenizer = NoteTokenizer.train(dataset.texts, config.max_text_len, config.vocab_size)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    augmentation = TrainAugmentation(note_frame=FRAME)
    split = CachedSplit(*dataset.stacked(), dataset.names)
    target = torch.device(device)
    notes = NoteTable(dataset.texts, tokenizer, FRAME).to(target)

    def drain(batches) -> int:
        delivered = 0
        for batch in batches:
            delivered += batch["images"].shape[0]
        if target.type == "cuda":
            torch.cuda.synchronize()
        return delivered

    dataloader = DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=0, collate_fn=NoteCollator(tokenizer),
        pin_memory=target.type == "cuda", drop_last=True,
    )  # fmt: skip

    def today() -> int:
        return drain({k: v.to(target) if torch.is_tensor(v) else v for k, v in b.items()} for b in dataloader)

    def cached(cache: CachedSplit) -> Callable[[], int]:
        loader = CachedLoader(
            cache, notes, sampler, batch, drop_last=True, augmentation=augmentation, device=target
        )
        return lambda: drain(loader)

    runs = {"dataloader": today, "cached_batched": cached(split)}
    if target.type == "cuda":
        runs["cached_batched_gpu_cache"] = cached(split.to(target))
    else:
        loader = CachedLoader(split, notes, sampler, batch, drop_last=True, augmentation=augmentation)

        def host_share() -> int:
            generator = torch.Generator().manual_seed(0)
            order = torch.as_tensor(list(sampler), dtype=torch.int64)
            delivered = 0
            for begin in range(0, len(loader) * batch, batch):
                samples = order[begin : begin + batch]
                images, _ = split.gather(samples, target)
                parameters = draw_parameters(augmentation, len(samples), images.shape[1], generator)
                rows, parameters = notes.follow(samples, parameters)
                notes.tokens(rows)
                delivered += len(notes.texts(rows))
            return delivered

        runs["cached_batched_host"] = host_share
    return runs


STEPS = {
    "blur": ("blur", "sigma"),
    "intensity_and_colour": (
        *("brightness_on", "brightness", "contrast_on", "contrast", "contrast_first"),
        *("saturation_on", "saturation", "hue_on", "hue"),
    ),
    "geometry": ("geometry", "quarter_turns", "flip_dim", "angle"),
}


def step_rows(image_size: int, batch: int, device: str, quick: bool) -> list[dict]:
    """Each step alone, batched ops against the per-sample transform, on the same parameters."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(batch, 3, 8, 8, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear")
    images = (images.mul_(255).round_() / 255).to(device)  # 8-bit values, as decoded
    masks = (images[:, :1] > 0.5).float()
    host_images, host_masks = images.cpu(), masks.cpu()
    augmentation = TrainAugmentation(note_frame=FRAME)
    drawn = [draw_parameters(augmentation, batch, 3, g) for _ in range(4 if quick else 10)]
    neutral = AugmentParameters.neutral(batch, 3)
    rows = []
    for step in [*STEPS, "all"]:
        kept = {f for names in STEPS.values() for f in names} if step == "all" else set(STEPS[step])
        parameters = [
            p.replace(**{f: getattr(neutral, f) for names in STEPS.values() for f in names if f not in kept})
            for p in drawn
        ]
        cycle = iter(range(10**9))

        def batched(parameters=parameters, cycle=cycle) -> None:
            apply_parameters(images, masks, parameters[next(cycle) % len(parameters)], augmentation)
            if device == "cuda":
                torch.cuda.synchronize()

        def per_sample(parameters=parameters, cycle=cycle) -> None:
            p = parameters[next(cycle) % len(parameters)]
            for i in range(batch):
                augmentation.apply(host_images[i], host_masks[i], None, p.select(i))

        reps = len(parameters)
        timings = {
            "batched_ops": measure(batched, device, warmup=2, reps=reps),
            "per_sample": measure(per_sample, "cpu", warmup=2, reps=reps),
        }
        for impl, timing in timings.items():
            rows.append(
                {
                    "op": "augmentation_step",
                    "impl": impl,
                    "pass": step,
                    "dtype": "float32",
                    "shape": {"image_size": image_size, "batch": batch, "channels": 3},
                    "device": device if impl == "batched_ops" else "cpu",
                    **timing,
                    "images_per_s": 1e3 * batch / timing["median_ms"],
                    "speedup_vs_per_sample": timings["per_sample"]["median_ms"] / timing["median_ms"],
                    "threads": torch.get_num_threads(),
                    "load_avg_1m": os.getloadavg()[0],
                }
            )
    return rows


def _wait_for_load(max_load: float | None, wait_s: float) -> None:
    if max_load is None:
        return
    deadline = time.monotonic() + wait_s
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(30)


def run(
    device: str,
    quick: bool,
    *,
    image_size: int | None = None,
    batch: int = 32,
    images: int | None = None,
    rounds: int | None = None,
    max_load: float | None = None,
    wait_s: float = 3600.0,
) -> list[dict]:
    """One row per implementation: images/s (median over alternating rounds of one epoch each), every round's
    figure, the speed-up over today's loader and the load average around the measurement."""
    image_size = image_size or (64 if quick else 224)
    images = images or (64 if quick else 320)
    rounds = rounds or (2 if quick else 5)
    with tempfile.TemporaryDirectory() as root:
        make_synthetic(root, size=image_size, n_train=images, n_val=1, n_test=1, seed=0)
        runs = _pipelines(root, image_size, batch, device)
        for fn in runs.values():
            fn()  # warm-up: allocations, first calls
        _wait_for_load(max_load, wait_s)
        load_before = os.getloadavg()[0]
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                delivered = fn()
                rates[name].append(delivered / (time.perf_counter() - start))
        load = {"load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0]}
    baseline = statistics.median(rates["dataloader"])
    rows = []
    for name, values in rates.items():
        median = statistics.median(values)
        rows.append(
            {
                "op": "input_pipeline",
                "impl": name,
                "pass": "epoch",
                "dtype": "float32",
                "shape": {"image_size": image_size, "batch": batch, "images": images, "channels": 3},
                "images_per_s": median,
                "round_images_per_s": values,
                "median_ms": 1e3 * batch / median,  # per batch
                "speedup_vs_dataloader": median / baseline,
                "threads": torch.get_num_threads(),
                **load,
            }
        )
    return rows + step_rows(image_size, batch, device, quick)


@pytest.mark.parametrize("impl", ["dataloader", "cached_batched", "cached_batched_host"])
def test_bench_input_pipeline_cpu(benchmark, tmp_path, impl: str) -> None:
    make_synthetic(tmp_path, size=64, n_train=64, n_val=1, n_test=1, seed=0)
    benchmark(_pipelines(str(tmp_path), 64, 32, "cpu")[impl])


def main() -> None:
    parser = script_parser(__doc__, "input_pipeline", "64x64 and 64 images: a smoke test")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (64 with --quick)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=None, help="training images (default 320)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed epochs per implementation (default 5)"
    )
    parser.add_argument(
        "--max-load", type=float, default=None, help="wait for a 1-minute load average below this"
    )
    parser.add_argument("--wait-s", type=float, default=3600.0, help="the longest wait for --max-load")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = run(
        args.device, args.quick, image_size=args.image_size, batch=args.batch, images=args.images,
        rounds=args.rounds, max_load=args.max_load, wait_s=args.wait_s,
    )  # fmt: skip
    for row in rows:
        if row["op"] == "input_pipeline":
            print(
                f"{row['impl']:<26} {row['images_per_s']:9.1f} images/s  x{row['speedup_vs_dataloader']:6.2f} vs "
                f"dataloader  (load {row['load_avg_1m_before']:.2f} -> {row['load_avg_1m_after']:.2f})"
            )
        else:
            print(
                f"{row['pass']:<22} {row['impl']:<12} {row['median_ms']:8.2f} ms/batch  "
                f"x{row['speedup_vs_per_sample']:5.2f} vs per sample"
            )
    payload: dict[str, Any] = {"environment": environment(args.device), "rows": rows}
    path = write_results(f"input_pipeline_{args.device}", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
