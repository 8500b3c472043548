"""Losses of Eq. 6, 8/10 and 11 against direct computations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from reclmis.losses import (
    bce_loss,
    conditioned_contrastive_loss,
    dice_loss,
    same_note_pairs,
    weighted_reconstruction_loss,
)


def test_dice_loss_by_hand() -> None:
    logits = torch.tensor([[[[10.0, -10.0], [10.0, -10.0]]]])  # probabilities ~1, 0, 1, 0
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # |P.G| = 1, |P| = 2, |G| = 2 -> 1 - (2 + 1) / (4 + 1)
    torch.testing.assert_close(dice_loss(logits, target), torch.tensor(1 - 3 / 5), atol=1e-4, rtol=0)
    torch.testing.assert_close(bce_loss(logits, target), F.binary_cross_entropy_with_logits(logits, target))


def test_squared_dice_loss_by_hand() -> None:
    logits = torch.tensor([[[[0.0, 0.0], [10.0, -10.0]]]])  # probabilities 0.5, 0.5, ~1, ~0
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    # sum(P G) = 1.5, sum(P^2) = 1.5, sum(G^2) = 2 -> 1 - (3 + s) / (3.5 + s)
    loss = dice_loss(logits, target, smooth=1e-5, squared=True)
    torch.testing.assert_close(loss, torch.tensor(1 - (3 + 1e-5) / (3.5 + 1e-5)), atol=1e-4, rtol=0)


def test_weighted_reconstruction_is_mse_under_uniform_weights() -> None:
    x, x_hat = torch.randn(3, 7, 5), torch.randn(3, 7, 5)
    uniform = torch.full((3, 7), 1 / 7)
    torch.testing.assert_close(weighted_reconstruction_loss(x_hat, x, uniform), F.mse_loss(x_hat, x))


def test_weighted_reconstruction_weights_and_padding() -> None:
    x = torch.zeros(1, 3, 2)
    x_hat = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [100.0, 100.0]]])
    weight = torch.tensor([[0.25, 0.75, 0.0]])
    valid = torch.tensor([[True, True, False]])
    expected = 0.25 * 1.0 + 0.75 * 4.0  # the padded token's error takes no part
    torch.testing.assert_close(weighted_reconstruction_loss(x_hat, x, weight, valid), torch.tensor(expected))


def _ccl_inputs() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    img, txt = torch.randn(4, 6, 8), torch.randn(4, 5, 8)
    w_poi, w_woi = torch.softmax(torch.randn(4, 6), -1), torch.softmax(torch.randn(4, 5), -1)
    mask = torch.ones(4, 5, dtype=torch.bool)
    return img, txt, w_poi, w_woi, mask, torch.tensor(math.exp(2.0))


def _ccl_logits(img, txt, w_poi, w_woi, scale) -> torch.Tensor:
    s = torch.zeros(len(img), len(txt))
    for a in range(len(img)):
        for b in range(len(txt)):
            sim = F.normalize(img[a], dim=-1) @ F.normalize(txt[b], dim=-1).T  # (N, L)
            s[a, b] = 0.5 * ((w_poi[a] * sim.max(1).values).sum() + (w_woi[b] * sim.max(0).values).sum())
    return s * scale


def test_conditioned_contrastive_loss_is_symmetric_clip_loss() -> None:
    img, txt, w_poi, w_woi, mask, scale = _ccl_inputs()
    loss = conditioned_contrastive_loss(img, txt, w_poi, w_woi, mask, scale, backend="reference")
    logits = _ccl_logits(img, txt, w_poi, w_woi, scale)
    expected = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    torch.testing.assert_close(loss, expected)
    distinct = torch.arange(20).reshape(4, 5)  # no two notes alike: the same loss with note ids
    with_ids = conditioned_contrastive_loss(img, txt, w_poi, w_woi, mask, scale, note_ids=distinct)
    torch.testing.assert_close(with_ids, expected)


def test_same_note_pairs_compare_valid_tokens_only() -> None:
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 9], [5, 6, 0, 0], [5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    # 0 and 1 differ only in a padded id; 2 is a prefix of them; 3 has a fourth valid token
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(same_note_pairs(ids, mask, ids, mask), expected)


def test_same_note_pairs_are_no_negatives() -> None:
    """Images 0 and 2 carry the same note: neither is a negative of the other, in either direction; the
    other pairs are scored as before, and the gradients stay finite through the -inf logits."""
    img, txt, w_poi, w_woi, mask, scale = _ccl_inputs()
    ids = torch.arange(20).reshape(4, 5)
    ids[2] = ids[0]
    img.requires_grad_()
    loss = conditioned_contrastive_loss(img, txt, w_poi, w_woi, mask, scale, note_ids=ids)
    logits = _ccl_logits(img.detach(), txt, w_poi, w_woi, scale)
    logits[0, 2] = logits[2, 0] = -math.inf
    expected = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    torch.testing.assert_close(loss, expected)
    ids[2, 0] = -5  # now different notes: the pair is a negative again and the loss grows
    assert conditioned_contrastive_loss(img, txt, w_poi, w_woi, mask, scale, note_ids=ids) > loss
    loss.backward()
    assert torch.isfinite(img.grad).all()
