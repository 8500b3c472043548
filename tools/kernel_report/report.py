"""Kernel report: what each fused op really does, without a GPU (DESIGN 5; the instruments are in
``tools/kernel_report/counting.py``).

1. Work counted in Triton's interpreter. Each op's Triton entry point (``conditioned_attention_triton``,
   ``max_similarity_triton``: what ``backend="triton"`` runs after the public op's input checks) runs on CPU
   tensors under TRITON_INTERPRET=1, forward and backward, with every launch, ``tl.dot``, global load and
   store counted.
   Per op and direction: launches (Triton kernels + torch operations between them), executed dot flops
   (2*M*N*K of every ``tl.dot``, tile padding included) against the useful flops of the equation, and issued
   global load/store bytes against the minimum (each input read once, each output written once).
2. Compile facts. Every launch the op makes at the report's shapes (captured without running it, in fp16,
   bf16 and fp32) is compiled with its real constexprs, warps and stages for sm_86 (RTX 3090) and sm_90
   (H100/H200): shared memory, registers, spills (ptxas -v) and the tensor-core instructions in its PTX.
3. A roofline PREDICTION, max(bytes / bandwidth, flops / peak) per op and direction, on an RTX 3090 and an
   H200, for the kernels (from the counted work) and for the eager reference (from the tensors it
   materialises at the same shapes, counted at torch's dispatcher on CPU). Launch overhead is stated apart
   (launches x 3 us). No figure here is a measurement.

The counts are exact integers. Interpreting a full batch takes long, so each case is counted at small batches
and extrapolated: the work of conditioned attention is linear in the batch (fitted at B = 1, 2 and checked at
B = 3), that of max-similarity quadratic (one program per image-text pair: fitted at B = 1, 2, 3, checked at
B = 4). A failed check falls back to counting at the full batch, and the output names the method of every row.
Inputs: every sample has the same number of valid tokens (12 of 18), so work that depends on the padding
scales exactly too.

    python -m tools.kernel_report                          # -> tools/kernel_report/results/kernel_report.json, .md
    python -m tools.kernel_report --out /tmp/after.json --compare tools/kernel_report/results/kernel_report.json
    python -m tools.kernel_report --quick --out /tmp/kernel_report.json     # two cases, C=64 (smoke test)
    python -m tools.kernel_report --ops max_similarity --no-compile --out /tmp/ms.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":  # counting needs the interpreter, chosen when triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from benchmarks.common import environment, script_parser, write_results
from tools.kernel_report.counting import (
    compile_launches,
    count_work,
    extrapolate,
    nvidia_backend_missing,
)

NAME = "kernel_report"
RESULTS_DIR = Path(__file__).parent / "results"
OPS = ("conditioned_attention", "max_similarity")
# Dense peaks, TFLOP/s per operand class of a dot (fp16/bf16 with fp32 accumulation, as Triton's dots
# accumulate). RTX 3090: 82 SMs x 4 tensor cores x 128 fp16 FMA/clock x 2 x 1.695 GHz = 142 with fp16
# accumulation; GeForce Ampere halves that with fp32 accumulation (71) and quarters it for TF32 (35.6); fp32
# without tensor cores 35.6; no fp8 tensor cores (fp8 dots run as fp16). H200 (as H100 SXM): 990 fp16/bf16,
# 495 TF32, 67 fp32, 1979 int8/fp8, 67 fp64.
GPUS = {
    "rtx3090": {
        "name": "RTX 3090",
        "bandwidth_gb_s": 936.0,
        "peak_tflop_s": {
            "fp16": 71.0,
            "bf16": 71.0,
            "tf32": 35.6,
            "fp32": 35.6,
            "int8": 284.0,
            "fp8": 71.0,
            "fp64": 0.56,
        },
    },
    "h200": {
        "name": "H200",
        "bandwidth_gb_s": 4800.0,
        "peak_tflop_s": {
            "fp16": 990.0,
            "bf16": 990.0,
            "tf32": 495.0,
            "fp32": 67.0,
            "int8": 1979.0,
            "fp8": 1979.0,
            "fp64": 67.0,
        },
    },
}
PASSES = {"tf32x3": ("tf32", 3)}  # a tf32x3 dot runs three TF32 products
LAUNCH_OVERHEAD_US = 3.0
PREDICTION_NOTE = (
    "PREDICTED, not measured: roofline max(bytes / bandwidth, flops / peak) per op and direction from counted "
    "work (issued global bytes, L2 hits not modelled; dot and matmul flops only, elementwise work not "
    "modelled); launch overhead apart, launches x 3 us."
)
VALID_TOKENS = 12  # valid keys / text tokens of 18 in every sample of the padded cases
ATTENTION_REGIMES = {  # the model's two uses (DESIGN 3.1): CVR queries the text, CLR the image
    "cvr": {"H": 4, "Nq": 196, "Nk": 18, "padded": True},
    "clr": {"H": 4, "Nq": 18, "Nk": 196, "padded": False},
}
MAX_SIM_SHAPE = {"N": 196, "L": 18, "C": 512}
DEGREE = {"conditioned_attention": 1, "max_similarity": 2}  # of the work as a polynomial in the batch
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    """One op configuration at one batch size."""

    op: str
    regime: str  # "cvr" / "clr" for attention, "paper" / "quick" for max-similarity
    dtype: str
    batch: int
    mode: str | None = None  # attention only
    head_dim: int | None = None  # attention only
    channels: int = MAX_SIM_SHAPE["C"]  # max-similarity only

    @property
    def shape(self) -> dict[str, int]:
        if self.op == "conditioned_attention":
            r = ATTENTION_REGIMES[self.regime]
            return {"B": self.batch, "H": r["H"], "Nq": r["Nq"], "Nk": r["Nk"], "D": self.head_dim}
        return {"B": self.batch, "N": MAX_SIM_SHAPE["N"], "L": MAX_SIM_SHAPE["L"], "C": self.channels}

    @property
    def label(self) -> str:
        if self.op == "conditioned_attention":
            return f"{self.regime} {self.mode} D={self.head_dim}"
        return f"C={self.channels}" if self.channels != MAX_SIM_SHAPE["C"] else "paper"

    def at(self, batch: int) -> Case:
        return replace(self, batch=batch)


def cases(
    quick: bool, ops: tuple[str, ...] = OPS, dtypes: tuple[str, ...] = ("float16", "float32")
) -> list[Case]:
    """The report's cases: attention in both regimes, modes and head dims 64/128 at B=32; max-similarity at
    Bi=Bt=8 and 32. ``quick``: one attention case and max-similarity with C=64 (a smoke test)."""
    out = []
    if "conditioned_attention" in ops:
        if quick:
            out.append(Case("conditioned_attention", "cvr", "float16", 32, "reweight", 64))
        else:
            out += [
                Case("conditioned_attention", regime, dtype, 32, mode, d)
                for dtype in dtypes
                for regime in ATTENTION_REGIMES
                for mode in ("scale", "reweight")
                for d in (64, 128)
            ]
    if "max_similarity" in ops:
        if quick:
            out.append(Case("max_similarity", "quick", "float16", 8, channels=64))
        else:
            out += [Case("max_similarity", "paper", dtype, b) for dtype in dtypes for b in (8, 32)]
    return out


# --------------------------------------------------------------------------------------------------------------
# Inputs, calls and what the equation needs


@dataclass
class Call:
    """An op call at one batch: differentiable inputs, the fused and the eager forward, dOut."""

    leaves: list[torch.Tensor]
    others: list[torch.Tensor]  # non-differentiable inputs (masks)
    fused: Callable[[list[torch.Tensor]], torch.Tensor]
    reference: Callable[[list[torch.Tensor]], torch.Tensor]
    grad_out: torch.Tensor
    backward_reads_output: bool  # the equation's backward needs the forward's output (attention's delta)
    useful_flops: dict[str, int]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def make_call(case: Case, seed: int = 0) -> Call:
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    if case.op == "conditioned_attention":
        from benchmarks.bench_conditioned_attention import eager
        from reclmis.kernels.conditioned_attention import conditioned_attention_triton

        s = case.shape
        b, h, nq, nk, d = s["B"], s["H"], s["Nq"], s["Nk"], s["D"]
        q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for n in (nq, nk, nk))
        scores = torch.randn(b, nk, generator=g)
        mask = None
        if ATTENTION_REGIMES[case.regime]["padded"]:
            mask = (torch.arange(nk) < VALID_TOKENS).expand(b, nk).contiguous()
            scores = scores.masked_fill(~mask, float("-inf"))
        cond = scores.softmax(-1)
        dout = torch.randn(b, h, nq, d, generator=g).to(dtype)
        leaves = [t.requires_grad_() for t in (q, k, v, cond)]
        mode, scale = case.mode, d**-0.5
        return Call(
            leaves=leaves,
            others=[] if mask is None else [mask],
            fused=lambda x: conditioned_attention_triton(*x, mask, mode=mode),
            reference=lambda x: eager(*x, mask, mode, scale),
            grad_out=dout,
            backward_reads_output=True,
            # QK^T and PV; the backward's dP, dQ, dK, dV (a flash-style backward also recomputes QK^T: 2.5x fwd)
            useful_flops={"fwd": 4 * b * h * nq * nk * d, "bwd": 8 * b * h * nq * nk * d},
        )
    from reclmis.kernels.max_similarity import max_similarity_triton
    from reclmis.ops import max_similarity_reference

    s = case.shape
    b, n, l, c = s["B"], s["N"], s["L"], s["C"]
    img, txt = torch.randn(b, n, c, generator=g).to(dtype), torch.randn(b, l, c, generator=g).to(dtype)
    mask = (torch.arange(l) < VALID_TOKENS).expand(b, l).contiguous()
    img_w = torch.randn(b, n, generator=g).softmax(-1).to(dtype)
    txt_w = torch.randn(b, l, generator=g).masked_fill(~mask, float("-inf")).softmax(-1).to(dtype)
    d_s = torch.randn(b, b, generator=g)
    return Call(
        leaves=[t.requires_grad_() for t in (img, txt, img_w, txt_w)],
        others=[mask],
        fused=lambda x: max_similarity_triton(*x, mask),
        reference=lambda x: max_similarity_reference(*x, mask),
        grad_out=d_s,
        backward_reads_output=False,
        # the (Bi, Bt, N, L) similarities; the backward scatters one C-vector per selected pair, both ways
        useful_flops={"fwd": 2 * b * b * n * l * c, "bwd": 4 * b * b * (n + l) * c},
    )


def minimum_bytes(call: Call, out: torch.Tensor) -> dict[str, dict[str, int]]:
    """Each input read once and each output written once, per direction."""
    inputs = sum(_nbytes(t) for t in call.leaves + call.others)
    grads = sum(_nbytes(t) for t in call.leaves)
    bwd_reads = inputs + _nbytes(call.grad_out) + (_nbytes(out) if call.backward_reads_output else 0)
    return {
        "fwd": {"load": inputs, "store": _nbytes(out)},
        "bwd": {"load": bwd_reads, "store": grads},
    }


def run_directions(
    call: Call, fn: Callable[[list[torch.Tensor]], torch.Tensor], *, execute: bool = True
) -> tuple[dict[str, Any], torch.Tensor]:
    """Forward then backward of ``fn`` (the fused op or the reference), each inside its own count_work."""
    with count_work(execute=execute) as fwd:
        out = fn(call.leaves)
    with count_work(execute=execute) as bwd:
        torch.autograd.grad(out, call.leaves, call.grad_out)
    return {"fwd": fwd, "bwd": bwd}, out.detach()


def count_case(case: Case) -> dict[str, dict[str, Any]]:
    """Counted work of the fused op at ``case.batch``: totals and per-kernel sums, per direction."""
    call = make_call(case)
    recorders, _ = run_directions(call, call.fused)
    return {
        d: {"totals": r.totals(), "per_kernel": {k: dict(v) for k, v in r.per_kernel().items()}}
        for d, r in recorders.items()
    }


def _flatten(counted: dict[str, Any]) -> dict[str, int]:
    flat = dict(counted["totals"])
    for kernel, work in counted["per_kernel"].items():
        flat.update({f"per_kernel/{kernel}/{k}": v for k, v in work.items()})
    return flat


def _unflatten(flat: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"totals": {}, "per_kernel": {}}
    for key, value in flat.items():
        if key.startswith("per_kernel/"):
            _, kernel, k = key.split("/", 2)
            if value:
                out["per_kernel"].setdefault(kernel, {})[k] = value
        else:
            out["totals"][key] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# Counting plan: small batches, fitted and checked; run in parallel worker processes


def _count_task(case: Case) -> tuple[Case, dict[str, Any], float]:
    start = time.perf_counter()
    counted = count_case(case)
    return case, counted, time.perf_counter() - start


def fit_batches(case: Case) -> tuple[int, ...]:
    degree = DEGREE[case.op]
    return tuple(range(1, degree + 3))  # degree + 1 points to fit and one to check


def count_all(targets: list[Case], jobs: int, direct: bool) -> dict[Case, dict[str, Any]]:
    """Counts of every target case, per direction, with how they were obtained."""
    family = {t: t.at(0) for t in targets}  # cases differing only in batch share their small-batch counts
    tasks = sorted(
        {f.at(b) for t, f in family.items() for b in ((t.batch,) if direct else fit_batches(t))},
        key=lambda c: -(c.batch ** DEGREE[c.op]),  # longest first
    )
    results = _run_tasks(tasks, jobs)
    out = {}
    for target, fam in family.items():
        if direct:
            out[target] = {
                **results[fam.at(target.batch)],
                "method": {"counted": "directly", "batches": [target.batch]},
            }
            continue
        batches = fit_batches(target)
        per_batch = {d: {b: _flatten(results[fam.at(b)][d]) for b in batches} for d in ("fwd", "bwd")}
        try:
            fitted = {d: extrapolate(per_batch[d], DEGREE[target.op], target.batch) for d in per_batch}
        except ValueError as e:
            print(f"{target}: {e}; counting at B={target.batch} directly (slow)", flush=True)
            direct_counts = _run_tasks([target], 1)[target]
            out[target] = {
                **direct_counts,
                "method": {"counted": "directly", "batches": [target.batch], "why": str(e)},
            }
            continue
        out[target] = {d: _unflatten(fitted[d][0]) for d in fitted}
        out[target]["method"] = {
            "counted": "extrapolated",
            "degree": DEGREE[target.op],
            "fit_batches": list(batches[: DEGREE[target.op] + 1]),
            "checked_at": fitted["fwd"][1],
        }
    return out


def _run_tasks(tasks: list[Case], jobs: int) -> dict[Case, dict[str, Any]]:
    results = {}
    if jobs > 1 and len(tasks) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for case, counted, seconds in pool.map(_count_task, tasks):
                results[case] = counted
                print(
                    f"  counted {case.op} {case.label} {case.dtype} B={case.batch}: {seconds:.1f} s",
                    flush=True,
                )
    else:
        for task in tasks:
            case, counted, seconds = _count_task(task)
            results[case] = counted
            print(
                f"  counted {case.op} {case.label} {case.dtype} B={case.batch}: {seconds:.1f} s", flush=True
            )
    return results


# --------------------------------------------------------------------------------------------------------------
# Roofline


def _compute_seconds(totals: dict[str, int], gpu: dict[str, Any]) -> float:
    seconds = 0.0
    for key, flops in totals.items():
        prefix, _, cls = key.partition(".")
        if prefix not in ("dot_flops", "matmul_flops") or not cls:
            continue
        peak_cls, passes = PASSES.get(cls, (cls, 1))
        peak = gpu["peak_tflop_s"][peak_cls]
        seconds += passes * flops / (peak * 1e12)
    return seconds


def predict(totals: dict[str, int], gpu: dict[str, Any]) -> dict[str, float]:
    """Roofline time in microseconds (a prediction), its two bounds, and the launch overhead apart."""
    memory = (totals.get("load_bytes", 0) + totals.get("store_bytes", 0) + totals.get("atomic_bytes", 0)) / (
        gpu["bandwidth_gb_s"] * 1e9
    )
    compute = _compute_seconds(totals, gpu)
    return {
        "us": 1e6 * max(memory, compute),
        "memory_us": 1e6 * memory,
        "compute_us": 1e6 * compute,
        "launch_overhead_us": LAUNCH_OVERHEAD_US * totals.get("launches", 0),
    }


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted(a.keys() | b.keys())}


# --------------------------------------------------------------------------------------------------------------
# Rows


def work_rows(case: Case, counted: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of the work table for one case, and the launches it makes at full size (for the compile step)."""
    call = make_call(case)
    # The eager reference, counted at full size (real torch on CPU: fast).
    reference, out = run_directions(call, call.reference)
    reference = {d: r.totals() for d, r in reference.items()}
    minimum = minimum_bytes(call, out)
    launches = capture_launches(case)  # at full size: grids, launch counts and the compile step's input
    base = {
        "op": case.op,
        "case": case.label,
        "regime": case.regime,
        "mode": case.mode,
        "dtype": case.dtype,
        "shape": case.shape,
        "counted": counted["method"],
    }
    rows = []
    per_dir = {}
    for d in ("fwd", "bwd"):
        totals = counted[d]["totals"]
        if totals.get("triton_launches") != sum(launch["direction"] == d for launch in launches):
            raise RuntimeError(f"{case}: {d} launch count differs between counting and capture at full size")
        per_dir[d] = {
            "kernel": totals,
            "per_kernel": counted[d]["per_kernel"],
            "reference": reference[d],
            "useful_flops": call.useful_flops[d],
            "min_load_bytes": minimum[d]["load"],
            "min_store_bytes": minimum[d]["store"],
        }
    per_dir["fwd+bwd"] = {
        "kernel": _add(per_dir["fwd"]["kernel"], per_dir["bwd"]["kernel"]),
        "per_kernel": {},
        "reference": _add(per_dir["fwd"]["reference"], per_dir["bwd"]["reference"]),
        **{
            k: per_dir["fwd"][k] + per_dir["bwd"][k]
            for k in ("useful_flops", "min_load_bytes", "min_store_bytes")
        },
    }
    fwd_useful = call.useful_flops["fwd"]
    for d in DIRECTIONS:
        r = per_dir[d]
        kernel, ref = r["kernel"], r["reference"]
        predicted = {}
        for gpu_key, gpu in GPUS.items():
            if d == "fwd+bwd":  # the two directions run as separate launches: their times add
                parts = [rows[0]["predicted"][gpu_key], rows[1]["predicted"][gpu_key]]
                predicted[gpu_key] = {
                    side: {k: parts[0][side][k] + parts[1][side][k] for k in parts[0][side]}
                    for side in ("kernel", "reference")
                }
            else:
                predicted[gpu_key] = {"kernel": predict(kernel, gpu), "reference": predict(ref, gpu)}
        rows.append(
            {
                **base,
                "direction": d,
                "launches": kernel.get("launches", 0),
                "triton_launches": kernel.get("triton_launches", 0),
                "torch_launches": kernel.get("torch_launches", 0),
                "host_syncs": kernel.get("host_syncs", 0),
                "dot_flops": kernel.get("dot_flops", 0),
                "tensor_core_flops": kernel.get("tensor_core_flops", 0),
                "useful_flops": r["useful_flops"],
                "fwd_useful_flops": fwd_useful,
                "dot_flops_per_useful": kernel.get("dot_flops", 0) / r["useful_flops"],
                "dot_flops_per_fwd_useful": kernel.get("dot_flops", 0) / fwd_useful,
                "load_bytes": kernel.get("load_bytes", 0),
                "store_bytes": kernel.get("store_bytes", 0),
                "min_load_bytes": r["min_load_bytes"],
                "min_store_bytes": r["min_store_bytes"],
                "load_per_min": kernel.get("load_bytes", 0) / r["min_load_bytes"],
                "store_per_min": kernel.get("store_bytes", 0) / r["min_store_bytes"],
                "kernel_counts": kernel,
                "per_kernel": r["per_kernel"],
                "reference_counts": ref,
                "predicted": predicted,
            }
        )
    return rows, launches


def compile_rows(captured: list[tuple[Case, list[dict[str, Any]]]], jobs: int) -> list[dict[str, Any]]:
    """Compile facts of every captured launch for sm_86 and sm_90."""
    specs = [launch["spec"] for _, launches in captured for launch in launches]
    facts = iter(compile_launches(specs, (86, 90), jobs=jobs))
    rows = []
    for case, launches in captured:
        for launch in launches:
            f = next(facts)
            rows.append(
                {
                    "op": case.op,
                    "case": case.label,
                    "dtype": case.dtype,
                    "shape": case.shape,
                    "direction": launch["direction"],
                    "kernel": launch["kernel"],
                    "grid": launch["grid"],
                    "constexprs": launch["constexprs"],
                    "options": launch["options"],
                    **f,
                }
            )
    return rows


def capture_launches(case: Case) -> list[dict[str, Any]]:
    """The fused op's launches at the case's full size, captured without running them (any dtype)."""
    call = make_call(case)
    captured, _ = run_directions(call, call.fused, execute=False)
    return [
        {"direction": d, "kernel": l.name, "grid": list(l.grid), "constexprs": l.constexprs, "options": l.options,
         "spec": l.spec()}
        for d, r in captured.items()
        for l in r.launches
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Output


def _mb(x: float) -> str:
    return f"{x / 1e6:.3g}"


def _us(x: float) -> str:
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _compile_summary(facts: dict[str, Any]) -> str:
    if "error" in facts:
        return "fails: " + facts["error"].splitlines()[0][:60]
    tc = (
        f"{facts['mma_sync']} mma"
        if facts["mma_sync"]
        else (f"{facts['wgmma']} wgmma" if facts["wgmma"] else "no TC")
    )
    spill = facts["spill_store_bytes"]
    return f"{facts['shared_bytes'] / 1024:.1f} KiB, {facts['registers']} reg, {spill} B spill, {tc}"


def markdown(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    lines = [
        "# Kernel report (counted without a GPU)",
        "",
        f"Counted in Triton {env['triton']}'s interpreter on CPU (torch {env['torch']}), commit {env['git_commit']}"
        f"{' (dirty tree)' if env.get('git_dirty') else ''}; command: `{env['command']}`.",
        "",
        f"**{PREDICTION_NOTE}**",
        "",
        "GPUs: "
        + "; ".join(
            f"{g['name']} {g['bandwidth_gb_s']:.0f} GB/s, "
            + ", ".join(f"{k} {v:g}" for k, v in g["peak_tflop_s"].items() if k in ("fp16", "tf32", "fp32"))
            + " TFLOP/s"
            for g in GPUS.values()
        )
        + ". tf32x3 dots count as three TF32 products.",
        "",
        "## Work per call (executed vs needed) and predicted time",
        "",
        "Flops: executed `tl.dot` flops (tile padding included) / useful flops of the equation; `x fwd useful` "
        "divides by the forward's useful flops. Bytes: issued global loads and stores (Triton + torch ops in the call) "
        "vs the minimum (inputs read once, outputs written once). Launches: Triton + torch. Predicted us: fused "
        "kernels / eager reference (launch overhead apart).",
        "",
        "| op | case | dtype | B | dir | launches | dot GFLOP (useful) | x useful | x fwd useful | load MB (min) "
        "| x min | store MB (min) | 3090 us fused / ref | H200 us fused / ref | launch us fused / ref | counted |",
        "|" + "---|" * 16,
    ]
    for r in payload["rows"]:
        p3, ph = r["predicted"]["rtx3090"], r["predicted"]["h200"]
        method = r["counted"]
        how = (
            f"fit B={','.join(map(str, method['fit_batches']))}, checked B={method['checked_at']}"
            if method["counted"] == "extrapolated"
            else f"direct B={method['batches'][0]}"
        )
        lines.append(
            f"| {r['op']} | {r['case']} | {r['dtype']} | {r['shape']['B']} | {r['direction']} "
            f"| {r['triton_launches']}+{r['torch_launches']} "
            f"| {r['dot_flops'] / 1e9:.3g} ({r['useful_flops'] / 1e9:.3g}) | {r['dot_flops_per_useful']:.2f} "
            f"| {r['dot_flops_per_fwd_useful']:.2f} | {_mb(r['load_bytes'])} ({_mb(r['min_load_bytes'])}) "
            f"| {r['load_per_min']:.2f} | {_mb(r['store_bytes'])} ({_mb(r['min_store_bytes'])}) "
            f"| {_us(p3['kernel']['us'])} / {_us(p3['reference']['us'])} "
            f"| {_us(ph['kernel']['us'])} / {_us(ph['reference']['us'])} "
            f"| {_us(p3['kernel']['launch_overhead_us'])} / {_us(p3['reference']['launch_overhead_us'])} | {how} |"
        )
    if payload.get("compile"):
        lines += [
            "",
            "## Compile facts per launch (sm_86 = RTX 3090, sm_90 = H100/H200)",
            "",
            "Shared memory per block (limits: 99 KiB on sm_86, 227 KiB on sm_90), registers per thread, spill "
            "stores (ptxas -v), tensor-core instructions in the PTX. Identical launches of several cases are "
            "listed once.",
            "",
            "| op | kernel | dtype | constexprs | warps/stages | sm_86 | sm_90 | cases |",
            "|---|---|---|---|---|---|---|---|",
        ]
        groups: dict[str, dict[str, Any]] = {}
        for r in payload["compile"]:
            key = json.dumps(
                [r["op"], r["kernel"], r["dtype"], r["constexprs"], r["options"]], sort_keys=True
            )
            g = groups.setdefault(key, {"row": r, "cases": []})
            if r["case"] not in g["cases"]:
                g["cases"].append(r["case"])
        for g in groups.values():
            r = g["row"]
            consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
            compiled = r["sm_86"] if "num_warps" in r["sm_86"] else r["options"]
            warps = f"{compiled.get('num_warps', '-')}/{compiled.get('num_stages', '-')}"
            lines.append(
                f"| {r['op']} | {r['kernel']} | {r['dtype']} | {consts} | {warps} | {_compile_summary(r['sm_86'])} "
                f"| {_compile_summary(r['sm_90'])} | {'; '.join(g['cases'])} |"
            )
    elif payload.get("compile_skipped"):
        lines += ["", f"Compile facts: not computed ({payload['compile_skipped']})."]
    if payload.get("compare"):
        lines += ["", *compare_markdown(payload)]
    return "\n".join(lines) + "\n"


def _row_key(r: dict[str, Any]) -> tuple:
    return (r["op"], r["case"], r["dtype"], r["shape"]["B"], r["direction"])


def _pair(before: dict[str, Any], after: dict[str, Any], cell: Callable[[dict[str, Any]], str]) -> str:
    b, a = cell(before), cell(after)
    return a if a == b else f"{b} -> {a}"


def compare_markdown(payload: dict[str, Any]) -> list[str]:
    before = payload["compare"]
    old = {_row_key(r): r for r in before["rows"]}
    lines = [
        f"## Before / after (before: `{before['path']}`, commit {before['git_commit']})",
        "",
        "| op | case | dtype | B | dir | launches | x fwd useful flops | load MB | x min load | 3090 us fused "
        "| H200 us fused |",
        "|" + "---|" * 11,
    ]
    for r in payload["rows"]:
        o = old.get(_row_key(r))
        if o is None:
            continue

        cells = [
            _pair(o, r, lambda x: str(x["launches"])),
            _pair(o, r, lambda x: f"{x['dot_flops_per_fwd_useful']:.2f}"),
            _pair(o, r, lambda x: _mb(x["load_bytes"])),
            _pair(o, r, lambda x: f"{x['load_per_min']:.2f}"),
            _pair(o, r, lambda x: _us(x["predicted"]["rtx3090"]["kernel"]["us"])),
            _pair(o, r, lambda x: _us(x["predicted"]["h200"]["kernel"]["us"])),
        ]
        lines.append(
            f"| {r['op']} | {r['case']} | {r['dtype']} | {r['shape']['B']} | {r['direction']} | "
            + " | ".join(cells)
            + " |"
        )
    if before.get("compile") and payload.get("compile"):

        def case_key(r: dict[str, Any]) -> tuple:
            return (r["op"], r["case"], r["dtype"], r["shape"]["B"])

        common = {case_key(r) for r in before["compile"]} & {case_key(r) for r in payload["compile"]}
        lines += [
            "",
            "Largest spill store per op, dtype and target over the cases of both files (bytes):",
            "",
        ]
        for target in ("sm_86", "sm_90"):
            spills: dict[tuple, dict[str, int]] = {}
            for label, rows in (("before", before["compile"]), ("after", payload["compile"])):
                for r in rows:
                    if case_key(r) in common:
                        worst = spills.setdefault((r["op"], r["dtype"]), {}).get(label, 0)
                        spill = r[target].get("spill_store_bytes", 0)
                        spills[r["op"], r["dtype"]][label] = max(worst, spill)
            lines += [
                f"- {target} {op} {dtype}: {s['before']} -> {s['after']}"
                for (op, dtype), s in sorted(spills.items())
            ]
    return lines


def build(
    quick: bool,
    *,
    ops: tuple[str, ...] = OPS,
    jobs: int = 1,
    direct: bool = False,
    compile_facts: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    env = environment(device)  # the tree as the run starts
    targets = cases(quick, ops)
    start = time.perf_counter()
    counted = count_all(targets, jobs, direct)
    rows, captured = [], []
    for case in targets:
        case_rows, launches = work_rows(case, counted[case])
        rows += case_rows
        captured.append((case, launches))
    count_seconds = time.perf_counter() - start
    payload: dict[str, Any] = {
        "environment": env,
        "quick": quick,
        "prediction_note": PREDICTION_NOTE,
        "gpus": GPUS,
        "launch_overhead_us_per_launch": LAUNCH_OVERHEAD_US,
        "definitions": {
            "dot_flops": "2*M*N*K of every tl.dot each program executes (tile padding included); "
            "tensor_core_flops: those of dots on fp16/bf16/tf32/tf32x3/int8/fp8 operands (fp32 'ieee' dots "
            "run without tensor cores)",
            "useful_flops": "the equation's matrix products at the tensor shapes (padded tokens inside a "
            "sequence not subtracted); attention fwd 4*B*H*Nq*Nk*D, bwd 8*B*H*Nq*Nk*D (dP, dQ, dK, dV); "
            "max-similarity fwd 2*Bi*Bt*N*L*C, bwd 4*Bi*Bt*(N+L)*C (one C-vector per selected pair, both ways)",
            "load_bytes": "issued global loads of every Triton program (masked-off elements excluded) plus "
            "the inputs read by torch operations in the call",
            "min_load_bytes": "each input read once (fwd: inputs; bwd: inputs, dOut and, for attention, the "
            "forward's output)",
            "launches": "Triton launches + torch operations that launch a kernel on a GPU (views and "
            "allocations excluded)",
        },
        "rows": rows,
        "seconds": {"counting": round(count_seconds, 1)},
    }
    if not compile_facts:
        payload["compile_skipped"] = "--no-compile"
    elif (reason := nvidia_backend_missing()) is not None:
        payload["compile_skipped"] = reason
    else:
        # Every launch at full size, in fp16, bf16 (the interpreter cannot run it, but can capture it) and fp32.
        start = time.perf_counter()
        compiled = list(captured)
        for case in targets if not quick else ():
            if case.dtype == "float16":
                bf16 = replace(case, dtype="bfloat16")
                compiled.append((bf16, capture_launches(bf16)))
        payload["compile"] = compile_rows(compiled, jobs)
        payload["seconds"]["compile"] = round(time.perf_counter() - start, 1)
    return payload


def write(payload: dict[str, Any], out: str | Path | None) -> Path:
    path = write_results(NAME, payload, out, results_dir=RESULTS_DIR)
    path.with_suffix(".md").write_text(markdown(payload))
    return path


def main() -> None:
    parser = script_parser(
        __doc__, NAME, "one attention case and max-similarity at C=64 (a smoke test)",
        devices=("cpu",), default_out=f"tools/kernel_report/results/{NAME}.json",
    )  # fmt: skip
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="worker processes")
    parser.add_argument(
        "--direct", action="store_true", help="count at the full batch (no extrapolation; slow)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the sm_86/sm_90 compile facts")
    parser.add_argument("--compare", help="an earlier kernel_report JSON: adds a before/after table")
    args = parser.parse_args()
    payload = build(
        args.quick, ops=tuple(args.ops), jobs=args.jobs, direct=args.direct, compile_facts=not args.no_compile
    )
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        payload["compare"] = {
            "path": args.compare,
            "git_commit": before["environment"].get("git_commit"),
            "rows": before["rows"],
            "compile": before.get("compile", []),
        }
    path = write(payload, args.out or RESULTS_DIR / f"{NAME}.json")
    print(markdown(payload))
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
