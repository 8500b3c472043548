"""Benchmark of weighted masking (DESIGN section 3.3) at the paper's shapes.

Implementations:
  extension    reclmis.ops.weighted_mask(backend="extension"), the compiled op of reclmis._C
  numpy_loop   the official per-row loop: each row's weights copied to the host, np.random.choice(
               replace=False, p=w/sum(w)) with the zero-weight fill-up, the mask built on the device
  multinomial  torch.multinomial(replacement=False) on the whole batch, then a scatter into the mask
  reference    the Gumbel-top-k reference of reclmis.ops

Shapes: image tokens B=32, T=196, C=512 at ratio 0.5; text tokens B=32, T=18, C=512 at ratio 0.3 with
per-row lengths; both again with C=0, which times the draw alone. On CUDA each extension row also records
whether its masks equal the CPU kernel's for the same seed. Script mode:
python3 benchmarks/bench_weighted_mask.py --device cpu|cuda [--quick] [--threads N] [--out PATH]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from reclmis.ops import weighted_mask, weighted_mask_reference
from reclmis.ops.weighted_mask import mask_counts

try:
    from benchmarks.common import measure, script_parser, write_rows
except ModuleNotFoundError:  # run as a script: benchmarks/ itself is on sys.path
    from common import measure, script_parser, write_rows

SHAPES = (
    {"B": 32, "T": 196, "C": 512, "ratio": 0.5, "lengths": False},
    {"B": 32, "T": 18, "C": 512, "ratio": 0.3, "lengths": True},
    # C = 0: the draw alone, without the pass over x that every implementation pays alike
    {"B": 32, "T": 196, "C": 0, "ratio": 0.5, "lengths": False},
    {"B": 32, "T": 18, "C": 0, "ratio": 0.3, "lengths": True},
)
SESSION_SHAPE = {"B": 256, "T": 196, "C": 512, "ratio": 0.5, "lengths": False}  # the GPU session adds it
Impl = Callable[[torch.Tensor, torch.Tensor, float, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


def numpy_loop(
    x: torch.Tensor, weight: torch.Tensor, ratio: float, lengths: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official per-row masking: a device-to-host copy and np.random.choice per row."""
    b, t = weight.shape
    mask = torch.zeros(b, t, dtype=torch.bool, device=x.device)
    lens = [t] * b if lengths is None else lengths.tolist()
    for row, n in enumerate(lens):
        if n == 0:
            continue
        k = max(1, int(n * ratio))
        p = weight[row, :n].detach().cpu().numpy().astype(np.float64)
        positive = np.flatnonzero(p > 0)
        if positive.size >= k:
            drawn = np.random.choice(n, k, replace=False, p=p / p.sum())
        else:
            fill = np.random.choice(np.flatnonzero(p == 0), k - positive.size, replace=False)
            drawn = np.concatenate([positive, fill])
        mask[row, torch.from_numpy(drawn).to(x.device)] = True
    return x * (~mask)[..., None].to(x.dtype), mask


def multinomial_scatter(
    x: torch.Tensor, weight: torch.Tensor, ratio: float, lengths: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.multinomial without replacement for the whole batch, then a scatter into the mask.

    Valid zero weights get 1e-150 and padding 1e-300 (float64), so that they are drawn only after every
    positive weight and every row has enough categories; the first k_b draws of row b are kept.
    """
    b, t = weight.shape
    lens = torch.full((b,), t, device=x.device) if lengths is None else lengths
    valid = torch.arange(t, device=x.device)[None, :] < lens[:, None]
    w = weight.double()
    w = torch.where(valid, torch.where(w > 0, w, 1e-150), 1e-300)
    k = mask_counts(lens, ratio)
    k_max = max(1, int(t * ratio)) if lengths is None else int(k.max())
    drawn = torch.multinomial(w, k_max, replacement=False)
    keep = torch.arange(k_max, device=x.device)[None, :] < k[:, None]
    mask = torch.zeros(b, t, dtype=torch.bool, device=x.device).scatter_(1, drawn, keep)
    return x * (~mask)[..., None].to(x.dtype), mask


IMPLS: dict[str, Impl] = {
    "extension": lambda x, w, r, lengths: weighted_mask(x, w, r, lengths, backend="extension"),
    "numpy_loop": numpy_loop,
    "multinomial": multinomial_scatter,
    "reference": lambda x, w, r, lengths: weighted_mask_reference(x, w, r, lengths),
}


def _inputs(shape: dict[str, Any], device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x, and weights as the model makes them: a softmax over the valid tokens, zero on padding."""
    gen = torch.Generator().manual_seed(0)
    b, t, c = shape["B"], shape["T"], shape["C"]
    x = torch.randn(b, t, c, generator=gen)
    logits = torch.randn(b, t, generator=gen)
    lengths = torch.randint(1, t + 1, (b,), generator=gen) if shape["lengths"] else None
    if lengths is not None:
        logits = logits.masked_fill(torch.arange(t)[None, :] >= lengths[:, None], float("-inf"))
    weight = logits.softmax(-1)
    return x.to(device), weight.to(device), None if lengths is None else lengths.to(device)


def _masks_equal_cpu(shape: dict[str, Any], device: str) -> bool:
    """Whether the kernel on `device` draws the same mask as the CPU kernel for the same seed."""
    x, w, lengths = _inputs(shape, device)
    on_device = weighted_mask(x, w, shape["ratio"], lengths, seed=1234, backend="extension")[1]
    on_cpu = weighted_mask(
        x.cpu(),
        w.cpu(),
        shape["ratio"],
        None if lengths is None else lengths.cpu(),
        seed=1234,
        backend="extension",
    )[1]
    return torch.equal(on_device.cpu(), on_cpu)


def _case(impl: str, shape: dict[str, Any], device: str) -> Callable[[], object]:
    """One call of `impl` on the inputs of `shape`, finished on the device when it returns."""
    x, w, lengths = _inputs(shape, device)

    def call() -> object:
        out = IMPLS[impl](x, w, shape["ratio"], lengths)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return call


def run(device: str, quick: bool, session: bool = False) -> list[dict]:
    """One row per (shape, implementation): median time, peak memory and speed-up over the numpy loop. The
    GPU session's scope: the paper shapes and image tokens at B=256, with fewer repetitions."""
    np.random.seed(0)
    torch.manual_seed(0)
    reps, warmup = (5, 2) if quick else ((50, 5) if session else (100, 10))
    rows = []
    for shape in (*SHAPES, SESSION_SHAPE) if session else SHAPES:
        timings = {
            name: measure(_case(name, shape, device), device, warmup=warmup, reps=reps) for name in IMPLS
        }
        for name, timing in timings.items():
            row = {
                "op": "weighted_mask",
                "impl": name,
                "pass": "fwd",
                "dtype": "float32",
                "shape": shape,
                **timing,
                "speedup_vs_numpy_loop": timings["numpy_loop"]["median_ms"] / timing["median_ms"],
                "speedup_vs_multinomial": timings["multinomial"]["median_ms"] / timing["median_ms"],
            }
            if device == "cuda" and name == "extension":
                row["masks_equal_cpu"] = _masks_equal_cpu(shape, device)
            rows.append(row)
    return rows


_SHAPE_IDS = [f"T{s['T']}-C{s['C']}" for s in SHAPES]


@pytest.mark.parametrize("shape", SHAPES, ids=_SHAPE_IDS)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_bench_weighted_mask_cpu(benchmark, impl: str, shape: dict[str, Any]) -> None:
    benchmark(_case(impl, shape, "cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", SHAPES, ids=_SHAPE_IDS)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_bench_weighted_mask_cuda(benchmark, impl: str, shape: dict[str, Any]) -> None:
    benchmark(_case(impl, shape, "cuda"))


def main() -> None:
    parser = script_parser(__doc__, "weighted_mask", "fewer repetitions")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = run(args.device, args.quick)
    for row in rows:
        extra = f"  masks_equal_cpu={row['masks_equal_cpu']}" if "masks_equal_cpu" in row else ""
        print(
            f"T={row['shape']['T']:<4} C={row['shape']['C']:<4} {row['impl']:<12} {row['median_ms']:9.3f} ms"
            f"  x{row['speedup_vs_numpy_loop']:7.1f} vs numpy loop  x{row['speedup_vs_multinomial']:6.1f} vs multinomial{extra}"
        )
    path = write_rows("weighted_mask", args.device, rows, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
