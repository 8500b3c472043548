"""Bidirectional weighted max-similarity (DESIGN 3.2 and 5): the fused Triton kernel against materialising.

Implementations, each computing S (Bi, Bt) of Eq. 4-5 (forward checked against the reference in every row):
  reference    reclmis.ops.max_similarity_reference: einsum to the (B, B, N, L) tensor in fp32, masked
               amax both ways, weighted sums; what backend="reference" runs, and the speed-up baseline
  einsum_lowp  the same in the input dtype (fp16/bf16 tensor, no fp32 upcast): the leanest eager variant
  triton       reclmis.ops.max_similarity's fused path, the custom ops reclmis::max_similarity_forward and
               _backward (CUDA only: the interpreter is no benchmark)
  triton_graphed  the same under torch.compile(mode="reduce-overhead"): its launches replayed as a CUDA
               graph, as in a compiled training step (at B=32 launch overhead is a large part of the time)

Shapes: the paper's (B=32 images x 32 texts, N=196 patches, L=18 tokens with 3..18 valid, C=512) and
B = 64, 128, 256; on CPU the reference alone at small batches. A materialising implementation running out
of memory (or failing) is a row with an "error" field.

    python3 benchmarks/bench_max_similarity.py --device cuda [--out PATH]
    python3 benchmarks/bench_max_similarity.py --device cpu --quick --out /tmp/max_similarity.json
    pytest benchmarks/bench_max_similarity.py
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from reclmis.ops.max_similarity import max_similarity_reference

try:
    from benchmarks.common import measure, script_parser, write_rows
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from common import measure, script_parser, write_rows

OP = "max_similarity"
N, L, C = 196, 18, 512
CUDA_BATCHES = (32, 64, 128, 256)
SESSION_BATCHES = (32, 256)
CPU_BATCHES, CPU_QUICK_BATCHES = (8, 16, 32), (4, 8)

Impl = Callable[..., torch.Tensor]


def einsum_lowp(img, txt, img_weight, txt_weight, txt_mask, normalize=True):
    """The reference's computation kept in the input dtype (the similarity tensor in fp16/bf16)."""
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    sim = torch.einsum("anc,blc->abnl", img, txt)
    valid = txt_mask[None, :, None, :]
    img_to_txt = (
        sim.masked_fill(~valid, float("-inf")).amax(-1).masked_fill(~txt_mask.any(-1)[None, :, None], 0)
    )
    txt_to_img = sim.amax(-2).masked_fill(~txt_mask[None], 0)
    s_img = torch.einsum("abn,an->ab", img_to_txt, img_weight.to(sim.dtype))
    s_txt = torch.einsum("abl,bl->ab", txt_to_img, txt_weight.to(sim.dtype))
    return (0.5 * (s_img + s_txt)).float()


def triton_fused(img, txt, img_weight, txt_weight, txt_mask, normalize=True):
    from reclmis.kernels.max_similarity import max_similarity_triton

    return max_similarity_triton(img, txt, img_weight, txt_weight, txt_mask, normalize=normalize)


@functools.cache
def _graphed() -> Impl:
    return torch.compile(triton_fused, mode="reduce-overhead", fullgraph=True)


def triton_graphed(img, txt, img_weight, txt_weight, txt_mask, normalize=True):
    return _graphed()(img, txt, img_weight, txt_weight, txt_mask, normalize=normalize)


IMPLS: dict[str, Impl] = {
    "reference": max_similarity_reference,
    "einsum_lowp": einsum_lowp,
    "triton": triton_fused,
    "triton_graphed": triton_graphed,
}


def unavailable(impl: str, device: str) -> str | None:
    """Why ``impl`` is not timed on ``device`` (None when it is)."""
    if impl == "reference":
        return None
    if device != "cuda" and impl.startswith("triton"):
        return "not timed on CPU: the Triton kernel needs CUDA (its CPU interpreter is a test tool)"
    if device != "cuda":
        return f"{impl} is timed on CUDA only (in fp32 on CPU it is the reference)"
    if impl.startswith("triton"):
        try:
            from reclmis.kernels import max_similarity  # noqa: F401
        except ImportError as e:
            return f"triton unavailable: {e}"
        from reclmis.kernels import _runtime

        if _runtime.interpreting():
            return "kernels were imported under TRITON_INTERPRET=1"
    return None


def make_inputs(batch: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Features, softmax weights over valid tokens, a suffix padding mask, dS."""
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(batch, N, C, generator=g), torch.randn(batch, L, C, generator=g)
    mask = torch.arange(L)[None, :] < torch.randint(3, L + 1, (batch,), generator=g)[:, None]
    img_weight = torch.randn(batch, N, generator=g).softmax(-1)
    txt_weight = torch.randn(batch, L, generator=g).masked_fill(~mask, float("-inf")).softmax(-1)
    d_s = torch.randn(batch, batch, generator=g)
    feats = [t.to(device=device, dtype=dtype) for t in (img, txt, img_weight, txt_weight)]
    return *feats, mask.to(device), d_s.to(device)


def _step(impl: Impl, inputs, backward: bool) -> Callable[[], object]:
    *feats, mask, d_s = inputs
    if not backward:

        def fwd():
            with torch.no_grad():
                return impl(*feats, mask)

        return fwd
    leaves = [t.detach().requires_grad_() for t in feats]

    def fwd_bwd():
        return torch.autograd.grad(impl(*leaves, mask), leaves, d_s)

    return fwd_bwd


def bench_batch(batch: int, dtype: torch.dtype, device: str, *, reps: int) -> list[dict]:
    """Every implementation, forward and forward+backward, at one batch size and dtype."""
    inputs = make_inputs(batch, dtype, device)
    try:
        expected = max_similarity_reference(*inputs[:5])
    except torch.cuda.OutOfMemoryError:
        expected = None
    base = {
        "op": OP,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": {"B": batch, "N": N, "L": L, "C": C},
    }
    rows, reference_ms = [], {}
    for impl in IMPLS:
        reason = unavailable(impl, device)
        for backward in (False, True):
            row = {**base, "impl": impl, "pass": "fwd+bwd" if backward else "fwd"}
            if reason is not None:
                rows.append({**row, "median_ms": None, "peak_mem_mib": None, "error": reason})
                continue
            try:
                step = _step(IMPLS[impl], inputs, backward)
                if not backward and expected is not None:
                    row["max_abs_err_vs_reference"] = (step() - expected).abs().max().item()
                row.update(measure(step, device, warmup=2, reps=reps))
            except Exception as e:  # a row with the error; the other implementations still run
                error = f"out of memory: {e}" if isinstance(e, torch.cuda.OutOfMemoryError) else repr(e)
                rows.append({**row, "median_ms": None, "peak_mem_mib": None, "error": error[:300]})
                continue
            finally:
                step = None  # drop the closure's graph before the next measurement
                if device == "cuda":
                    torch.cuda.empty_cache()
            if impl == "reference":
                reference_ms[row["pass"]] = row["median_ms"]
            ref_ms = reference_ms.get(row["pass"])  # None when the reference ran out of memory
            row["speedup_vs_reference"] = None if ref_ms is None else ref_ms / row["median_ms"]
            rows.append(row)
    return rows


def run(device: str, quick: bool, session: bool = False) -> list[dict]:
    if session:  # the GPU session's scope: the paper's batch and B=256, in bf16 (what the model trains in)
        batches, dtypes, reps = SESSION_BATCHES, (torch.bfloat16 if device == "cuda" else torch.float32,), 10
    elif device == "cuda":
        batches, dtypes, reps = CUDA_BATCHES, (torch.float16, torch.bfloat16), 10
    else:
        batches, dtypes, reps = (
            (CPU_QUICK_BATCHES if quick else CPU_BATCHES),
            (torch.float32,),
            3 if quick else 5,
        )
    return [
        row for dtype in dtypes for batch in batches for row in bench_batch(batch, dtype, device, reps=reps)
    ]


def main() -> None:
    args = script_parser(__doc__, OP, "CPU: batches 4 and 8 only").parse_args()
    rows = run(args.device, args.quick)
    path = write_rows(OP, args.device, rows, args.out)
    for row in rows:
        if row["median_ms"] is None:
            result = row["error"][:70]
        else:
            mem = "" if row["peak_mem_mib"] is None else f" {row['peak_mem_mib']:9.1f} MiB"
            speedup = row["speedup_vs_reference"]
            result = f"{row['median_ms']:9.3f} ms{mem}" + ("" if speedup is None else f"  x{speedup:.2f}")
        print(f"B={row['shape']['B']:<4d} {row['dtype']:8s} {row['impl']:14s} {row['pass']:7s} {result}")
    print(f"wrote {path}")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_bench_max_similarity(benchmark, impl, backward):
    reason = unavailable(impl, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    step = _step(IMPLS[impl], make_inputs(8, dtype, DEVICE), backward)

    def timed():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(timed)


if __name__ == "__main__":
    main()
