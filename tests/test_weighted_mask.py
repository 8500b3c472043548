"""weighted_mask: the compiled op (reclmis._C, CPU kernel here, CUDA kernel on a GPU) and the reference.

The law is checked against exact inclusion probabilities of successive sampling without replacement; the
shared Philox/log core is checked against known answers in a small C++ program.
"""

from __future__ import annotations

import importlib
import itertools
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from reclmis.ops import weighted_mask, weighted_mask_reference
from reclmis.ops.weighted_mask import mask_counts

wm = importlib.import_module("reclmis.ops.weighted_mask")  # the module; reclmis.ops.weighted_mask is the op
CSRC = Path(__file__).resolve().parents[1] / "csrc"
BACKENDS = ("extension", "reference")
MAX_STANDARD_ERRORS = 4.5
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_extension_is_built() -> None:
    assert wm.extension_available(), f"reclmis._C does not load: {wm._EXTENSION_ERROR}"
    assert hasattr(torch.ops.reclmis, "weighted_mask")


def _successive_sampling_law(weight: list[float], k: int) -> tuple[dict, dict]:
    """Exact inclusion probabilities of single positions and of pairs, by enumerating all orderings."""
    total = sum(weight)
    single: dict[int, float] = dict.fromkeys(range(len(weight)), 0.0)
    pairs: dict[tuple[int, int], float] = {}
    for order in itertools.permutations(range(len(weight))):
        p, left = 1.0, total
        for t in order:
            p *= weight[t] / left
            left -= weight[t]
        for t in order[:k]:
            single[t] += p
        if k == 2:
            pair = tuple(sorted(order[:2]))
            pairs[pair] = pairs.get(pair, 0.0) + p
    return single, pairs


def _assert_frequency(hits: torch.Tensor, p: float, what: str) -> None:
    n = hits.numel()
    freq = hits.double().mean().item()
    se = max(p * (1 - p) / n, 1e-12) ** 0.5
    assert abs(freq - p) <= MAX_STANDARD_ERRORS * se, (
        f"{what}: frequency {freq:.5f}, exact {p:.5f}, se {se:.5f}"
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_inclusion_probabilities_match_successive_sampling(backend: str, padded: bool) -> None:
    weight = [0.05, 0.4, 0.1, 0.25, 0.2]
    rows = 40_000
    w = torch.tensor(weight).expand(rows, 5)
    lengths = None
    if padded:  # two padding positions with large weights that must never be drawn
        w = torch.cat([w, torch.full((rows, 2), 50.0)], dim=1)
        lengths = torch.full((rows,), 5)
    _, mask = weighted_mask(torch.zeros(rows, w.shape[1], 1), w, 0.4, lengths, seed=2024, backend=backend)
    assert (mask.sum(1) == 2).all() and not mask[:, 5:].any()
    single, pairs = _successive_sampling_law(weight, k=2)
    for t, p in single.items():
        _assert_frequency(mask[:, t], p, f"position {t}")
    for (a, b), p in pairs.items():
        _assert_frequency(mask[:, a] & mask[:, b], p, f"pair {(a, b)}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_fill_up_is_uniform(backend: str) -> None:
    rows = 20_000
    # row kind 0: k = 3 of 6, positive weights at 0 and 2, the third uniform over {1, 3, 4, 5};
    # row kind 1: length 5, k = 2, one positive weight (1) and one draw uniform over {0, 2, 3, 4}; the
    # padding position 5 has the largest weight and must never be drawn.
    kinds = torch.tensor([[2.0, 0, 1, 0, 0, 0], [0, 3, 0, 0, 0, 9]])
    w = kinds.repeat(rows // 2, 1)
    lengths = torch.tensor([6, 5]).repeat(rows // 2)
    _, mask = weighted_mask(torch.zeros(rows, 6, 1), w, 0.5, lengths, seed=7, backend=backend)
    first, second = mask[0::2], mask[1::2]
    assert (first.sum(1) == 3).all() and first[:, [0, 2]].all()
    assert (second.sum(1) == 2).all() and second[:, 1].all() and not second[:, 5].any()
    for t in (1, 3, 4, 5):
        _assert_frequency(first[:, t], 0.25, f"fill-up position {t}")
    for t in (0, 2, 3, 4):
        _assert_frequency(second[:, t], 0.25, f"padded fill-up position {t}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.3, 0.5, 0.999, 1.0])
def test_counts_and_lengths(backend: str, ratio: float) -> None:
    gen = torch.Generator().manual_seed(0)
    b, t = 64, 37
    w = torch.rand(b, t, generator=gen) * (torch.rand(b, t, generator=gen) > 0.3)
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    lengths[:3] = torch.tensor([0, 1, t])
    _, mask = weighted_mask(torch.randn(b, t, 4), w, ratio, lengths, seed=1, backend=backend)
    assert torch.equal(mask.sum(1), mask_counts(lengths, ratio))
    assert not (mask & (torch.arange(t) >= lengths[:, None])).any()
    _, full = weighted_mask(torch.randn(b, t, 4), w, ratio, seed=1, backend=backend)
    assert torch.equal(full.sum(1), mask_counts(torch.full((b,), t), ratio))


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_use_double_precision_floor(backend: str) -> None:
    # 0.58 * 50 is 28.999999999999996 in double: the official int(50 * 0.58) = 28 (float32 and exact: 29)
    _, mask = weighted_mask(torch.zeros(1, 50, 1), torch.ones(1, 50), 0.58, seed=0, backend=backend)
    assert mask.sum() == 28


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds(backend: str) -> None:
    x, w = torch.randn(8, 50, 3), torch.rand(8, 50)
    a = weighted_mask(x, w, 0.5, seed=11, backend=backend)[1]
    assert torch.equal(a, weighted_mask(x, w, 0.5, seed=11, backend=backend)[1])
    assert not torch.equal(a, weighted_mask(x, w, 0.5, seed=12, backend=backend)[1])
    torch.manual_seed(5)
    b = weighted_mask(x, w, 0.5, backend=backend)[1]
    c = weighted_mask(x, w, 0.5, backend=backend)[1]
    torch.manual_seed(5)
    assert torch.equal(b, weighted_mask(x, w, 0.5, backend=backend)[1])
    assert not torch.equal(b, c)


def test_auto_uses_the_extension() -> None:
    x, w, lengths = torch.randn(6, 30, 2), torch.rand(6, 30), torch.tensor([30, 0, 5, 17, 1, 29])
    auto = weighted_mask(x, w, 0.3, lengths, seed=3)
    ext = torch.ops.reclmis.weighted_mask(x, w, 0.3, lengths, torch.tensor(3), False)
    assert torch.equal(auto[0], ext[0]) and torch.equal(auto[1], ext[1])
    reference = weighted_mask(x, w, 0.3, lengths, seed=3, backend="reference")[1]
    assert not torch.equal(auto[1], reference)  # another random stream, same law


def test_auto_falls_back_to_the_reference_without_the_extension(monkeypatch) -> None:
    monkeypatch.setattr(wm, "_EXTENSION_ERROR", ImportError("reclmis._C not built"))
    x, w = torch.randn(4, 20, 3), torch.rand(4, 20)
    auto = weighted_mask(x, w, 0.5, seed=9)
    reference = weighted_mask_reference(x, w, 0.5, seed=9)
    assert torch.equal(auto[1], reference[1])
    with pytest.raises(RuntimeError, match=r"reclmis\._C.*not built"):
        weighted_mask(x, w, 0.5, seed=9, backend="extension")


def test_mask_independent_of_threads_and_weight_dtype() -> None:
    x = torch.randn(64, 196, 8)
    w = torch.rand(64, 196).half()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = weighted_mask(x, w, 0.5, seed=4)[1]
    finally:
        torch.set_num_threads(threads)
    for weight in (w, w.float(), w.double()):
        assert torch.equal(weighted_mask(x, weight, 0.5, seed=4)[1], serial)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_masked_x_is_x_times_not_mask(dtype: torch.dtype) -> None:
    x = torch.randn(5, 3, 33).to(dtype).transpose(1, 2)  # (5, 33, 3), not contiguous
    w = torch.rand(5, 33)
    out, mask = weighted_mask(x, w, 0.5, torch.tensor([33, 0, 7, 1, 20]), seed=0)
    assert out.dtype == dtype and out.shape == x.shape and mask.dtype == torch.bool
    assert torch.equal(out, x * (~mask)[..., None].to(dtype))


def test_gradient_is_not_mask() -> None:
    x = torch.randn(4, 25, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, 25, requires_grad=True)
    out, mask = weighted_mask(x, w, 0.5, torch.tensor([25, 3, 0, 10]), seed=1)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(x.grad, grad * (~mask)[..., None])
    assert w.grad is None


@pytest.mark.parametrize("lengths", [None, torch.tensor([9, 0, 4])], ids=["no-lengths", "lengths"])
def test_opcheck(lengths: torch.Tensor | None) -> None:
    x = torch.randn(3, 9, 5, requires_grad=True)
    torch.library.opcheck(
        torch.ops.reclmis.weighted_mask.default, (x, torch.rand(3, 9), 0.5, lengths, torch.tensor(3), False)
    )


def test_torch_compile_fullgraph() -> None:
    def step(x: torch.Tensor, w: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = weighted_mask(x, w, 0.5, lengths, seed=21)
        return (out * out).sum()

    x = torch.randn(4, 30, 8, requires_grad=True)
    w, lengths = torch.rand(4, 30), torch.tensor([30, 0, 7, 19])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(x, w, lengths)
    (grad,) = torch.autograd.grad(loss, x)
    _, mask = weighted_mask(x, w, 0.5, lengths, seed=21)
    assert torch.equal(loss, step(x, w, lengths))
    assert torch.equal(grad, 2 * x.detach() * (~mask)[..., None])


def test_torch_compile_draws_a_seed_at_every_call() -> None:
    # seed=None draws the seed inside the graph from torch's generator, never a constant traced into it
    def draw(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return weighted_mask(x, w, 0.5)[1]

    compiled = torch.compile(draw, backend="aot_eager", fullgraph=True)
    x, w = torch.randn(4, 30, 2), torch.rand(4, 30)
    torch.manual_seed(3)
    first, second = compiled(x, w), compiled(x, w)
    torch.manual_seed(3)
    assert torch.equal(first, draw(x, w)) and torch.equal(second, draw(x, w))
    assert not torch.equal(first, second)


def test_kernel_checks_rows_in_eager_mode_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # the rule of every op: the kernel is asked to check the rows (on CUDA a read-back, one host sync) in
    # eager mode, never inside a compiled step; RECLMIS_CHECK_WEIGHTS=1 asks inside compiled steps too
    def draw(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return weighted_mask(x, w, 0.5, backend="extension")[1]

    def traced_flag() -> bool:
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        torch.compile(draw, fullgraph=True, backend=counter)(x, w)
        (call,) = [n for n in counter.graphs[0].graph.nodes if n.target is torch.ops.reclmis.weighted_mask]
        return call.args[5]

    op, asked = torch.ops.reclmis.weighted_mask, []
    x, w = torch.randn(2, 6, 3), torch.rand(2, 6)
    monkeypatch.delenv(wm.CHECK_WEIGHTS_ENV, raising=False)
    with monkeypatch.context() as eager:
        eager.setattr(torch.ops.reclmis, "weighted_mask", lambda *args: asked.append(args[5]) or op(*args))
        draw(x, w)
    assert asked == [True]
    assert traced_flag() is False
    monkeypatch.setenv(wm.CHECK_WEIGHTS_ENV, "1")
    assert traced_flag() is True


def test_reference_under_torch_compile_skips_host_checks() -> None:
    # eager: a ValueError; traced: no host read, out-of-range lengths clamped and bad weights counted as zero
    def draw(x: torch.Tensor, w: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return weighted_mask(x, w, 0.5, lengths, backend="reference")[1]

    rows = 500
    w = torch.tensor([-1.0, 1.0, 2.0, 1.0, float("nan"), 3.0]).repeat(rows, 1)
    lengths = torch.tensor([9, 5]).repeat(rows // 2)
    with pytest.raises(ValueError, match="lengths"):
        draw(torch.zeros(rows, 6, 1), w, lengths)
    mask = torch.compile(draw, backend="aot_eager", fullgraph=True)(torch.zeros(rows, 6, 1), w, lengths)
    assert torch.equal(mask.sum(1), torch.tensor([3, 2]).repeat(rows // 2))
    assert not mask[:, [0, 4]].any() and not mask[1::2, 5].any()


def _inputs(**changes: object) -> dict[str, object]:
    return {"x": torch.randn(2, 6, 3), "weight": torch.rand(2, 6), "ratio": 0.5, "lengths": None} | changes


BAD_INPUTS = [
    ({"ratio": 1.5}, ValueError, "ratio"),
    ({"ratio": -0.1}, ValueError, "ratio"),
    ({"ratio": float("nan")}, TypeError, "ratio"),
    ({"x": torch.randn(2, 6)}, ValueError, "x must have 3"),
    ({"x": torch.randn(2, 6, 3).int()}, TypeError, "x must have dtype"),
    ({"weight": torch.rand(2, 5)}, ValueError, "weight has size 5"),
    ({"weight": torch.rand(2, 6).long()}, TypeError, "weight must have dtype"),
    ({"weight": -torch.rand(2, 6)}, ValueError, "weight must be finite and >= 0; row 0"),
    ({"weight": torch.tensor([[1.0] * 6, [1, 1, float("nan"), 1, 1, 1]])}, ValueError, r"weight.*row 1"),
    ({"weight": torch.tensor([[1.0] * 6, [float("inf")] * 6])}, ValueError, r"weight.*row 1"),
    ({"lengths": torch.tensor([7, 1])}, ValueError, r"lengths must lie in \[0, 6\]"),
    ({"lengths": torch.tensor([3, -1])}, ValueError, "lengths"),
    ({"lengths": torch.tensor([1.0, 2.0])}, TypeError, "lengths"),
    ({"lengths": torch.tensor([1, 2, 3])}, ValueError, "lengths has size 3"),
]


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize(("changes", "error", "match"), BAD_INPUTS)
def test_rejects_bad_inputs(backend: str, changes: dict, error: type, match: str) -> None:
    args = _inputs(**changes)
    with pytest.raises(error, match=match):
        weighted_mask(args["x"], args["weight"], args["ratio"], args["lengths"], seed=0, backend=backend)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"ratio": 1.5}, ValueError, "ratio must be in"),
        ({"x": torch.randn(2, 6)}, ValueError, "x must have shape"),
        ({"x": torch.randn(2, 6, 3).int()}, TypeError, "x must be a floating"),
        ({"weight": torch.rand(2, 5)}, ValueError, "weight must have shape"),
        ({"weight": torch.rand(2, 6).long()}, TypeError, "weight must be"),
        ({"weight": -torch.rand(2, 6)}, ValueError, "weight must be finite"),
        ({"lengths": torch.tensor([7, 1])}, ValueError, "lengths must lie in"),
        ({"lengths": torch.tensor([1.0, 2.0])}, TypeError, "lengths must be int64"),
        ({"seed": torch.tensor([1, 2])}, ValueError, "seed must hold one element"),
        ({"seed": torch.tensor(1.0)}, TypeError, "seed must be int64"),
    ],
)
def test_op_rejects_bad_inputs(changes: dict, error: type, match: str) -> None:
    args = {"seed": torch.tensor(0)} | _inputs(**changes)
    with pytest.raises(error, match=match):
        torch.ops.reclmis.weighted_mask(
            args["x"], args["weight"], args["ratio"], args["lengths"], args["seed"], False
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_weights_are_ignored(backend: str) -> None:
    w = torch.tensor([[1.0, 2, float("nan"), -1], [0.5, 0.5, 0.5, 0.5]])
    _, mask = weighted_mask(torch.ones(2, 4, 1), w, 0.5, torch.tensor([2, 4]), seed=0, backend=backend)
    assert mask[0].tolist()[2:] == [False, False] and mask.sum(1).tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"weight.*row 0"):
        weighted_mask(torch.ones(2, 4, 1), w, 0.5, torch.tensor([3, 4]), seed=0, backend=backend)


def test_empty_shapes() -> None:
    for b, t, c in [(0, 5, 3), (3, 0, 3), (3, 5, 0)]:
        out, mask = weighted_mask(torch.randn(b, t, c), torch.rand(b, t), 0.5, seed=0)
        assert out.shape == (b, t, c) and mask.shape == (b, t)
        assert torch.equal(mask.sum(1), mask_counts(torch.full((b,), t), 0.5))


CORE_CHECK = r"""
#include "weighted_mask_core.h"
#include <cmath>
#include <cstdio>
using namespace reclmis::wm;

int main() {
  // Random123 known-answer vectors for Philox4x32-10: counter, key, expected output.
  const uint32_t kat[3][10] = {
      {0, 0, 0, 0, 0, 0, 0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8},
      {~0u, ~0u, ~0u, ~0u, ~0u, ~0u, 0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd},
      {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0,
       0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}};
  for (const auto& v : kat) {
    const Words out = philox4x32_10(Words{{v[0], v[1], v[2], v[3]}}, v[4], v[5]);
    for (int i = 0; i < 4; ++i) {
      if (out.w[i] != v[6 + i]) { std::printf("philox mismatch\n"); return 1; }
    }
  }
  // -log(u) against libm over the whole range of u = (n + 1) 2^-53.
  double worst = 0.0;
  for (int i = 0; i < 200000; ++i) {
    const double u = i < 100000 ? uniform(99, 0, i) : std::ldexp(1.0 + (i % 977) / 977.0, -(i % 53) - 1);
    const double want = -std::log(u);
    const double err = want == 0.0 ? std::fabs(neg_log(u)) : std::fabs(neg_log(u) - want) / want;
    worst = err > worst ? err : worst;
  }
  if (neg_log(1.0) != 0.0 || worst > 1e-15) { std::printf("neg_log error %g\n", worst); return 1; }
  // k = max(1, floor(ratio * len)) in double, 0 for empty rows.
  if (mask_count(0, 0.5) != 0 || mask_count(5, 0.0) != 1 || mask_count(10, 0.7) != 7 || mask_count(3, 1.0) != 3) {
    std::printf("mask_count\n");
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler (c++) to build the core check")
def test_core_header_known_answers(tmp_path: Path) -> None:
    source, binary = tmp_path / "core_check.cpp", tmp_path / "core_check"
    source.write_text(CORE_CHECK)
    flags = ["-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}"]
    build = subprocess.run(["c++", *flags, str(source), "-o", str(binary)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    ("b", "t", "c", "x_dtype"), [(32, 196, 512, torch.float32), (32, 18, 3, torch.float16)]
)
def test_cuda_mask_equals_cpu_mask(
    weight_dtype: torch.dtype, b: int, t: int, c: int, x_dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(b, t, c, generator=gen).to(x_dtype)
    w = (torch.rand(b, t, generator=gen) * (torch.rand(b, t, generator=gen) > 0.2)).to(weight_dtype)
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    for lens in (None, lengths):
        cpu = weighted_mask(x, w, 0.3, lens, seed=77)
        gpu = weighted_mask(x.cuda(), w.cuda(), 0.3, None if lens is None else lens.cuda(), seed=77)
        assert torch.equal(gpu[1].cpu(), cpu[1])
        assert torch.equal(gpu[0].cpu(), cpu[0])


@pytest.mark.gpu
@cuda
def test_cuda_unaligned_and_long_rows() -> None:
    # x at an odd storage offset (2-byte vectors), and T beyond 48 KiB of shared memory (opt-in path)
    storage = torch.randn(4 * 7000 * 3 + 1, dtype=torch.float16)
    x = storage[1:].view(4, 7000, 3)
    w = torch.rand(4, 7000)
    cpu = weighted_mask(x, w, 0.5, seed=5)
    gpu = weighted_mask(x.cuda(), w.cuda(), 0.5, seed=5)
    assert torch.equal(gpu[1].cpu(), cpu[1]) and torch.equal(gpu[0].cpu(), cpu[0])


@pytest.mark.gpu
@cuda
def test_cuda_graph_replays_draw_new_masks() -> None:
    # the kernel reads its seed from device memory, drawn in the graph: every replay is a new mask
    x, w = torch.randn(16, 196, 64, device="cuda"), torch.rand(16, 196, device="cuda")
    lengths = torch.full((16,), 150, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        weighted_mask(x, w, 0.5, lengths)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, mask = weighted_mask(x, w, 0.5, lengths)
    masks = []
    for _ in range(3):
        graph.replay()
        masks.append(mask.clone())
    for m in masks:
        assert (m.sum(1) == 75).all() and not m[:, 150:].any()
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert torch.equal(out, x * (~masks[-1])[..., None])
    with pytest.raises(RuntimeError, match="check_weights"), torch.cuda.graph(torch.cuda.CUDAGraph()):
        weighted_mask(x, w, 0.5, check_weights=True)  # would read the row checks back mid-capture


@pytest.mark.gpu
@cuda
def test_reduce_overhead_compile_draws_new_masks() -> None:
    def draw(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return weighted_mask(x, w, 0.5)[1]

    compiled = torch.compile(draw, mode="reduce-overhead", fullgraph=True)
    x, w = torch.randn(8, 196, 32, device="cuda"), torch.rand(8, 196, device="cuda")
    masks = []
    for _ in range(5):  # warm-up, record, then replays of the CUDA graph
        torch.compiler.cudagraph_mark_step_begin()
        masks.append(compiled(x, w).clone())
    assert all((m.sum(1) == 98).all() for m in masks)
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(masks))


@pytest.mark.gpu
@cuda
def test_cuda_gradient_law_and_weight_check() -> None:
    x = torch.randn(20_000, 5, 2, device="cuda", requires_grad=True)
    w = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.2], device="cuda").expand(20_000, 5)
    out, mask = weighted_mask(x, w, 0.4, seed=1)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(x.grad, grad * (~mask)[..., None])
    single, _ = _successive_sampling_law(w[0].tolist(), k=2)
    for t, p in single.items():
        _assert_frequency(mask[:, t].cpu(), p, f"position {t}")
    bad = torch.tensor([[1.0, -1.0, 1.0, 1.0, 1.0]], device="cuda")
    weighted_mask(x[:1].detach(), bad, 0.4, seed=0, check_weights=False)  # treated as zero weight, no sync
    with pytest.raises(ValueError, match="weight must be finite and >= 0; row 0"):
        weighted_mask(x[:1].detach(), bad, 0.4, seed=0)  # eager mode: checked by default
    with pytest.raises(ValueError, match="weight must be finite and >= 0; row 0"):
        weighted_mask(x[:1].detach(), bad, 0.4, seed=0, check_weights=True)
    too_long = torch.tensor([9], device="cuda")
    _, clamped = weighted_mask(x[:1].detach(), w[:1], 0.4, too_long, seed=0, check_weights=False)  # no sync
    assert int(clamped.sum()) == 2
    with pytest.raises(ValueError, match="lengths"):
        weighted_mask(x[:1].detach(), w[:1], 0.4, too_long, seed=0, check_weights=True)
