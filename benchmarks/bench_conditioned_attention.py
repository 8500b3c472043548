"""Conditioned cross-attention (DESIGN 3.1 and 5): the fused Triton kernels against the alternatives.

Implementations, each computing the same op (forward checked against the eager one in every row):
  eager   the official code's formulation: bmm, softmax, multiply by the condition, renormalise, bmm
          ("scale" mode multiplies the logits by the condition before the softmax); the speed-up baseline
  sdpa    scaled_dot_product_attention with keys pre-scaled by the condition ("scale") or an additive
          log(cond) bias ("reweight")
  flex    FlexAttention with a score_mod reading the condition (CUDA, compiled; failures become rows with
          an "error" field)
  triton  reclmis.kernels.conditioned_attention (CUDA only: the interpreter is no benchmark)

Shapes: CVR (B=32, H=4, Nq=196 image tokens, Nk=18 padded text tokens, D=128), CLR (Nq=18, Nk=196) and a
sweep up to B=128, Nq=784, Nk=77 (mode "reweight", the model's default). ``run(..., session=True)``: the
GPU session's scope (paper shapes and CVR at B=256, bf16).

    python3 benchmarks/bench_conditioned_attention.py --device cuda [--out PATH]
    python3 benchmarks/bench_conditioned_attention.py --device cpu --quick --out /tmp/ca.json
    pytest benchmarks/bench_conditioned_attention.py
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

from reclmis.ops.conditioned_attention import REWEIGHT_EPS

try:
    from benchmarks.common import measure, script_parser, write_rows
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from common import measure, script_parser, write_rows

OP = "conditioned_attention"
MODES = ("scale", "reweight")
PAPER_SHAPES = {
    "cvr": {"B": 32, "H": 4, "Nq": 196, "Nk": 18, "D": 128},
    "clr": {"B": 32, "H": 4, "Nq": 18, "Nk": 196, "D": 128},
}
SWEEP = [(64, 196, 18), (128, 196, 18), (32, 784, 18), (32, 196, 77), (128, 784, 77)]  # (B, Nq, Nk)
FLEX_BUDGET_S = 45.0  # FlexAttention compiles per shape, dtype, mode and grad mode: bound its time
SESSION_FLEX_BUDGET_S = 20.0  # within the GPU session's ten minutes (benchmarks/gpu_session.sh)

Impl = Callable[..., torch.Tensor]


def eager(q, k, v, cond, mask, mode, scale):
    """The official formulation, with autocast's choice of an fp32 softmax for half inputs."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    logits = torch.bmm(q.reshape(b * h, nq, d), k.reshape(b * h, nk, d).transpose(1, 2)).view(b, h, nq, nk)
    c = cond[:, None, None, :].float()
    logits = logits.float() * scale
    if mode == "scale":
        logits = logits * c
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    attn = logits.softmax(-1)
    if mode == "reweight":
        attn = attn * (c + REWEIGHT_EPS)
        attn = attn / attn.sum(-1, keepdim=True)
    return torch.bmm(attn.to(v.dtype).view(b * h, nq, nk), v.reshape(b * h, nk, d)).view(b, h, nq, d)


def sdpa(q, k, v, cond, mask, mode, scale):
    if mode == "scale":
        k = k * cond[:, None, :, None].to(k.dtype)
        attn_mask = None if mask is None else mask[:, None, None, :]
    else:
        bias = torch.log(cond.float() + REWEIGHT_EPS)
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))
        attn_mask = bias[:, None, None, :].to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def _flex(q, k, v, cond, mask, mode, scale):
    from torch.nn.attention.flex_attention import flex_attention

    per_key = cond if mode == "scale" else torch.log(cond + REWEIGHT_EPS)

    def score_mod(score, b, h, q_idx, kv_idx):
        s = score * per_key[b, kv_idx] if mode == "scale" else score + per_key[b, kv_idx]
        return s if mask is None else torch.where(mask[b, kv_idx], s, float("-inf"))

    return flex_attention(q, k, v, score_mod=score_mod, scale=scale)


@functools.cache
def _compiled_flex() -> Impl:
    # One compiled entry per shape, dtype, mode and grad mode: more than Dynamo's default limit of 8, past
    # which it would silently fall back to the unfused FlexAttention.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(_flex, dynamic=False)


def flex(q, k, v, cond, mask, mode, scale):
    return _compiled_flex()(q, k, v, cond, mask, mode, scale)


def triton_fused(q, k, v, cond, mask, mode, scale):
    from reclmis.kernels.conditioned_attention import conditioned_attention_triton

    return conditioned_attention_triton(q, k, v, cond, mask, mode=mode, scale=scale)


IMPLS: dict[str, Impl] = {"eager": eager, "sdpa": sdpa, "flex": flex, "triton": triton_fused}


def unavailable(impl: str, device: str) -> str | None:
    """Why ``impl`` is not run on ``device`` (None when it is)."""
    if impl in ("eager", "sdpa"):
        return None
    if device != "cuda":
        what = "the Triton kernel needs" if impl == "triton" else "FlexAttention is benchmarked on"
        return f"{what} CUDA; not run on {device}"
    if impl == "triton":
        try:
            from reclmis.kernels import conditioned_attention  # noqa: F401
        except ImportError as e:
            return f"triton unavailable: {e}"
        from reclmis.kernels import _runtime

        if _runtime.interpreting():
            return "kernels were imported under TRITON_INTERPRET=1"
    return None


def make_inputs(shape: dict[str, int], dtype: torch.dtype, device: str, padded: bool, seed: int = 0):
    """q, k, v, a softmax condition over the valid keys, a suffix padding mask (text) or None, dO."""
    b, h, nq, nk, d = (shape[key] for key in ("B", "H", "Nq", "Nk", "D"))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (nq, nk, nk))
    mask = None
    scores = torch.randn(b, nk, generator=g)
    if padded:
        lengths = torch.randint((nk + 1) // 2, nk + 1, (b,), generator=g)
        mask = torch.arange(nk)[None, :] < lengths[:, None]
        scores = scores.masked_fill(~mask, float("-inf"))
    cond = scores.softmax(-1)
    dout = torch.randn(b, h, nq, d, generator=g)
    half = [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)]
    return *half[:3], cond.to(device), None if mask is None else mask.to(device), half[3]


def _step(impl: Impl, inputs, mode: str, backward: bool) -> Callable[[], object]:
    q, k, v, cond, mask, dout = inputs
    scale = q.shape[-1] ** -0.5
    if not backward:

        def fwd():
            with torch.no_grad():
                return impl(q, k, v, cond, mask, mode, scale)

        return fwd
    leaves = [t.detach().requires_grad_() for t in (q, k, v, cond)]

    def fwd_bwd():
        out = impl(*leaves, mask, mode, scale)
        return torch.autograd.grad(out, leaves, dout)

    return fwd_bwd


class TimeBudget:
    """Seconds left for an implementation whose compilation dominates its cost."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.left = seconds

    @contextlib.contextmanager
    def charge(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.left -= time.perf_counter() - start


def bench_case(name, shape, mode, dtype, device, impls, *, reps, flex_budget: TimeBudget) -> list[dict]:
    """All implementations, forward and forward+backward, at one shape, mode and dtype."""
    inputs = make_inputs(shape, dtype, device, padded=name.startswith("cvr"))
    expected = eager(*inputs[:5], mode, shape["D"] ** -0.5).float()
    base = {
        "op": OP,
        "mode": mode,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": {"name": name, **shape},
    }
    rows, reference_ms = [], {}
    for impl in impls:
        reason = unavailable(impl, device)
        if impl == "flex" and reason is None and flex_budget.left <= 0:
            reason = f"not run: the FlexAttention time budget ({flex_budget.seconds:.0f} s) is spent"
        for backward in (False, True):
            row = {**base, "impl": impl, "pass": "fwd+bwd" if backward else "fwd"}
            if reason is not None:
                rows.append({**row, "median_ms": None, "peak_mem_mib": None, "error": reason})
                continue
            try:
                with flex_budget.charge() if impl == "flex" else contextlib.nullcontext():
                    step = _step(IMPLS[impl], inputs, mode, backward)
                    if not backward:
                        row["max_abs_err_vs_eager"] = (step().float() - expected).abs().max().item()
                    row.update(measure(step, device, warmup=3, reps=reps))
            except Exception as e:  # a failing alternative is a result, not a crash
                error = f"{type(e).__name__}: {e}"
                rows.append({**row, "median_ms": None, "peak_mem_mib": None, "error": error})
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            if impl == "eager":
                reference_ms[row["pass"]] = row["median_ms"]
            row["speedup_vs_reference"] = reference_ms.get(row["pass"], float("nan")) / row["median_ms"]
            rows.append(row)
    return rows


def cases(device: str, quick: bool, session: bool = False):
    """(name, shape, mode, dtype): paper shapes in both modes, then the sweep in mode "reweight". The GPU
    session's scope: the paper shapes in both modes and CVR at B=256, in bf16 (what the model trains in)."""
    if session:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        for name, shape in PAPER_SHAPES.items():
            for mode in MODES:
                yield name, shape, mode, dtype
        yield "cvr_B256", {**PAPER_SHAPES["cvr"], "B": 256}, "reweight", dtype
        return
    dtypes = (torch.float16, torch.bfloat16) if device == "cuda" else (torch.float32,)
    batch = 4 if quick else None
    for dtype in dtypes:
        for name, shape in PAPER_SHAPES.items():
            for mode in MODES:
                yield name, {**shape, "B": batch or shape["B"]}, mode, dtype
    if quick:
        return
    for dtype in dtypes:
        for b, nq, nk in SWEEP:
            shape = {"B": b, "H": 4, "Nq": nq, "Nk": nk, "D": 128}
            yield f"cvr_sweep_B{b}_Nq{nq}_Nk{nk}", shape, "reweight", dtype


def run(device: str, quick: bool, session: bool = False) -> list[dict]:
    reps = 20 if device == "cuda" else (5 if quick else 10)
    flex_budget = TimeBudget(SESSION_FLEX_BUDGET_S if session else FLEX_BUDGET_S)
    rows = []
    for name, shape, mode, dtype in cases(device, quick, session):
        # On CPU, flex and triton become rows saying why they did not run; the sweep leaves flex out.
        impls = [impl for impl in IMPLS if impl != "flex" or "sweep" not in name]
        rows += bench_case(name, shape, mode, dtype, device, impls, reps=reps, flex_budget=flex_budget)
    return rows


def main() -> None:
    args = script_parser(__doc__, OP, "paper shapes only, batch 4").parse_args()
    rows = run(args.device, args.quick)
    path = write_rows(OP, args.device, rows, args.out)
    for row in rows:
        timing = f"{row['median_ms']:9.3f} ms" if row["median_ms"] is not None else f"  {row['error'][:60]}"
        case = f"{row['shape']['name']:28s} {row['mode']:8s} {row['dtype']:8s}"
        print(f"{case} {row['impl']:6s} {row['pass']:7s} {timing}")
    print(f"wrote {path}")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = {"B": 2, "H": 4, "Nq": 196, "Nk": 18, "D": 64}


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_bench_conditioned_attention(benchmark, impl, backward):
    reason = unavailable(impl, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    step = _step(IMPLS[impl], make_inputs(SMALL, dtype, DEVICE, padded=True), "reweight", backward)

    def timed():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    timed()  # compile (Triton, FlexAttention) outside the timed rounds
    benchmark(timed)


if __name__ == "__main__":
    main()
