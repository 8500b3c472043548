"""The reference ops against tiny hand-computed cases, and the input checks of the public API."""

from __future__ import annotations

import math

import pytest
import torch

from reclmis.ops import conditioned_attention, conditioned_attention_reference, max_similarity, weighted_mask


def one_hot_rows(rows: list[list[float]], d: int = 16) -> torch.Tensor:
    out = torch.zeros(len(rows), d)
    out[:, : len(rows[0])] = torch.tensor(rows)
    return out


@pytest.mark.parametrize("mode", ["scale", "reweight"])
def test_conditioned_attention_by_hand(mode: str) -> None:
    # one query, two keys with dot products 4 and 0; D = 16 so scale = 1/4; cond = (0.5, 2)
    q = one_hot_rows([[4.0, 0.0]])[None, None]  # (1, 1, 1, 16)
    k = one_hot_rows([[1.0, 0.0], [0.0, 1.0]])[None, None]  # (1, 1, 2, 16)
    v = one_hot_rows([[10.0, 0.0], [0.0, 20.0]])[None, None]
    cond = torch.tensor([[0.5, 2.0]])
    if mode == "scale":
        logits = [4 * 0.25 * 0.5, 0.0]
    else:
        logits = [4 * 0.25 + math.log(0.5 + 1e-10), math.log(2.0 + 1e-10)]
    p0 = math.exp(logits[0]) / (math.exp(logits[0]) + math.exp(logits[1]))
    out = conditioned_attention(q, k, v, cond, mode=mode, backend="reference")
    torch.testing.assert_close(out[0, 0, 0, :2], torch.tensor([10 * p0, 20 * (1 - p0)]))


def test_conditioned_attention_padding_and_empty_rows() -> None:
    q = torch.randn(2, 2, 3, 16, requires_grad=True)
    k = torch.randn(2, 2, 4, 16, requires_grad=True)
    v = torch.randn(2, 2, 4, 16, requires_grad=True)
    cond = torch.rand(2, 4, requires_grad=True)
    valid = torch.tensor([[True, True, False, False], [False, False, False, False]])
    out = conditioned_attention(q, k, v, cond, valid, backend="reference")
    # the valid keys of sample 0 alone give the same result; sample 1 has no key: zeros
    alone = conditioned_attention(q[:1], k[:1, :, :2], v[:1, :, :2], cond[:1, :2], backend="reference")
    torch.testing.assert_close(out[:1], alone)
    assert (out[1] == 0).all()
    out.sum().backward()
    for t in (q, k, v, cond):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[1] == 0).all() and (k.grad[0, :, 2:] == 0).all() and (cond.grad[0, 2:] == 0).all()


def test_max_similarity_by_hand() -> None:
    # image tokens (1,0) and (0,1); text tokens (1,1)/sqrt2 and (1,0); the third text token is padding
    img = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    txt = torch.tensor([[[1.0, 1.0], [5.0, 0.0], [0.0, 9.0]]])
    w_img = torch.tensor([[0.25, 0.75]])
    w_txt = torch.tensor([[0.4, 0.6, 0.9]])
    valid = torch.tensor([[True, True, False]])
    r = 1 / math.sqrt(2)
    # cosines: img0-txt0 r, img0-txt1 1, img1-txt0 r, img1-txt1 0
    row_max = [1.0, r]  # max over valid text tokens per image token
    col_max = [r, 1.0]  # max over image tokens per valid text token
    expected = 0.5 * (0.25 * row_max[0] + 0.75 * row_max[1] + 0.4 * col_max[0] + 0.6 * col_max[1])
    s = max_similarity(img, txt, w_img, w_txt, valid, backend="reference")
    torch.testing.assert_close(s, torch.tensor([[expected]]))
    raw = max_similarity(img, txt, w_img, w_txt, valid, normalize=False, backend="reference")
    expected_raw = 0.5 * (0.25 * 10 + 0.75 * 3 + 0.4 * 3 + 0.6 * 10)
    torch.testing.assert_close(raw, torch.tensor([[expected_raw]]))


def test_max_similarity_padded_tokens_get_no_gradient() -> None:
    img = torch.randn(3, 5, 8, requires_grad=True)
    txt = torch.randn(2, 4, 8, requires_grad=True)
    w_txt = torch.rand(2, 4, requires_grad=True)
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    s = max_similarity(img, txt, torch.rand(3, 5), w_txt, valid, backend="reference")
    assert s.shape == (3, 2) and s.dtype == torch.float32
    s.sum().backward()
    assert (txt.grad[~valid] == 0).all() and (w_txt.grad[~valid] == 0).all()


def test_weighted_mask_by_hand() -> None:
    x = torch.arange(1.0, 25.0).view(2, 6, 2)
    weight = torch.tensor([[0, 0, 5.0, 0, 0, 0], [1.0, 1, 1, 1, 1, 1]])
    # row 0: ratio 0.2 of 6 -> k = 1, only position 2 has weight; row 1: length 3 -> k = 1 among 0..2
    masked, mask = weighted_mask(x, weight, 0.2, torch.tensor([6, 3]), seed=3, backend="reference")
    assert mask[0].tolist() == [False, False, True, False, False, False]
    assert mask[1].sum() == 1 and not mask[1, 3:].any()
    torch.testing.assert_close(masked, x * (~mask)[..., None])


def test_weighted_mask_counts_and_fill_up() -> None:
    weight = torch.tensor([[0, 0, 0, 0, 3.0, 0, 0, 0, 0, 1]])
    _, mask = weighted_mask(torch.ones(1, 10, 1), weight, 0.5, seed=0, backend="reference")
    # k = 5: both positive-weight positions, then 3 of the zero-weight ones
    assert mask.sum() == 5 and mask[0, 4] and mask[0, 9]
    _, empty = weighted_mask(
        torch.ones(2, 4, 1), torch.ones(2, 4), 0.5, torch.tensor([0, 1]), backend="reference"
    )
    assert empty[0].sum() == 0 and empty[1].tolist() == [True, False, False, False]


def test_weighted_mask_seed_reproducible() -> None:
    x, w = torch.randn(4, 20, 3), torch.rand(4, 20)
    a = weighted_mask(x, w, 0.5, seed=11, backend="reference")[1]
    assert torch.equal(a, weighted_mask(x, w, 0.5, seed=11, backend="reference")[1])
    assert not torch.equal(a, weighted_mask(x, w, 0.5, seed=12, backend="reference")[1])
    torch.manual_seed(5)
    b = weighted_mask(x, w, 0.5, backend="reference")[1]
    torch.manual_seed(5)
    assert torch.equal(b, weighted_mask(x, w, 0.5, backend="reference")[1])


def _attention_args():
    return [torch.randn(2, 2, 3, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16), torch.rand(2, 5)]


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda a: (a[0][0], *a[1:]), ValueError, "q must have 4"),
        (lambda a: (a[0], a[1][:1], *a[2:]), ValueError, "k has size 1"),
        (lambda a: (a[0], a[1], a[2][:, :, :4], a[3]), ValueError, "v has size 4"),
        (lambda a: (*a[:3], a[3][:, :4]), ValueError, "cond has size 4"),
        (lambda a: (a[0].half(), *a[1:]), TypeError, "k has dtype"),
        (lambda a: (a[0].double(), *a[1:]), TypeError, "q must have dtype"),
        (lambda a: (a[0][..., :8], a[1][..., :8], a[2][..., :8], a[3]), ValueError, "head dim 8"),
    ],
)
def test_conditioned_attention_rejects_bad_inputs(mutate, error, match) -> None:
    with pytest.raises(error, match=match):
        conditioned_attention(*mutate(_attention_args()))


def test_conditioned_attention_rejects_bad_options(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = _attention_args()
    with pytest.raises(ValueError, match="mode"):
        conditioned_attention(*args, mode="softmax")
    with pytest.raises(ValueError, match="key_padding_mask"):
        conditioned_attention(*args, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        conditioned_attention(*args, torch.ones(2, 5))
    with pytest.raises(ValueError, match="backend"):
        conditioned_attention(*args, backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        conditioned_attention(*args, backend="triton")


def test_max_similarity_rejects_bad_inputs() -> None:
    img, txt, wi, wt = torch.randn(2, 5, 8), torch.randn(3, 4, 8), torch.rand(2, 5), torch.rand(3, 4)
    with pytest.raises(ValueError, match="txt has size 6"):
        max_similarity(img, torch.randn(3, 4, 6), wi, wt)
    with pytest.raises(ValueError, match="img_weight has size 4"):
        max_similarity(img, txt, wi[:, :4], wt)
    with pytest.raises(ValueError, match="txt_weight has size 2"):
        max_similarity(img, txt, wi, wt[:2])
    with pytest.raises(TypeError, match="txt_mask"):
        max_similarity(img, txt, wi, wt, torch.ones(3, 4))
    with pytest.raises(ValueError, match="img must have 3"):
        max_similarity(img[0], txt, wi, wt)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ratio": 1.5}, ValueError, "ratio"),
        ({"ratio": -0.1}, ValueError, "ratio"),
        ({"ratio": float("nan")}, TypeError, "ratio"),
        ({"weight": -torch.rand(2, 6)}, ValueError, "weight"),
        ({"weight": torch.full((2, 6), float("nan"))}, ValueError, "weight"),
        ({"weight": torch.rand(2, 5)}, ValueError, "weight has size 5"),
        ({"lengths": torch.tensor([7, 1])}, ValueError, "lengths"),
        ({"lengths": torch.tensor([1.0, 2.0])}, TypeError, "lengths"),
        ({"x": torch.randn(2, 6)}, ValueError, "x must have 3"),
    ],
)
def test_weighted_mask_rejects_bad_inputs(kwargs, error, match) -> None:
    args = {"x": torch.randn(2, 6, 3), "weight": torch.rand(2, 6), "ratio": 0.5, "lengths": None} | kwargs
    with pytest.raises(error, match=match):
        weighted_mask(args["x"], args["weight"], args["ratio"], args["lengths"], backend="reference")


@pytest.mark.parametrize("mode", ["reweight", "scale"])
def test_causal_reference_is_the_op_over_each_prefix(mode: str) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 16) for _ in range(3))
    cond = torch.rand(2, 6)
    valid = torch.tensor([[True] * 6, [False, True, True, True, False, False]])
    out = conditioned_attention_reference(q, k, v, cond, valid, mode=mode, causal=True)
    for i in range(6):
        expected = conditioned_attention_reference(
            q[:, :, i : i + 1],
            k[:, :, : i + 1],
            v[:, :, : i + 1],
            cond[:, : i + 1],
            valid[:, : i + 1],
            mode=mode,
        )
        torch.testing.assert_close(out[:, :, i : i + 1], expected)
    assert (out[1, :, 0] == 0).all()  # no valid key at or before position 0: zeros, not NaN
