"""Losses of RecLMIS (paper Eq. 6, 8, 10, 11) and the segmentation loss (Dice + BCE)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reclmis.ops import max_similarity


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, *, squared: bool = False
) -> torch.Tensor:
    """Soft Dice loss per image, averaged over the batch, with P = sigmoid(logits) and G = target:
    1 - (2 sum(P G) + s) / (sum(P) + sum(G) + s), or with ``squared`` (the official code's, as V-Net)
    1 - (2 sum(P G) + s) / (sum(P^2) + sum(G^2) + s)."""
    probs = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    overlap = (probs * target).sum(1)
    total = probs.square().sum(1) + target.square().sum(1) if squared else probs.sum(1) + target.sum(1)
    return (1 - (2 * overlap + smooth) / (total + smooth)).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def weighted_reconstruction_loss(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 8 / 10: mean over rows b of sum_i W[b, i] * mean_c (x_bic - x_hat_bic)^2.

    W (B, T) is a distribution over the valid tokens of each row (W_poi, W_woi), so with uniform weights
    this is the official code's plain MSE; the paper's (1/T) sum_i W_i ||x_i - x_hat_i||^2 differs from it
    by the constant factor C/T, which the loss weights of Eq. 11 absorb. Padded tokens (``valid`` False)
    take no part.
    """
    error = (reconstruction.float() - target.float()).pow(2).mean(-1)  # (B, T)
    weighted = weight.float() * error
    if valid is not None:
        weighted = weighted.masked_fill(~valid, 0.0)
    return weighted.sum(1).mean()


def symmetric_cross_entropy(
    logits_img_to_txt: torch.Tensor, logits_txt_to_img: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """0.5 * (CE(rows of images over texts) + CE(rows of texts over images)), CLIP style."""
    return 0.5 * (F.cross_entropy(logits_img_to_txt, targets) + F.cross_entropy(logits_txt_to_img, targets))


def contrastive_scale(logit_scale: torch.Tensor, max_scale: float) -> torch.Tensor:
    """s = exp(learned logit scale), clamped at ``max_scale`` (CLIP)."""
    return logit_scale.exp().clamp(max=max_scale)


def same_note_pairs(
    ids: torch.Tensor, mask: torch.Tensor, other_ids: torch.Tensor, other_mask: torch.Tensor
) -> torch.Tensor:
    """(B, B') bool: notes ``ids`` (B, L) and ``other_ids`` (B', L) with the same valid tokens in the same
    places (padding, where the masks are False, compares equal whatever it holds)."""
    ids, other_ids = ids.masked_fill(~mask, -1), other_ids.masked_fill(~other_mask, -1)
    return (ids[:, None, :] == other_ids[None, :, :]).all(-1)


@dataclass(frozen=True)
class GlobalBatch:
    """How this process's B pairs join the global batch of L_CCL under R processes: ``gather``
    concatenates a (B, ...) tensor of every process along dim 0 in rank order, keeping gradients (e.g.
    ``reclmis.train.distributed.all_gather_with_grad``); ``rank`` is this process's index, so its pairs
    are rows rank * B .. rank * B + B - 1 of the gathered batch."""

    gather: Callable[[torch.Tensor], torch.Tensor]
    rank: int


def conditioned_contrastive_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    w_poi: torch.Tensor,
    w_woi: torch.Tensor,
    txt_mask: torch.Tensor,
    scale: torch.Tensor,
    *,
    note_ids: torch.Tensor | None = None,
    backend: str = "auto",
    global_batch: GlobalBatch | None = None,
) -> torch.Tensor:
    """Eq. 4-6: S = max_similarity(V, E, W_poi, W_woi); L_CCL = 0.5 * (CE(s S, diag) + CE(s S^T, diag)).

    img (B, N, C) stage-4 visual tokens, txt (B, L, C) projected text tokens, scale = exp(logit scale).
    With ``note_ids`` (B, L), the token ids of the notes, a pair of different images whose notes are the
    same (:func:`same_note_pairs`) is no negative: its logits are -inf in both cross-entropies.
    With ``global_batch`` (R processes holding B pairs each), the loss runs over the global batch as in
    CLIP: this process scores its B images against all R*B texts and all R*B images against its B texts;
    the mean of the R processes' losses equals the single-process loss on the concatenated batch.
    """
    if global_batch is None:
        all_img, all_w_poi, all_txt, all_w_woi, all_mask, all_ids = img, w_poi, txt, w_woi, txt_mask, note_ids
        offset = 0
    else:
        gather = global_batch.gather
        all_img, all_w_poi = gather(img), gather(w_poi)
        all_txt, all_w_woi, all_mask = gather(txt), gather(w_woi), gather(txt_mask)
        all_ids = gather(note_ids) if note_ids is not None else None
        offset = global_batch.rank * img.shape[0]
    img_to_txt = max_similarity(img, all_txt, w_poi, all_w_woi, all_mask, backend=backend) * scale  # (B, RB)
    if global_batch is None:
        txt_to_img = img_to_txt.T  # (B, B)
    else:
        txt_to_img = max_similarity(all_img, txt, all_w_poi, w_woi, txt_mask, backend=backend).T * scale
    targets = torch.arange(offset, offset + img.shape[0], device=img.device)
    if note_ids is not None:
        # rows: this process's pairs; columns: all pairs (image j's note is text j, so one matrix serves both)
        same = same_note_pairs(note_ids, txt_mask, all_ids, all_mask)
        same[torch.arange(img.shape[0], device=img.device), targets] = False
        img_to_txt, txt_to_img = (
            img_to_txt.masked_fill(same, -math.inf),
            txt_to_img.masked_fill(same, -math.inf),
        )
    return symmetric_cross_entropy(img_to_txt, txt_to_img, targets)
