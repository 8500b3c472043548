"""The fused max-similarity kernel (reclmis.kernels.max_similarity) against the materialising reference.

Without CUDA the kernels run in Triton's interpreter on CPU tensors. TRITON_INTERPRET=1 must be set before
triton is first imported (triton's own tl.sum and tl.max take their flavour then), hence the top of this
module. With CUDA and TRITON_INTERPRET unset the same cases run compiled on the GPU, and the tests marked
gpu add bf16, the paper shape, determinism at scale and the memory bound.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from torch.utils._python_dispatch import TorchDispatchMode

import reclmis.ops
from reclmis.kernels import _runtime
from reclmis.kernels import max_similarity as kernels
from reclmis.ops import max_similarity_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = _runtime.interpreting()
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETED,
    reason="no CUDA, and TRITON_INTERPRET=0 was set: the kernels cannot run",
)
needs_compiled_cuda = pytest.mark.skipif(
    DEVICE != "cuda" or INTERPRETED,
    reason="needs CUDA and compiled kernels: run `TRITON_INTERPRET=0 pytest -m gpu` on a CUDA machine",
)

# (forward, gradient) atol = rtol against the fp32 reference (DESIGN section 4)
TOL = {
    torch.float32: (1e-5, 1e-5) if INTERPRETED else (1e-4, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
}
GRADS = ("img", "txt", "img_weight", "txt_weight")


def make_inputs(bi, bt, n, l, c, dtype, *, masked=True, seed=0, device=DEVICE):
    """Features, softmax weights and a mask whose texts cycle through: all valid, one valid token (not the
    first), none valid, a random non-prefix pattern. Padded tokens hold garbage the kernel must ignore."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(bi, n, c, generator=gen)
    txt = torch.randn(bt, l, c, generator=gen)
    img_weight = torch.randn(bi, n, generator=gen).softmax(-1)
    txt_weight = torch.randn(bt, l, generator=gen).softmax(-1)
    mask = None
    if masked:
        mask = torch.rand(bt, l, generator=gen) < 0.6
        mask[0::4] = True
        mask[1::4] = False
        mask[1::4, l // 2] = True
        mask[2::4] = False
        mask[3::4, l - 1] = True
        mask = mask.to(device)
    cast = [t.to(device=device, dtype=dtype) for t in (img, txt, img_weight, txt_weight)]
    return cast, mask


def run_both(inputs, mask, normalize, *, backend="triton", seed=1):
    """S and the four gradients for a random upstream gradient, from the op and from the fp32 reference."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    refs = [t.detach().float().requires_grad_() for t in inputs]
    s = reclmis.ops.max_similarity(*leaves, mask, normalize=normalize, backend=backend)
    d_s = torch.randn(s.shape, generator=torch.Generator().manual_seed(seed)).to(s.device)
    s.backward(d_s)
    s_ref = max_similarity_reference(*refs, mask, normalize=normalize)
    s_ref.backward(d_s)
    return (s, *[t.grad for t in leaves]), (s_ref, *[t.grad for t in refs])


def assert_matches(got, want, inputs):
    fwd_tol, grad_tol = TOL[inputs[0].dtype]
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=fwd_tol, rtol=fwd_tol)
    for name, g, w, x in zip(GRADS, got[1:], want[1:], inputs, strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        torch.testing.assert_close(
            g.float(), w, atol=grad_tol, rtol=grad_tol, msg=lambda m, n=name: f"d{n}: {m}"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize(
    ("shape", "masked"),
    [
        ((3, 4, 70, 21, 80), True),  # N and C cross their tiles; every kind of padded text
        ((5, 2, 17, 5, 24), True),  # Bi > Bt: the text-side backward splits over image groups
        ((2, 6, 40, 40, 33), False),  # odd C, no mask, each text spanning three of the forward's tiles
    ],
    ids=["tiles", "split", "nomask"],
)
def test_matches_reference(shape, masked, normalize, dtype):
    inputs, mask = make_inputs(*shape, dtype, masked=masked)
    got, want = run_both(inputs, mask, normalize)
    assert_matches(got, want, inputs)
    if mask is not None:  # padded tokens: no gradient at all, exactly
        _, _, d_txt, _, d_txt_weight = got
        assert torch.equal(d_txt[~mask], torch.zeros_like(d_txt[~mask]))
        assert torch.equal(d_txt_weight[~mask], torch.zeros_like(d_txt_weight[~mask]))


# A valid entry of each input: image 1's first token (in the forward's second image block; the first row of
# a backward block, which the gathers of unpicked rows read), token 40, text 0's token 4 (all of text 0's
# tokens are valid), and channel 3 of a feature.
NAN_AT = {"img": (1, 0, 3), "txt": (0, 4, 3), "img_weight": (1, 40), "txt_weight": (0, 4)}


@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("poisoned", GRADS)
def test_nan_propagates_as_in_the_reference(poisoned, normalize):
    """One NaN in any input: S is NaN exactly where the reference's is (a row of S for an image's NaN, a
    column for a text's), equal elsewhere, and every gradient equals the reference's wherever that is finite
    (tl.max skips NaN: the kernels used to return S without any NaN)."""
    inputs, mask = make_inputs(3, 4, 70, 21, 80, torch.float32)
    assert mask[NAN_AT["txt"][:2]]
    inputs[GRADS.index(poisoned)][NAN_AT[poisoned]] = float("nan")
    got, want = run_both(inputs, mask, normalize)
    assert want[0].isnan().any() and not want[0].isnan().all()
    fwd_tol, grad_tol = TOL[torch.float32]
    torch.testing.assert_close(got[0], want[0], atol=fwd_tol, rtol=fwd_tol, equal_nan=True)
    for name, g, w in zip(GRADS, got[1:], want[1:], strict=True):
        defined = w.isfinite()
        torch.testing.assert_close(
            g[defined], w[defined], atol=grad_tol, rtol=grad_tol, msg=lambda m, n=name: f"d{n}: {m}"
        )


def test_nan_at_padded_tokens_is_never_read():
    inputs, mask = make_inputs(3, 4, 20, 6, 16, torch.float32)
    padded = (~mask).nonzero()[0].tolist()
    inputs[1][padded[0], padded[1], 2] = float("nan")
    inputs[3][padded[0], padded[1]] = float("nan")
    got, want = run_both(inputs, mask, normalize=True)
    assert all(t.isfinite().all() for t in (*got, *want))
    assert_matches(got, want, inputs)


def test_fp32_weights_and_strided_features():
    """Weights from an fp32 softmax (autocast) with fp16 features, the text features a transposed view."""
    (img, txt, img_weight, txt_weight), mask = make_inputs(3, 4, 30, 9, 40, torch.float16)
    txt = txt.transpose(1, 2).contiguous().transpose(1, 2)  # (Bt, L, C) with C-major strides
    inputs = [img, txt, img_weight.float(), txt_weight.float()]
    got, want = run_both(inputs, mask, normalize=True)
    assert_matches(got, want, inputs)


def test_text_without_valid_tokens_contributes_nothing():
    inputs, mask = make_inputs(3, 4, 20, 6, 16, torch.float32)
    assert not mask[2].any()
    s, d_img, d_txt, d_img_weight, _ = run_both(inputs, mask, normalize=True)[0]
    assert torch.equal(s[:, 2], torch.zeros(3, device=DEVICE))
    assert torch.equal(d_txt[2], torch.zeros_like(d_txt[2]))
    # its column of S is independent of the images: dropping it changes no image gradient
    kept = [0, 1, 3]
    sub = (inputs[0], inputs[1][kept], inputs[2], inputs[3][kept])
    leaves = [t.clone().requires_grad_() for t in sub]
    d_s = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)[:, kept]
    reclmis.ops.max_similarity(*leaves, mask[kept], backend="triton").backward(d_s)
    torch.testing.assert_close(leaves[0].grad, d_img, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(leaves[2].grad, d_img_weight, atol=1e-6, rtol=1e-6)


def test_backward_is_deterministic():
    """No atomics: two forward and backward passes agree bitwise (the text side split over image groups)."""
    inputs, mask = make_inputs(5, 2, 17, 5, 24, torch.float16)
    first, _ = run_both(inputs, mask, normalize=True)
    second, _ = run_both(inputs, mask, normalize=True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
def test_packed_tiles_of_notes_with_different_lengths(normalize, dtype):
    """Texts share the forward's token tiles and straddle their edges, images straddle its blocks: seven
    notes of 5 tokens with 5, 3, 1, 0, 2, 5, 4 valid (one valid token next to an empty note) against five
    images of 20 tokens."""
    bi, bt, n, l, c = 5, 7, 20, 5, 24
    cfg = kernels._Config.of(bi, bt, n, l, c, dtype)
    assert l < cfg.block_l < bt * l and cfg.block_l % l, "several notes per tile, some cut by a tile edge"
    assert cfg.block_n < bi * n and cfg.block_n % n, "images cut by block edges"
    inputs, _ = make_inputs(bi, bt, n, l, c, dtype, masked=False)
    mask = (torch.arange(l)[None] < torch.tensor([5, 3, 1, 0, 2, 5, 4])[:, None]).to(DEVICE)
    got, want = run_both(inputs, mask, normalize)
    assert_matches(got, want, inputs)
    s, _, d_txt, _, d_txt_weight = got
    assert torch.equal(s[:, 3], torch.zeros_like(s[:, 3]))  # the empty note scores 0
    assert torch.equal(d_txt[~mask], torch.zeros_like(d_txt[~mask]))
    assert torch.equal(d_txt_weight[~mask], torch.zeros_like(d_txt_weight[~mask]))


def test_wide_channels_stream_the_image_block(monkeypatch):
    """An image block that does not fit on chip (C > 512 at 64 fp16 tokens) is streamed in channel blocks."""
    monkeypatch.setattr(kernels, "RESIDENT_BYTES", 0)
    bi, bt, n, l, c = 3, 4, 30, 7, 80
    assert not kernels._Config.of(bi, bt, n, l, c, torch.float16).resident
    inputs, mask = make_inputs(bi, bt, n, l, c, torch.float16)
    got, want = run_both(inputs, mask, normalize=True)
    assert_matches(got, want, inputs)


@pytest.mark.parametrize(
    "wanted", [(0,), (1,), (2,), (3,), (1, 2)], ids=["img", "txt", "img_w", "txt_w", "mixed"]
)
def test_only_the_requested_gradients(wanted):
    """The backward computes the gradients autograd asks for, each equal to the one of a full backward."""
    inputs, mask = make_inputs(3, 4, 20, 6, 16, torch.float32)
    leaves = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    s = reclmis.ops.max_similarity(*leaves, mask, backend="triton")
    d_s = torch.randn(s.shape, generator=torch.Generator().manual_seed(1)).to(s.device)
    grads = torch.autograd.grad(s, [leaves[i] for i in wanted], d_s)
    full = run_both(inputs, mask, normalize=True)[0][1:]
    for i, g in zip(wanted, grads, strict=True):
        assert torch.equal(g, full[i]), GRADS[i]


def test_images_longer_than_a_backward_block():
    """N = 300 image tokens: the backward sorts and sums them in two blocks of 256, and the image token a
    text token picked may lie in either."""
    inputs, mask = make_inputs(2, 3, 300, 7, 16, torch.float32)
    assert kernels._Config.of(2, 3, 300, 7, 16, torch.float32).bwd_r < 300
    got, want = run_both(inputs, mask, normalize=True)
    assert_matches(got, want, inputs)


def test_long_texts_index_in_int32():
    """From 127 text tokens on, the argmax over tokens and the backward's sort keys no longer fit int16."""
    inputs, mask = make_inputs(2, 3, 11, 130, 16, torch.float32)
    got, want = run_both(inputs, mask, normalize=True)
    assert_matches(got, want, inputs)
    row_arg = torch.ops.reclmis.max_similarity_forward(*inputs, mask.view(torch.uint8), True)[4]
    assert row_arg.dtype == torch.int32


class _DispatchedOps(TorchDispatchMode):
    """Records the overload packets of every op dispatched (custom ops included)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's limit: compiled kernels run bf16")
def test_bf16_in_the_interpreter_is_refused():
    """The interpreter has no bfloat16 (its dots returned S around 1e9): an error naming the dtype and the
    backend. bf16 weights with fp32 features are computed (no dot takes them)."""
    inputs, mask = make_inputs(3, 4, 20, 6, 16, torch.bfloat16)
    with pytest.raises(TypeError, match=r"max_similarity\(backend='triton'\).*img of dtype torch.bfloat16"):
        reclmis.ops.max_similarity(*inputs, mask, backend="triton")
    (img, txt, img_weight, txt_weight), mask = make_inputs(3, 4, 20, 6, 16, torch.float32)
    inputs = [img, txt, img_weight.bfloat16(), txt_weight.bfloat16()]
    got, want = run_both(inputs, mask, normalize=True)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g.float(), w, atol=TOL[torch.bfloat16][1], rtol=TOL[torch.bfloat16][1])


def test_op_dispatches_to_the_kernel():
    inputs, mask = make_inputs(2, 3, 9, 4, 16, torch.float32)
    leaves = [t.requires_grad_() for t in inputs]
    with _DispatchedOps() as dispatched:
        reclmis.ops.max_similarity(*leaves, mask, backend="triton").sum().backward()
    fused = {torch.ops.reclmis.max_similarity_forward, torch.ops.reclmis.max_similarity_backward}
    assert fused <= dispatched.ops
    with _DispatchedOps() as dispatched:
        reclmis.ops.max_similarity(*inputs, mask, backend="auto")
    assert (torch.ops.reclmis.max_similarity_forward in dispatched.ops) == (DEVICE == "cuda")


class _LargestAllocation(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any torch op creates."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out


def test_memory_is_linear_in_tokens():
    """Saved for the backward: the maxima and their argmax indices (Bi*Bt*(N+L) of each; int16 over L < 127
    text tokens) and the inverse norms; no op in the forward or backward creates anything near the
    Bi*Bt*N*L similarity tensor."""
    bi, bt, n, l, c = 4, 4, 100, 40, 16
    inputs, mask = make_inputs(bi, bt, n, l, c, torch.float32)
    leaves = [t.requires_grad_() for t in inputs]
    with _LargestAllocation() as largest:
        s = reclmis.ops.max_similarity(*leaves, mask, backend="triton")
        s.sum().backward()
    assert largest.nbytes * 4 < bi * bt * n * l * 4  # a quarter of the fp32 similarity tensor
    s = reclmis.ops.max_similarity(*leaves, mask, backend="triton")
    inputs_ptrs = {t.data_ptr() for t in leaves}
    saved = [t for t in s.grad_fn.saved_tensors if t.data_ptr() not in inputs_ptrs]
    assert sum(t.numel() for t in saved if t.dtype == torch.int16) == bi * bt * n  # argmax over tokens
    assert sum(t.numel() for t in saved if t.dtype == torch.int32) == bi * bt * l  # argmax over patches
    maxima_and_norms = bi * bt * (n + l) + bi * n + bt * l
    assert sum(t.numel() for t in saved if t.dtype == torch.float32) == maxima_and_norms
    assert sum(t.numel() for t in saved if t.dtype == torch.uint8) == bt * l  # the mask


def op_args(bi=2, bt=3, n=9, l=4, c=16, normalize=True):
    """Arguments of reclmis::max_similarity_forward, and of its backward given that forward's outputs."""
    inputs, mask = make_inputs(bi, bt, n, l, c, torch.float32)
    forward = (*inputs, mask.view(torch.uint8), normalize)
    saved = torch.ops.reclmis.max_similarity_forward(*forward)
    d_s = torch.randn(bi, bt, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    return forward, (d_s, *inputs, mask.view(torch.uint8), *saved[1:], normalize, [True, True, True, True])


@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
def test_custom_ops_pass_opcheck(normalize):
    """Schema, fake kernels (static and dynamic shapes) and the autograd registration of both custom ops."""
    forward, backward = op_args(normalize=normalize)
    forward = tuple(t.detach().clone().requires_grad_() for t in forward[:4]) + forward[4:]
    torch.library.opcheck(torch.ops.reclmis.max_similarity_forward.default, forward)
    torch.library.opcheck(torch.ops.reclmis.max_similarity_backward.default, backward)


def test_compiled_graph_has_no_break_and_matches_eager():
    """torch.compile(fullgraph=True) traces the public op, forward and backward, as one graph (the custom ops
    opaque), with the eager result and gradients."""
    inputs, mask = make_inputs(3, 4, 20, 6, 16, torch.float32)

    def loss(img, txt, img_weight, txt_weight):
        s = reclmis.ops.max_similarity(img, txt, img_weight, txt_weight, mask, backend="triton")
        return (s * torch.arange(s.numel(), device=s.device).view(s.shape)).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss, compiled):
        leaves = [t.clone().requires_grad_() for t in inputs]
        value = fn(*leaves)
        value.backward()
        results.append((value, *[t.grad for t in leaves]))
    for eager, traced in zip(*results, strict=True):
        torch.testing.assert_close(traced, eager, atol=0, rtol=0)


def paper_inputs(batch, dtype, seed=1):
    """The paper shape (N=196 patches, C=512, L=18 tokens, 3..18 valid) on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    n, l, c = 196, 18, 512
    img = torch.randn(batch, n, c, generator=gen)
    txt = torch.randn(batch, l, c, generator=gen)
    img_weight = torch.randn(batch, n, generator=gen).softmax(-1)
    txt_weight = torch.randn(batch, l, generator=gen).softmax(-1)
    mask = torch.arange(l)[None] < torch.randint(3, l + 1, (batch,), generator=gen)[:, None]
    return [t.to("cuda", dtype) for t in (img, txt, img_weight, txt_weight)], mask.cuda()


def nearest_tie(img, txt, mask):
    """Smallest gap between the two largest cosines of any row (valid tokens) or column (patches), in fp64.
    Kernel and reference round differently (~1e-8 here), so their argmax may differ only on closer calls."""
    sim = torch.einsum(
        "anc,blc->abnl",
        torch.nn.functional.normalize(img.double(), dim=-1),
        torch.nn.functional.normalize(txt.double(), dim=-1),
    )
    rows = sim.masked_fill(~mask[None, :, None, :], float("-inf")).topk(2, dim=-1).values
    cols = sim.topk(2, dim=-2).values
    col_gap = (cols[..., 0, :] - cols[..., 1, :])[mask[None].expand(img.shape[0], -1, -1)]
    return min((rows[..., 0] - rows[..., 1]).min().item(), col_gap.min().item())


@pytest.mark.gpu
@needs_compiled_cuda
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_gpu_paper_shape(dtype):
    """Cosine mode (the paper's) at B=32: 200k row and 18k column maxima, the nearest call 1e-7 apart. Raw dot
    products (magnitude ~100 here) leave too little margin for an argmax comparison at this size; the small
    cases above cover them on the GPU."""
    inputs, mask = paper_inputs(32, dtype)
    assert nearest_tie(inputs[0], inputs[1], mask) > 5e-8, (
        "inputs too close to a tie for an argmax comparison"
    )
    got, want = run_both(inputs, mask, normalize=True)
    assert_matches(got, want, inputs)


@pytest.mark.gpu
@needs_compiled_cuda
def test_gpu_backward_is_deterministic():
    inputs, mask = paper_inputs(64, torch.bfloat16)
    first, _ = run_both(inputs, mask, normalize=True)
    second, _ = run_both(inputs, mask, normalize=True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def peak_extra_bytes(inputs, mask, backend):
    """Peak CUDA memory above the inputs during a forward and backward."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    s = reclmis.ops.max_similarity(*leaves, mask, backend=backend)
    s.sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


@pytest.mark.gpu
@needs_compiled_cuda
def test_gpu_memory_at_batch_256():
    """Extra memory O(B^2 (N+L)) + O(inputs), a tenth of what the materialising reference needs or less:
    maxima and indices (at most 8 bytes per pair and token), the backward's sort keys (4) and the forward's
    per-block partial maxima (8 per pair and text token, two images per block), fp32 gradient buffers."""
    batch, n, l, c = 256, 196, 18, 512
    inputs, mask = paper_inputs(batch, torch.float16)
    fused = peak_extra_bytes(inputs, mask, "auto")
    assert fused <= 12 * batch * batch * (n + l) + 4 * 4 * batch * (n + l) * c + 2**20
    assert fused * 10 <= peak_extra_bytes(inputs, mask, "reference")


@pytest.mark.gpu
@needs_compiled_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_compiled_matches_eager(mode):
    """torch.compile with Inductor (and CUDA graphs in "reduce-overhead") around the custom ops, bf16 at the
    paper shape: one graph, the eager kernels' gradients bitwise."""
    inputs, mask = paper_inputs(32, torch.bfloat16)
    d_s = torch.randn(32, 32, device="cuda")

    def loss(img, txt, img_weight, txt_weight):
        return (reclmis.ops.max_similarity(img, txt, img_weight, txt_weight, mask) * d_s).sum()

    compiled = torch.compile(loss, fullgraph=True, mode=mode)
    results = []
    for fn in (loss, compiled, compiled, compiled):  # eager; warm-up, CUDA-graph recording, replay
        leaves = [t.clone().requires_grad_() for t in inputs]
        value = fn(*leaves)
        value.backward()
        results.append((value.detach().clone(), *[t.grad.clone() for t in leaves]))
    for traced in results[1:]:
        torch.testing.assert_close(traced[0], results[0][0])  # Inductor may sum (S * dS) in another order
        for a, b in zip(traced[1:], results[0][1:], strict=True):
            assert torch.equal(a, b)
