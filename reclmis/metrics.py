"""Foreground Dice and IoU in the two protocols of the literature.

Predictions are binarised at probability 0.5 (:func:`binarize`). Then:

- per image (LViT, RecLMIS): each image scores ``Dice = 2|P & T| / (|P| + |T|)`` and
  ``IoU = |P & T| / |P | T|``, and the dataset score is the mean over images;
- pooled (torchmetrics' default, GuideDecoder and the tables that quote it): the counts |P & T|, |P| and |T|
  are summed over every pixel of the split first, and the same formulas give one dataset score.

Large and small lesions weigh alike per image and by their pixels when pooled, so the two disagree on the
same predictions. Everything stays on the tensors' device: nothing here reads a value back to the host
except :meth:`DiceIoUMeter.compute`.

An image whose mask and prediction are both empty has no defined score; ``empty_score`` chooses it:

- 1 (default): a correct empty answer is a perfect one;
- 0 (``OFFICIAL_EMPTY_SCORE``): the official test script's ``2|P & T| / (|P| + |T| + 1e-5)`` and sklearn's
  ``jaccard_score`` give 0. Use it to compare with the paper's and LViT's tables.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["OFFICIAL_EMPTY_SCORE", "DiceIoUMeter", "binarize", "dice_iou"]

OFFICIAL_EMPTY_SCORE = 0.0


def binarize(prediction: torch.Tensor, *, from_logits: bool, threshold: float = 0.5) -> torch.Tensor:
    """Foreground where the probability is at least ``threshold``.

    ``from_logits=True`` reads ``prediction`` as logits (compared with ``logit(threshold)``, which equals
    ``sigmoid(prediction) >= threshold`` without computing the sigmoid); otherwise as probabilities.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if not prediction.is_floating_point():
        raise TypeError(f"prediction must be a floating-point tensor, got {prediction.dtype}")
    if from_logits:
        return prediction >= math.log(threshold / (1.0 - threshold))
    return prediction >= threshold


def dice_iou(
    prediction: torch.Tensor, target: torch.Tensor, empty_score: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU of boolean masks ``prediction`` and ``target``, shape (B, ...), e.g. (B, 1, H, W).

    Returns two float32 tensors (B,) on the inputs' device; an image with both masks empty scores
    ``empty_score`` (see the module docstring). Binarise scores with :func:`binarize` and float masks with
    ``mask > 0.5`` first: non-boolean inputs raise TypeError, so that probabilities are never counted as
    foreground by accident.
    """
    _check_empty_score(empty_score)
    for name, tensor in (("prediction", prediction), ("target", target)):
        if tensor.dtype != torch.bool:
            raise TypeError(
                f"{name} must be a bool tensor (use binarize(...) for scores, mask > 0.5 for masks), got {tensor.dtype}"
            )
    if prediction.shape != target.shape or prediction.ndim < 2:
        raise ValueError(
            f"prediction and target must have the same shape (B, ...), got {tuple(prediction.shape)} "
            f"and {tuple(target.shape)}"
        )
    if prediction.device != target.device:
        raise ValueError(f"prediction is on {prediction.device} but target on {target.device}")
    intersection, predicted, actual = pixel_counts(prediction, target).unbind(1)
    union = predicted + actual - intersection
    empty = union == 0
    dice = torch.where(empty, empty_score, 2.0 * intersection / (predicted + actual).clamp_min(1.0))
    iou = torch.where(empty, empty_score, intersection / union.clamp_min(1.0))
    return dice, iou


def pixel_counts(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, 3) float32: |P & T|, |P| and |T| of each image of boolean masks (B, ...)."""
    prediction, target = prediction.flatten(1), target.flatten(1)
    counts = (prediction & target, prediction, target)
    return torch.stack([c.sum(1, dtype=torch.float32) for c in counts], dim=1)


def _check_empty_score(empty_score: float) -> None:
    if isinstance(empty_score, bool) or empty_score not in (0.0, 1.0):
        raise ValueError(f"empty_score must be 1 or 0 (the official convention), got {empty_score!r}")


class DiceIoUMeter:
    """Sums per-image Dice and IoU and the split's pixel counts on the device; :meth:`compute` returns both
    protocols (the module docstring).

    ``update`` takes boolean masks (B, ...) and returns that batch's per-image ``(dice, iou)`` (e.g. for a
    per-image CSV) without a host synchronisation. Under ``torch.distributed`` call :meth:`all_reduce`
    once before :meth:`compute` to average over every process's images. ``empty_score`` is the score of an
    image whose mask and prediction are both empty (1, or 0 as the official test script).
    """

    def __init__(self, empty_score: float = 1.0) -> None:
        _check_empty_score(empty_score)
        self.empty_score = empty_score
        # dice sum, IoU sum, image count, then |P & T|, |P|, |T| over every pixel; float64
        self._sums: torch.Tensor | None = None

    def reset(self) -> None:
        self._sums = None

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dice, iou = dice_iou(prediction, target, self.empty_score)
        count = torch.full((), float(dice.numel()), dtype=torch.float64, device=dice.device)
        pixels = pixel_counts(prediction, target).sum(0, dtype=torch.float64)
        batch = torch.cat(
            (torch.stack((dice.sum(dtype=torch.float64), iou.sum(dtype=torch.float64), count)), pixels)
        )
        self._sums = batch if self._sums is None else self._sums + batch
        return dice, iou

    def all_reduce(self) -> None:
        """Sum the totals over all processes of the default group (no-op outside torch.distributed)."""
        if self._sums is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._sums)

    def compute(self) -> dict[str, float | int]:
        """``{"dice", "iou"}`` per image (means over images), ``{"pooled_dice", "pooled_iou"}`` pooled over
        every pixel (``empty_score`` where the split has no foreground and none is predicted), and ``n``
        images; fractions. Raises if no image was seen."""
        if self._sums is None:
            raise RuntimeError("DiceIoUMeter.compute() called before any update()")
        dice_sum, iou_sum, count, intersection, predicted, actual = self._sums.tolist()
        if count == 0:
            raise RuntimeError("DiceIoUMeter.compute() called before any update() with images")
        union = predicted + actual - intersection
        pooled_dice = 2 * intersection / (predicted + actual) if union else self.empty_score
        pooled_iou = intersection / union if union else self.empty_score
        return {"dice": dice_sum / count, "iou": iou_sum / count, "pooled_dice": pooled_dice,
                "pooled_iou": pooled_iou, "n": int(count)}  # fmt: skip
