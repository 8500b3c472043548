"""Fused Triton conditioned attention against the PyTorch reference (DESIGN sections 3.1 and 4).

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set here before triton is imported).
With TRITON_INTERPRET=0 on a CUDA machine the same tests run the compiled kernels on the GPU, and the
``gpu``-marked tests add bf16 and the paper's shapes.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton", reason="the fused conditioned attention needs the triton package")

import reclmis.kernels.conditioned_attention as fused
from reclmis.kernels import _runtime
from reclmis.ops import conditioned_attention, conditioned_attention_reference
from reclmis.ops.conditioned_attention import HEAD_DIMS, REWEIGHT_EPS

if _runtime.interpreting():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip(
        "the Triton kernels were compiled for a GPU (TRITON_INTERPRET=0) and CUDA is not available",
        allow_module_level=True,
    )

gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or _runtime.interpreting(),
    reason="needs CUDA and compiled kernels: run `TRITON_INTERPRET=0 pytest -m gpu` on a CUDA machine",
)

# (forward, gradients) tolerances against the fp32 reference, DESIGN section 4. On a GPU the kernels run fp32
# dots in TF32 (operands cut to 10 mantissa bits, fp32 accumulation), which the interpreter computes exactly.
# TF32 emulated in the interpreter (operands truncated) at the GPU shapes below needs 1.9e-3 forward and
# 1.5e-2 for the gradients (dcond, a sum over heads and queries): TF32_TOL leaves a margin of 2.5x and 2x.
TF32_TOL = (5e-3, 3e-2)
FP32_TOL = (1e-5, 1e-5) if _runtime.interpreting() else TF32_TOL
TOLERANCES = {torch.float32: FP32_TOL, torch.float16: (2e-3, 1e-2), torch.bfloat16: (2e-2, 5e-2)}

# Short keys (CVR: one key tile, several query blocks), long keys (CLR: queries in one tile, key blocks) at
# the kernels' own tile sizes; both sides long (the general path) under the small tiles below.
SHORT = {"b": 2, "h": 3, "nq": 70, "nk": 13, "d": 32}
LONG = {"b": 2, "h": 2, "nq": 9, "nk": 150, "d": 16}
GENERAL = {"b": 2, "h": 2, "nq": 45, "nk": 40, "d": 16}
PATH = {"short": "keys", "long": "queries", "general": "general"}


@pytest.fixture
def small_tiles(monkeypatch):
    """At D=16: 16-row held and forward tiles, 32-row streamed blocks (16 for fp32) before the 16-row tail,
    so that tens of tokens cross several blocks of every loop in the interpreter. Returns the key tile."""
    monkeypatch.setattr(fused, "HELD_ELEMENTS", 256)
    monkeypatch.setattr(fused, "FORWARD_ELEMENTS", 256)
    monkeypatch.setattr(fused, "STREAM_ELEMENTS", 512)
    return 16


def _inputs(b, h, nq, nk, d, dtype, padded, *, device=DEVICE, seed=0):
    """q, k, v, cond, mask, upstream gradient; the mask leaves sample 0 with no valid key."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (nq, nk, nk))
    cond = 2 * torch.rand(b, nk, generator=g)
    if nk > 1:  # a key the condition switches off entirely (never the only valid key: key 0 stays valid)
        cond[:, nk // 2] = 0.0
    mask = None
    if padded:
        mask = torch.rand(b, nk, generator=g) > 0.3
        mask[0] = False
        mask[1:, 0] = True
    dout = torch.randn(b, h, nq, d, generator=g)
    cast = [t.to(device=device, dtype=dtype) for t in (q, k, v, cond)]
    return *cast, None if mask is None else mask.to(device), dout.to(device=device, dtype=dtype)


def _fused_and_reference(q, k, v, cond, mask, dout, mode, scale=None):
    """Outputs and (dq, dk, dv, dcond) of the kernel and of the fp32 reference on the same input values."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v, cond)]
    out = fused.conditioned_attention_triton(*leaves, mask, mode=mode, scale=scale)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.float().requires_grad_() for t in (q, k, v, cond)]
    ref = conditioned_attention_reference(*ref_leaves, mask, mode=mode, scale=scale)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.float())
    return (out, *grads), (ref, *ref_grads)


def _assert_matches(fused_results, ref_results, dtype, cond_dtype=None):
    fwd_tol, grad_tol = TOLERANCES[dtype]
    dtypes = (dtype, dtype, dtype, dtype, cond_dtype or dtype)
    for name, got, want, tol, expected_dtype in zip(
        ("out", "dq", "dk", "dv", "dcond"),
        fused_results,
        ref_results,
        (fwd_tol, *[grad_tol] * 4),
        dtypes,
        strict=True,
    ):
        assert got.dtype == expected_dtype, f"{name} has dtype {got.dtype}, expected {expected_dtype}"
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["scale", "reweight"])
@pytest.mark.parametrize(
    ("regime", "padded"),
    [("short", False), ("short", True), ("long", False), ("long", True), ("general", True)],
    ids=["short-dense", "short-padded", "long-dense", "long-padded", "general-padded"],
)
def test_matches_reference(regime, padded, mode, dtype, request):
    shape = {"short": SHORT, "long": LONG, "general": GENERAL}[regime]
    if regime == "general":
        request.getfixturevalue("small_tiles")
    q, k, v, cond, mask, dout = _inputs(**shape, dtype=dtype, padded=padded)
    launch = fused.plan(shape["nq"], shape["nk"], shape["d"], dtype, mode)
    assert launch.backward == PATH[regime], launch
    forward = launch.forward
    assert (shape["nq"] > forward["BLOCK_M"]) == (regime != "long"), forward  # several query blocks
    assert (shape["nk"] > 2 * forward["BLOCK_N"]) == (regime != "short"), forward  # several key blocks
    for side, streamed, block in (
        (launch.backward_queries, "nk", "BLOCK_N"),
        (launch.backward_keys, "nq", "BLOCK_M"),
    ):
        if side is not None:  # streamed side: full blocks and a 16-row tail
            assert shape[streamed] > side[block] and shape[streamed] % side[block] > 0, side
    _assert_matches(*_fused_and_reference(q, k, v, cond, mask, dout, mode), dtype)


# Padding in units of the forward's key block (and the backward's streamed key block): leading 1-3 whole
# blocks (the online softmax sees blocks without a valid key first), trailing, and interleaved every 3 keys.
# Sample 1 shifts each pattern by 5 keys off the block boundary.
PATTERNS = ("lead1", "lead2", "lead3", "trailing", "interleaved")


def _padding_mask(pattern: str, b: int, nk: int, tile: int) -> torch.Tensor:
    j = torch.arange(nk)
    rows = []
    for shift in range(0, 5 * b, 5):
        if pattern.startswith("lead"):
            rows.append(j >= int(pattern[-1]) * tile + shift)
        elif pattern == "trailing":
            rows.append(j < nk - tile - 3 - shift)
        else:
            rows.append(((j + shift) // 3) % 2 == 1)
    return torch.stack(rows).to(DEVICE)


def _padding_inputs(pattern, dtype, tile, *, b=2, h=2, nq=5, d=16, seed=0):
    """Conditions down to 1e-8 (sample 0: 1e-8 on every key, as a peaked W_woi gives), kept in fp32 as
    under autocast (fp16 flushes 1e-8 to 0); head 1 has every logit below 0 (q < 0 < k)."""
    nk = 4 * tile + 7
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(b, h, n, d, generator=g) for n in (nq, nk, nk, nq))
    q[:, 1], k[:, 1] = -q[:, 1].abs(), k[:, 1].abs()
    cond = 10.0 ** (-8 * torch.rand(b, nk, generator=g))
    cond[0] = 1e-8
    mask = _padding_mask(pattern, b, nk, tile)
    cast = [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v, dout)]
    return *cast[:3], cond.to(DEVICE), mask, cast[3]


def _assert_padding_case(q, k, v, cond, mask, dout, mode, dtype):
    got, want = _fused_and_reference(q, k, v, cond, mask, dout, mode)
    if mode == "reweight":
        # dcond = dL/dlog(cond + eps) / (cond + eps) reaches 1e8 at cond = 1e-8: compare the O(1) gradient
        # of the log-condition, the same relative error without an absolute tolerance 1e8 times too tight.
        weight = cond + REWEIGHT_EPS
        got, want = (*got[:4], got[4] * weight), (*want[:4], want[4] * weight)
    _assert_matches(got, want, dtype, cond_dtype=torch.float32)


# Every pattern with the queries in one tile (CLR); the general path (queries over several tiles) for two.
PADDING_CASES = [(5, "queries", p) for p in PATTERNS] + [(21, "general", p) for p in ("lead2", "interleaved")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["scale", "reweight"])
@pytest.mark.parametrize(("nq", "path", "pattern"), PADDING_CASES)
def test_padding_patterns(nq, path, pattern, mode, dtype, small_tiles):
    tile = small_tiles
    q, k, v, cond, mask, dout = _padding_inputs(pattern, dtype, tile, nq=nq)
    launch = fused.plan(nq, k.shape[2], 16, dtype, mode)
    assert launch.backward == path and launch.forward["BLOCK_N"] == tile, launch
    _assert_padding_case(q, k, v, cond, mask, dout, mode, dtype)


def test_leading_padded_key_block_at_default_tiles():
    """The reported case: 192 fp16 keys, the first 64 (a whole key block) padded, cond = 1e-8 on the rest."""
    g = torch.Generator().manual_seed(1)
    q, k, v, dout = (
        torch.randn(1, 1, n, 16, generator=g, dtype=torch.float16).to(DEVICE) for n in (4, 192, 192, 4)
    )
    cond = torch.full((1, 192), 1e-8, device=DEVICE)
    mask = (torch.arange(192) >= 64)[None].to(DEVICE)
    assert fused.plan(4, 192, 16, torch.float16, "reweight").forward["BLOCK_N"] == 64
    _assert_padding_case(q, k, v, cond, mask, dout, "reweight", torch.float16)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims(d):
    mode = "scale" if d in (16, 64, 256) else "reweight"
    q, k, v, cond, mask, dout = _inputs(1, 2, 20, 40, d, torch.float32, padded=True, seed=d)
    _assert_matches(*_fused_and_reference(q, k, v, cond, mask, dout, mode), torch.float32)


@pytest.mark.parametrize("regime", ["short", "long"])
def test_row_without_valid_key_gives_exact_zeros(regime):
    shape = SHORT if regime == "short" else LONG
    q, k, v, cond, mask, dout = _inputs(**shape, dtype=torch.float32, padded=True)
    (out, dq, dk, dv, dcond), _ = _fused_and_reference(q, k, v, cond, mask, dout, "reweight")
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv), ("dcond", dcond)):
        assert torch.isfinite(t).all(), name
        assert (t[0] == 0).all(), f"{name} of the sample without valid key is not zero"
    padded = ~mask
    assert padded[1:].any()
    for name, t in (("dk", dk.transpose(1, 2)), ("dv", dv.transpose(1, 2)), ("dcond", dcond)):
        assert (t[padded] == 0).all(), f"{name} of padded keys is not zero"


@pytest.mark.parametrize(("nq", "nk", "mode"), [(1, 1, "scale"), (1, 5, "reweight"), (3, 1, "reweight")])
def test_single_query_or_key_and_broadcast_gradient(nq, nk, mode):
    """out.sum() hands the backward an expanded dO with stride 0."""
    q, k, v, cond, _, _ = _inputs(2, 2, nq, nk, 16, torch.float32, padded=False)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, cond)]
    out = fused.conditioned_attention_triton(*leaves, None, mode=mode)
    grads = torch.autograd.grad(out.sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, cond)]
    ref = conditioned_attention_reference(*ref_leaves, None, mode=mode)
    ref_grads = torch.autograd.grad(ref.sum(), ref_leaves)
    _assert_matches((out, *grads), (ref, *ref_grads), torch.float32)


def test_custom_scale_and_strided_inputs():
    """Strided (B, N, H, D) -> (B, H, N, D) views as the model's projections produce, and an explicit scale."""
    b, h, nq, nk, d = 2, 2, 33, 21, 32
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, nq, h, d, generator=g).to(DEVICE).transpose(1, 2)
    k, v = (torch.randn(b, nk, h, d, generator=g).to(DEVICE).transpose(1, 2) for _ in range(2))
    cond = torch.rand(nk, b, generator=g).to(DEVICE).t()
    dout = torch.randn(b, h, nq, d, generator=g).to(DEVICE)
    assert not q.is_contiguous() and not cond.is_contiguous()
    results = _fused_and_reference(q, k, v, cond, None, dout, "scale", scale=0.3)
    _assert_matches(*results, torch.float32)


def test_64bit_offsets_past_2_31_elements():
    """k and v are views with a batch stride of 2^30 + 2^20 elements, so sample 2 starts past 2^31 elements,
    where 32-bit offsets (b * stride) wrap. The 4 GiB buffer is only reserved: on CPU, pages never written
    are never backed by memory."""
    b, h, nq, nk, d = 3, 2, 5, 20, 16
    batch_stride = 2**30 + 2**20
    try:
        buffer = torch.empty(2 * batch_stride + h * 2 * nk * d, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError) as error:
        pytest.skip(f"cannot reserve 4 GiB of address space for the strided view: {error}")
    kv = buffer.as_strided((b, h, 2 * nk, d), (batch_stride, 2 * nk * d, d, 1))
    q, k, v, cond, mask, dout = _inputs(b, h, nq, nk, d, torch.float16, padded=True)
    kv.copy_(torch.cat([k, v], dim=2))
    k_view, v_view = kv[:, :, :nk].requires_grad_(), kv[:, :, nk:].requires_grad_()  # no copy: the kernels
    assert k_view.stride(0) == batch_stride and (b - 1) * batch_stride >= 2**31  # read the strided views
    leaves = (q.clone().requires_grad_(), k_view, v_view, cond.clone().requires_grad_())
    out = fused.conditioned_attention_triton(*leaves, mask, mode="reweight")
    got = (out, *torch.autograd.grad(out, leaves, dout))
    _assert_matches(got, _fused_and_reference(q, k, v, cond, mask, dout, "reweight")[1], torch.float16)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("d", [64, 128])
def test_paper_regimes_take_the_one_launch_backward(d, dtype):
    """CVR (196 image tokens over 18 words) holds the keys, CLR (18 words over 196 image tokens) the queries."""
    cvr = fused.plan(196, 18, d, dtype, "reweight")
    clr = fused.plan(18, 196, d, dtype, "reweight")
    assert (cvr.backward, cvr.backward_keys["BLOCK_N"]) == ("keys", 32), cvr
    assert (clr.backward, clr.backward_queries["BLOCK_M"]) == ("queries", 32), clr


FUSED_KERNELS = ("forward", "backward_queries", "backward_keys")


class _CountLaunches:
    """Stands in for a kernel: records its name at every launch, then launches it."""

    def __init__(self, kernel, launches: list[str]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(self.kernel.__name__)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("regime", ["short", "long", "general"])
def test_kernel_launches_per_call(regime, small_tiles, monkeypatch):
    launches = []
    forward, queries, keys = (f"_conditioned_attention_{name}_kernel" for name in FUSED_KERNELS)
    for name in (forward, queries, keys):
        monkeypatch.setattr(fused, name, _CountLaunches(getattr(fused, name), launches))
    shape = {"short": {**SHORT, "nk": 13}, "long": {**LONG, "nk": 40}, "general": GENERAL}[regime]
    q, k, v, cond, mask, dout = _inputs(**{**shape, "d": 16}, dtype=torch.float32, padded=True)
    _fused_and_reference(q, k, v, cond, mask, dout, "scale")
    expected = {"short": [forward, keys], "long": [forward, queries], "general": [forward, queries, keys]}
    assert launches == expected[regime]


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_registered_ops_pass_opcheck(padded):
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of both torch.library ops."""
    q, k, v, cond, mask, dout = _inputs(2, 2, 9, 20, 16, torch.float32, padded=padded)
    leaves = [t.requires_grad_() for t in (q, k, v, cond)]
    args = (*leaves, mask, "reweight", 0.25)
    torch.library.opcheck(torch.ops.reclmis.conditioned_attention_forward.default, args)
    out, lse = (t.detach() for t in torch.ops.reclmis.conditioned_attention_forward(*args))
    bwd_args = (dout, *(t.detach() for t in leaves), mask, out, lse, "reweight", 0.25)
    torch.library.opcheck(torch.ops.reclmis.conditioned_attention_backward.default, bwd_args)


def test_compiles_without_graph_break():
    """torch.compile(fullgraph=True) traces the public op's forward and backward (no host sync, no break)."""
    q, k, v, cond, mask, dout = _inputs(2, 2, 9, 20, 16, torch.float32, padded=True)

    def loss(q, k, v, cond):
        out = conditioned_attention(q, k, v, cond, mask, mode="reweight", backend="triton")
        return (out * dout).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss, compiled):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, cond)]
        value = fn(*leaves)
        results.append((value, *torch.autograd.grad(value, leaves)))
    for name, got, want in zip(("loss", "dq", "dk", "dv", "dcond"), *results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["scale", "reweight"])
def test_fp32_condition_with_fp16_inputs(mode):
    """Under autocast the condition (a softmax) stays fp32 while q, k, v are fp16."""
    q, k, v, cond, mask, dout = _inputs(**LONG, dtype=torch.float16, padded=True)
    results = _fused_and_reference(q, k, v, cond.float(), mask, dout, mode)
    _assert_matches(*results, torch.float16, cond_dtype=torch.float32)


@pytest.mark.parametrize("mode", ["scale", "reweight"])
def test_cond_gradient_is_deterministic(mode):
    q, k, v, cond, mask, dout = _inputs(b=2, h=4, nq=9, nk=40, d=16, dtype=torch.float32, padded=True)
    first, _ = _fused_and_reference(q, k, v, cond, mask, dout, mode)
    second, _ = _fused_and_reference(q, k, v, cond, mask, dout, mode)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dcond"), first, second, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_ops_backend_triton_runs_the_kernel(monkeypatch):
    calls = []
    kernel = fused.conditioned_attention_triton

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(fused, "conditioned_attention_triton", spy)
    q, k, v, cond, mask, _ = _inputs(**SHORT, dtype=torch.float32, padded=True)
    out = conditioned_attention(q, k, v, cond, mask, mode="reweight", backend="triton")
    assert calls == [{"mode": "reweight", "scale": None}]
    assert torch.equal(out, kernel(q, k, v, cond, mask, mode="reweight"))


def test_ops_backend_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(_runtime, "interpreting", lambda: False)  # as if triton had compiled the kernels
    q, k, v, cond, mask, _ = _inputs(**SHORT, dtype=torch.float32, padded=False, device="cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        conditioned_attention(q, k, v, cond, mask, backend="triton")


def test_cond_values_are_checked_in_eager_mode_only():
    """A negative cond is a ValueError in eager mode; a compiled step reads no value (fullgraph: a host read
    would break the graph) and computes with it as the reference does."""
    q, k, v, cond, mask, _ = _inputs(**SHORT, dtype=torch.float32, padded=True)
    cond[1, 3] = -0.5
    assert mask[1, 3]

    def attend(q, k, v, cond):
        return conditioned_attention(q, k, v, cond, mask, mode="scale", backend="triton")

    with pytest.raises(ValueError, match=r"cond must be finite and >= 0; row 1 holds -0\.5 at column 3"):
        attend(q, k, v, cond)
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v, cond)
    expected = conditioned_attention_reference(q, k, v, cond, mask, mode="scale")
    torch.testing.assert_close(compiled, expected, atol=FP32_TOL[0], rtol=FP32_TOL[0])


@pytest.mark.skipif(not _runtime.interpreting(), reason="the interpreter's limit: compiled kernels run bf16")
def test_bf16_in_the_interpreter_is_refused():
    """The interpreter has no bfloat16 (its dots returned values around 1e9): an error naming the dtype and
    the backend. A bf16 cond with fp32 features is computed (no dot takes it)."""
    q, k, v, cond, mask, _ = _inputs(**SHORT, dtype=torch.bfloat16, padded=True)
    with pytest.raises(
        TypeError, match=r"conditioned_attention\(backend='triton'\).*q of dtype torch.bfloat16"
    ):
        conditioned_attention(q, k, v, cond, mask, backend="triton")
    q, k, v, cond, mask, _ = _inputs(**SHORT, dtype=torch.float32, padded=True)
    got = conditioned_attention(q, k, v, cond.bfloat16(), mask, backend="triton")
    torch.testing.assert_close(got, conditioned_attention_reference(q, k, v, cond.bfloat16(), mask))


# Paper shapes (DESIGN section 5; batch reduced), the ends of the sweep and extreme head dims, on a GPU.
GPU_SHAPES = {
    "cvr": {"b": 4, "h": 4, "nq": 196, "nk": 18, "d": 128},
    "clr": {"b": 4, "h": 4, "nq": 18, "nk": 196, "d": 128},
    "cvr_large": {"b": 2, "h": 4, "nq": 784, "nk": 77, "d": 128},
    "clr_large": {"b": 2, "h": 4, "nq": 77, "nk": 784, "d": 128},
    "d16": {"b": 2, "h": 2, "nq": 100, "nk": 300, "d": 16},
    "d256": {"b": 2, "h": 2, "nq": 100, "nk": 50, "d": 256},
    "d256_long": {"b": 2, "h": 2, "nq": 50, "nk": 300, "d": 256},
}
GPU_CASES = [
    *((shape, mode) for shape in ("cvr", "clr") for mode in ("scale", "reweight")),
    *((shape, "reweight") for shape in ("cvr_large", "d16", "d256")),
    *((shape, "scale") for shape in ("clr_large", "d256_long")),
]
ALL_DTYPES = pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)


@pytest.mark.gpu
@gpu
@ALL_DTYPES
@pytest.mark.parametrize(("shape", "mode"), GPU_CASES)
def test_gpu_matches_reference(shape, mode, dtype):
    q, k, v, cond, mask, dout = _inputs(**GPU_SHAPES[shape], dtype=dtype, padded=True, device="cuda")
    _assert_matches(*_fused_and_reference(q, k, v, cond, mask, dout, mode), dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", ["cvr", "clr"])
def test_gpu_gradients_are_deterministic(shape):
    q, k, v, cond, mask, dout = _inputs(**GPU_SHAPES[shape], dtype=torch.bfloat16, padded=True, device="cuda")
    first, _ = _fused_and_reference(q, k, v, cond, mask, dout, "reweight")
    second, _ = _fused_and_reference(q, k, v, cond, mask, dout, "reweight")
    for name, a, b in zip(("out", "dq", "dk", "dv", "dcond"), first, second, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["scale", "reweight"])
@pytest.mark.parametrize(("nq", "path", "pattern"), PADDING_CASES)
def test_gpu_padding_patterns_bf16(nq, path, pattern, mode, small_tiles):
    q, k, v, cond, mask, dout = _padding_inputs(pattern, torch.bfloat16, small_tiles, nq=nq)
    assert fused.plan(nq, k.shape[2], 16, torch.bfloat16, mode).backward == path
    _assert_padding_case(q, k, v, cond, mask, dout, mode, torch.bfloat16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", ["cvr", "clr"])
def test_gpu_forward_backward_replays_in_a_cuda_graph(shape):
    """No host sync and no data-dependent allocation: forward and backward capture in one CUDA graph, and a
    replay on new input values gives what an eager call gives."""
    q, k, v, cond, mask, dout = _inputs(**GPU_SHAPES[shape], dtype=torch.bfloat16, padded=True, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v, cond)]

    def step():
        out = fused.conditioned_attention_triton(*leaves, mask, mode="reweight")
        return (out, *torch.autograd.grad(out, leaves, dout))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation) outside the capture, as torch.cuda.graph asks
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for t in leaves:
            t.mul_(0.5)
    graph.replay()
    for name, got, want in zip(("out", "dq", "dk", "dv", "dcond"), captured, step(), strict=True):
        assert torch.equal(got, want), f"{name} of the replayed graph differs from an eager call"


@pytest.mark.gpu
@gpu
def test_gpu_public_op_captures_without_reading_cond():
    """In eager mode the public op reads cond back to check it; under a CUDA graph capture it must not."""
    q, k, v, cond, mask, _ = _inputs(**GPU_SHAPES["cvr"], dtype=torch.bfloat16, padded=True, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        expected = conditioned_attention(q, k, v, cond, mask, mode="reweight")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = conditioned_attention(q, k, v, cond, mask, mode="reweight")
    graph.replay()
    assert torch.equal(captured, expected)


@pytest.mark.gpu
@gpu
def test_gpu_auto_backend_uses_the_kernel(monkeypatch):
    calls = []
    kernel = fused.conditioned_attention_triton
    monkeypatch.setattr(
        fused, "conditioned_attention_triton", lambda *a, **kw: calls.append(1) or kernel(*a, **kw)
    )
    q, k, v, cond, mask, _ = _inputs(**GPU_SHAPES["cvr"], dtype=torch.float16, padded=True, device="cuda")
    conditioned_attention(q, k, v, cond, mask)
    assert calls == [1]
