"""Per-image Dice/IoU and the overlay pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reclmis.metrics import DiceIoUMeter, binarize, dice_iou
from reclmis.viz import (
    FALSE_NEGATIVE,
    FALSE_POSITIVE,
    TRUE_POSITIVE,
    error_overlay,
    heatmap_overlay,
    mask_overlay,
    save_png,
    to_rgb_uint8,
    word_weight_chart,
)


def masks(*rows: str) -> torch.Tensor:
    """A (1, H, W) bool mask from strings of '.' and '#'."""
    return torch.tensor([[c == "#" for c in row] for row in rows])[None]


# prediction 4 pixels, target 3 pixels, 2 in common: Dice 2*2/(4+3) = 4/7, IoU 2/5
PREDICTION = masks("##..", "##..", "....", "....")
TARGET = masks(".#..", ".#..", ".#..", "....")


# ---------------------------------------------------------------- metrics


def test_dice_iou_on_hand_made_masks():
    dice, iou = dice_iou(PREDICTION[None], TARGET[None])
    torch.testing.assert_close(dice, torch.tensor([4 / 7]))
    torch.testing.assert_close(iou, torch.tensor([2 / 5]))
    assert dice.dtype == torch.float32 and dice.shape == (1,)


def test_empty_cases():
    empty = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    full = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    assert dice_iou(empty, empty) == (
        torch.tensor([1.0]),
        torch.tensor([1.0]),
    )  # nothing to find, nothing found
    assert dice_iou(empty, full) == (torch.tensor([0.0]), torch.tensor([0.0]))
    assert dice_iou(full, empty) == (torch.tensor([0.0]), torch.tensor([0.0]))
    assert dice_iou(full, full) == (torch.tensor([1.0]), torch.tensor([1.0]))


def test_official_empty_mask_convention_scores_zero():
    """The official test script: Dice 2|P&T| / (|P| + |T| + 1e-5) and sklearn's jaccard_score are 0 when
    both masks are empty; every other case scores as the default convention."""
    empty = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    dice, iou = dice_iou(empty, empty, empty_score=0.0)
    assert dice.tolist() == iou.tolist() == [0.0, 0.0]
    batch_p, batch_t = torch.cat([PREDICTION[None], empty[:1]]), torch.cat([TARGET[None], empty[:1]])
    default, official = DiceIoUMeter(), DiceIoUMeter(empty_score=0.0)
    default.update(batch_p, batch_t)
    official.update(batch_p, batch_t)
    assert default.compute()["dice"] == pytest.approx((4 / 7 + 1) / 2)
    assert official.compute()["dice"] == pytest.approx((4 / 7 + 0) / 2)
    assert official.compute()["iou"] == pytest.approx((2 / 5 + 0) / 2)
    with pytest.raises(ValueError, match="empty_score"):
        dice_iou(empty, empty, empty_score=0.5)


def test_batched_per_image_with_and_without_channel_axis():
    prediction = torch.stack([PREDICTION, torch.zeros_like(PREDICTION), TARGET])
    target = torch.stack([TARGET, torch.zeros_like(TARGET), TARGET])
    expected_dice = torch.tensor([4 / 7, 1.0, 1.0])
    expected_iou = torch.tensor([2 / 5, 1.0, 1.0])
    for p, t in ((prediction, target), (prediction[:, 0], target[:, 0])):
        dice, iou = dice_iou(p, t)
        torch.testing.assert_close(dice, expected_dice)
        torch.testing.assert_close(iou, expected_iou)


def test_dice_iou_rejects_ambiguous_inputs():
    with pytest.raises(TypeError, match="prediction must be a bool tensor"):
        dice_iou(PREDICTION.float()[None], TARGET[None])
    with pytest.raises(TypeError, match="target must be a bool tensor"):
        dice_iou(PREDICTION[None], TARGET.float()[None])
    with pytest.raises(ValueError, match="same shape"):
        dice_iou(PREDICTION[None], TARGET[None, :, :3])


def test_binarize_probabilities_and_logits_agree():
    logits = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 3
    from_logits = binarize(logits, from_logits=True)
    assert torch.equal(from_logits, binarize(torch.sigmoid(logits), from_logits=False))
    assert torch.equal(from_logits, logits >= 0)
    assert torch.equal(
        binarize(torch.tensor([0.2, 0.5, 0.8]), from_logits=False), torch.tensor([False, True, True])
    )
    away_from_ties = (torch.sigmoid(logits) - 0.8).abs() > 1e-6
    at_08 = binarize(logits, from_logits=True, threshold=0.8)
    assert torch.equal(at_08[away_from_ties], (torch.sigmoid(logits) >= 0.8)[away_from_ties])
    assert 0 < at_08.sum() < from_logits.sum()
    with pytest.raises(TypeError, match="floating-point"):
        binarize(torch.ones(2, dtype=torch.bool), from_logits=False)
    with pytest.raises(ValueError, match="threshold"):
        binarize(logits, from_logits=True, threshold=1.0)


def test_meter_gives_both_protocols_per_image_and_pooled():
    meter = DiceIoUMeter()
    with pytest.raises(RuntimeError, match="before any update"):
        meter.compute()
    big_hit = torch.ones(1, 1, 8, 8, dtype=torch.bool)  # a large lesion found exactly: Dice 1
    small_target = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    small_target[..., 0, 0] = True  # a one-pixel lesion missed: Dice 0
    dice, iou = meter.update(big_hit, big_hit)
    assert dice.tolist() == [1.0] and iou.tolist() == [1.0]
    meter.update(torch.zeros_like(small_target), small_target)
    meter.update(PREDICTION[None], TARGET[None])
    result = meter.compute()
    assert result["n"] == 3
    assert result["dice"] == pytest.approx((1 + 0 + 4 / 7) / 3)
    assert result["iou"] == pytest.approx((1 + 0 + 2 / 5) / 3)
    # pooled: |P & T| = 64 + 0 + 2, |P| = 64 + 0 + 4, |T| = 64 + 1 + 3 over every pixel of the split
    assert result["pooled_dice"] == pytest.approx(2 * 66 / (68 + 68))
    assert result["pooled_iou"] == pytest.approx(66 / (68 + 68 - 66))
    assert abs(result["dice"] - result["pooled_dice"]) > 0.4  # the protocols disagree on the same masks
    meter.reset()
    meter.update(PREDICTION[None], PREDICTION[None])
    assert meter.compute() == {"dice": 1.0, "iou": 1.0, "pooled_dice": 1.0, "pooled_iou": 1.0, "n": 1}
    empty = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    for empty_score in (1.0, 0.0):
        nothing = DiceIoUMeter(empty_score)
        nothing.update(empty, empty)  # no foreground in the split, none predicted
        assert nothing.compute()["pooled_dice"] == nothing.compute()["dice"] == empty_score


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_meter_update_does_not_synchronise_the_device():
    prediction = torch.rand(8, 1, 64, 64, device="cuda")
    target = torch.rand(8, 1, 64, 64, device="cuda") > 0.5
    meter = DiceIoUMeter()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            meter.update(binarize(prediction, from_logits=False), target)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = DiceIoUMeter()
    cpu.update(binarize(prediction.cpu(), from_logits=False), target.cpu())
    assert meter.compute()["dice"] == pytest.approx(cpu.compute()["dice"])


# ---------------------------------------------------------------- overlays


def grey_image(value: int = 100, size: int = 4) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def test_error_overlay_colours():
    image = grey_image()
    prediction, target = PREDICTION[0].numpy(), TARGET[0].numpy()
    painted = error_overlay(image, prediction, target, alpha=1.0)
    assert tuple(painted[0, 1]) == TRUE_POSITIVE == (0, 255, 0)
    assert tuple(painted[2, 1]) == FALSE_NEGATIVE == (255, 0, 0)
    assert tuple(painted[0, 0]) == FALSE_POSITIVE == (0, 0, 255)
    assert tuple(painted[3, 3]) == (100, 100, 100)  # true negative: the image
    blended = error_overlay(torch.full((3, 4, 4), 100 / 255), PREDICTION, TARGET, alpha=0.5)
    assert tuple(blended[0, 1]) == (50, 178, 50)
    assert tuple(blended[2, 1]) == (178, 50, 50)
    assert tuple(blended[0, 0]) == (50, 50, 178)
    assert tuple(blended[3, 3]) == (100, 100, 100)


def test_mask_overlay_tints_only_the_mask():
    painted = mask_overlay(grey_image(), TARGET, color=(255, 0, 0), alpha=0.5)
    assert tuple(painted[1, 1]) == (178, 50, 50)
    assert tuple(painted[1, 0]) == (100, 100, 100)


def test_heatmap_overlay_puts_the_peak_where_the_weight_is():
    weights = torch.zeros(4, 4)
    weights[0, 0] = 1.0
    painted = heatmap_overlay(grey_image(size=64), weights, alpha=1.0)
    assert painted.shape == (64, 64, 3) and painted.dtype == np.uint8
    top_left, bottom_right = painted[2, 2].astype(int), painted[60, 60].astype(int)
    assert top_left[0] >= 120 and top_left[1] == top_left[2] == 0  # hot: (dark) red
    assert bottom_right[2] >= 120 and bottom_right[0] == bottom_right[1] == 0  # cold: (dark) blue
    uniform = heatmap_overlay(grey_image(size=8), np.ones((2, 2)), alpha=1.0)
    assert (uniform == uniform[0, 0]).all()


def test_word_weight_chart_bars_follow_the_weights():
    chart = word_weight_chart(["left", "upper", "lung"], [0.1, 0.6, 0.3])
    assert chart.ndim == 3 and chart.shape[2] == 3 and chart.shape[1] == 360
    bar = (chart[..., 2] > 150) & (chart[..., 0] < 100)  # the blue bar colour
    rows = np.array_split(bar, 3, axis=0)
    lengths = [int(r.any(axis=0).sum()) for r in rows]
    assert lengths[1] > lengths[2] > lengths[0] > 0
    with pytest.raises(ValueError, match="equal length"):
        word_weight_chart(["a"], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-negative"):
        word_weight_chart(["a"], [-1.0])


def test_save_png_round_trip(tmp_path):
    painted = error_overlay(grey_image(), PREDICTION, TARGET)
    path = save_png(painted, tmp_path / "sub" / "overlay.png")
    assert np.array_equal(np.asarray(Image.open(path)), painted)


def test_image_and_mask_conversions():
    tensor = torch.rand(3, 5, 6)
    np.testing.assert_array_equal(to_rgb_uint8(tensor), np.round(tensor.permute(1, 2, 0).numpy() * 255))
    assert to_rgb_uint8(torch.rand(1, 5, 6)).shape == (5, 6, 3)
    assert to_rgb_uint8(Image.new("L", (6, 5), 7)).shape == (5, 6, 3)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        to_rgb_uint8(torch.full((3, 4, 4), 2.0))
    with pytest.raises(ValueError, match="prediction must have the image's size"):
        error_overlay(grey_image(), PREDICTION[:, :2], TARGET)
    with pytest.raises(ValueError, match="target must be boolean or hold only 0 and 1"):
        error_overlay(grey_image(), PREDICTION, TARGET.float() * 0.7)
    with pytest.raises(ValueError, match="alpha"):
        mask_overlay(grey_image(), TARGET, alpha=2.0)
