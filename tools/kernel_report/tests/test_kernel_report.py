"""The kernel report's instruments (tools/kernel_report/counting.py) and the compile facts of the fused ops.

The counters are checked against hand-computed values on small handwritten kernels. The compile facts are
checked on every launch the fused ops make at the paper shapes, whatever kernels they are: each compiles for
sm_86 and sm_90, fits sm_86's shared memory, and runs its fp16/bf16 dots on tensor cores.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from tools.kernel_report.counting import (
    SMEM_LIMIT_BYTES,
    compile_launches,
    count_work,
    extrapolate,
    half_precision_dots,
    interpreting,
    nvidia_backend_missing,
    uses_tensor_cores,
)
from tools.kernel_report.report import Case, capture_launches

pytestmark = pytest.mark.skipif(
    not interpreting(),
    reason="the kernel report counts in Triton's interpreter (TRITON_INTERPRET=1 before triton is imported); "
    "this session compiles Triton kernels for the GPU",
)
NO_NVIDIA_BACKEND = nvidia_backend_missing()
needs_nvidia_backend = pytest.mark.skipif(NO_NVIDIA_BACKEND is not None, reason=str(NO_NVIDIA_BACKEND))


@triton.jit
def _tile_dot_kernel(
    x_ptr, y_ptr, out_ptr, M, N, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """out = x @ y for BLOCK_M rows of x (M, K) and all N <= BLOCK_N columns of y (K, N)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, K)
    x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=rows[:, None] < M, other=0.0)
    y = tl.load(y_ptr + ks[:, None] * N + cols[None, :], mask=cols[None, :] < N, other=0.0)
    out_mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], tl.dot(x, y), mask=out_mask)


@triton.jit
def _count_kernel(counter_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.atomic_add(counter_ptr + offs, 1.0, mask=offs < n)


def _tile_dot(x: torch.Tensor, y: torch.Tensor, block_m: int = 16) -> torch.Tensor:
    (m, k), n = x.shape, y.shape[1]
    out = torch.empty(m, n, dtype=torch.float32)
    _tile_dot_kernel[(triton.cdiv(m, block_m),)](
        x, y, out, m, n, K=k, BLOCK_M=block_m, BLOCK_N=16, num_warps=2
    )
    return out


def test_counters_equal_hand_counts_on_a_handwritten_kernel() -> None:
    m, n, k = 20, 10, 16  # two programs of 16 rows, the second with 4 valid; 10 of 16 columns valid
    x, y = torch.randn(m, k).half(), torch.randn(k, n).half()
    counter = torch.zeros(8)
    with count_work() as work:
        out = _tile_dot(x, y)
        _count_kernel[(1,)](counter, 5, BLOCK=8)
        out.sum(0)  # a torch reduction: one launch, reads out, writes 10 floats
        out.view(-1)  # a view: nothing
        host = out[0, 0].item()  # a host synchronisation
    torch.testing.assert_close(out, x.float() @ y.float())
    assert host == out[0, 0].item() and counter.tolist() == [1.0] * 5 + [0.0] * 3
    totals = work.totals()
    assert totals["triton_launches"] == 2 and totals["torch_launches"] == 1 and totals["launches"] == 3
    assert totals["host_syncs"] == 1
    assert totals["programs"] == 3
    assert totals["dots"] == 2
    assert totals["dot_flops"] == totals["dot_flops.fp16"] == 2 * (2 * 16 * 16 * 16)  # padding included
    assert totals["tensor_core_flops"] == totals["dot_flops"]
    assert totals["triton_load_bytes"] == (m * k + 2 * k * n) * 2  # x once, y once per program
    assert totals["triton_store_bytes"] == m * n * 4
    assert totals["torch_read_bytes"] == m * n * 4 and totals["torch_write_bytes"] == n * 4
    assert totals["load_bytes"] == totals["triton_load_bytes"] + m * n * 4
    assert totals["atomic_ops"] == 5 and totals["atomic_bytes"] == 5 * 4 * 2  # read and written
    launch = work.launches[0]
    assert launch.name == "_tile_dot_kernel" and launch.grid == (2, 1, 1)
    assert launch.constexprs == {"K": 16, "BLOCK_M": 16, "BLOCK_N": 16}
    assert launch.options == {"num_warps": 2}
    assert launch.args["x_ptr"] == {"tensor": "float16", "aligned": True}
    per_kernel = work.per_kernel()
    assert per_kernel["_tile_dot_kernel"]["dot_flops"] == totals["dot_flops"]
    assert per_kernel["torch"]["launches"] == 1


def test_capture_without_running() -> None:
    x = torch.randn(40 * 16 + 4).half()[4:].view(40, 16)  # 8 bytes past an allocation: not 16-byte aligned
    with count_work(execute=False) as work:
        _tile_dot(x, torch.randn(16, 8).half())
    (launch,) = work.launches
    assert launch.grid == (3, 1, 1) and launch.args["M"] == 40
    assert launch.args["x_ptr"] == {"tensor": "float16", "aligned": False}
    assert work.totals()["dot_flops"] == 0 and work.totals()["triton_load_bytes"] == 0


def test_extrapolation_is_exact_and_checked() -> None:
    counts = {b: {"flops": 7 + 5 * b * b, "launches": 3} for b in (1, 2, 3, 4)}
    values, checked_at = extrapolate(counts, 2, 32)
    assert values == {"flops": 7 + 5 * 32 * 32, "launches": 3} and checked_at == 4
    counts[4]["flops"] += 1  # not a quadratic: e.g. a tile shared by several samples
    with pytest.raises(ValueError, match="batch 4 differs in flops"):
        extrapolate(counts, 2, 32)


@needs_nvidia_backend
def test_compile_facts_of_a_handwritten_kernel() -> None:
    with count_work(execute=False) as work:
        _tile_dot(torch.randn(20, 16).half(), torch.randn(16, 10).half())
    (facts,) = compile_launches(work.launches)
    for target in ("sm_86", "sm_90"):
        f = facts[target]
        assert "error" not in f, f
        assert f["num_warps"] == 2 and f["registers"] > 0 and f["spill_store_bytes"] == 0
        assert f["dots"] == [{"a": "f16", "b": "f16", "precision": "tf32", "mnk": "16x16x16"}]
        assert uses_tensor_cores(f) and half_precision_dots(f)
    assert facts["sm_86"]["mma_sync"] > 0  # Ampere: mma.sync; Hopper may use either


PAPER_CASES = [
    *(
        Case("conditioned_attention", regime, dtype, 32, mode, 128)
        for regime in ("cvr", "clr")
        for mode in ("scale", "reweight")
        for dtype in ("float16", "bfloat16", "float32")
    ),
    *(Case("max_similarity", "paper", dtype, 32) for dtype in ("float16", "bfloat16", "float32")),
]


@pytest.fixture(scope="module")
def paper_launches() -> list[tuple[Case, dict, dict]]:
    """(case, launch, compile facts) for every launch the fused ops make at the paper shapes."""
    if NO_NVIDIA_BACKEND is not None:
        pytest.skip(NO_NVIDIA_BACKEND)
    captured = [(case, launch) for case in PAPER_CASES for launch in capture_launches(case)]
    facts = compile_launches([launch["spec"] for _, launch in captured], jobs=2)
    return [(case, launch, f) for (case, launch), f in zip(captured, facts, strict=True)]


def _where(case: Case, launch: dict) -> str:
    return f"{case.op} {case.label} {case.dtype} {launch['direction']} {launch['kernel']}"


def test_every_op_launches_forward_and_backward(paper_launches) -> None:
    for case in PAPER_CASES:
        directions = {launch["direction"] for c, launch, _ in paper_launches if c == case}
        assert directions == {"fwd", "bwd"}, case


def test_every_launch_compiles_for_sm86_and_sm90(paper_launches) -> None:
    failures = [
        f"{_where(case, launch)} on {target}: {facts[target]['error']}"
        for case, launch, facts in paper_launches
        for target in ("sm_86", "sm_90")
        if "error" in facts[target]
    ]
    assert not failures, "\n".join(failures)


def test_shared_memory_fits_every_target(paper_launches) -> None:
    for case, launch, facts in paper_launches:
        for target, limit in (("sm_86", SMEM_LIMIT_BYTES[86]), ("sm_90", SMEM_LIMIT_BYTES[90])):
            shared = facts[target].get("shared_bytes", 0)
            assert shared <= limit, f"{_where(case, launch)}: {shared} B of shared memory on {target}"


def test_half_precision_dots_use_tensor_cores(paper_launches) -> None:
    checked = 0
    for case, launch, facts in paper_launches:
        for target in ("sm_86", "sm_90"):
            if half_precision_dots(facts[target]):
                checked += 1
                assert uses_tensor_cores(facts[target]), f"{_where(case, launch)}: no mma/wgmma on {target}"
    assert checked > 0  # the fp16/bf16 cases have dots on half operands
