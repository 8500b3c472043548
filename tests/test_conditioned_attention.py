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
from reclmis.ops import conditioned_attention, conditioned_attention_reference
from reclmis.ops.conditioned_attention import HEAD_DIMS

if fused.interpreted():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip(
        "the Triton kernels were compiled for a GPU (TRITON_INTERPRET=0) and CUDA is not available",
        allow_module_level=True,
    )

gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or fused.interpreted(),
    reason="needs CUDA and compiled kernels: run `TRITON_INTERPRET=0 pytest -m gpu` on a CUDA machine",
)

# (forward, gradients) tolerances against the fp32 reference, DESIGN section 4.
FP32_TOL = 1e-5 if fused.interpreted() else 1e-4
TOLERANCES = {torch.float32: (FP32_TOL, FP32_TOL), torch.float16: (2e-3, 1e-2), torch.bfloat16: (2e-2, 5e-2)}

# Short keys (CVR: one key tile, several query blocks) and long keys (CLR: online softmax over key blocks).
SHORT = {"b": 2, "h": 3, "nq": 70, "nk": 13, "d": 32}
LONG = {"b": 2, "h": 2, "nq": 9, "nk": 150, "d": 16}


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


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["scale", "reweight"])
@pytest.mark.parametrize("regime", ["short", "long"])
def test_matches_reference(regime, mode, dtype, padded):
    shape = SHORT if regime == "short" else LONG
    q, k, v, cond, mask, dout = _inputs(**shape, dtype=dtype, padded=padded)
    fwd, _, dkdv = fused._launch_params(q, shape["nk"], mode, padded)
    if regime == "short":
        assert fwd["ONE_TILE"] and shape["nq"] > fwd["BLOCK_M"], fwd
    else:
        assert not fwd["ONE_TILE"] and shape["nk"] > 2 * max(fwd["BLOCK_N"], dkdv["BLOCK_N"]), (fwd, dkdv)
    _assert_matches(*_fused_and_reference(q, k, v, cond, mask, dout, mode), dtype)


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


@pytest.mark.parametrize("mode", ["scale", "reweight"])
def test_fp32_condition_with_fp16_inputs(mode):
    """Under autocast the condition (a softmax) stays fp32 while q, k, v are fp16."""
    q, k, v, cond, mask, dout = _inputs(**LONG, dtype=torch.float16, padded=True)
    results = _fused_and_reference(q, k, v, cond.float(), mask, dout, mode)
    _assert_matches(*results, torch.float16, cond_dtype=torch.float32)


@pytest.mark.parametrize("mode", ["scale", "reweight"])
def test_cond_gradient_is_deterministic(mode):
    q, k, v, cond, mask, dout = _inputs(b=2, h=4, nq=40, nk=150, d=16, dtype=torch.float32, padded=True)
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
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, cond, mask, _ = _inputs(**SHORT, dtype=torch.float32, padded=False, device="cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        conditioned_attention(q, k, v, cond, mask, backend="triton")


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
def test_gpu_auto_backend_uses_the_kernel(monkeypatch):
    calls = []
    kernel = fused.conditioned_attention_triton
    monkeypatch.setattr(
        fused, "conditioned_attention_triton", lambda *a, **kw: calls.append(1) or kernel(*a, **kw)
    )
    q, k, v, cond, mask, _ = _inputs(**GPU_SHAPES["cvr"], dtype=torch.float16, padded=True, device="cuda")
    conditioned_attention(q, k, v, cond, mask)
    assert calls == [1]
