"""Pictures for evaluation and inspection, with PIL and numpy only.

- :func:`error_overlay`: the paper's figures: true positives green, false negatives red, false positives
  blue, blended over the image;
- :func:`mask_overlay`: a predicted mask tinted over the image (``reclmis predict``);
- :func:`heatmap_overlay`: a coarse weight map (e.g. W_poi on the 14x14 token grid) upsampled over the image;
- :func:`word_weight_chart`: words with their weights (e.g. W_woi) as a horizontal bar chart.

Images may be torch tensors (C, H, W) or (H, W) in [0, 1], numpy arrays (H, W, C) or (H, W) (uint8, or
floats in [0, 1]) or PIL images; masks are boolean or 0/1 arrays or tensors (H, W) or (1, H, W). Every
function returns an RGB uint8 array (H, W, 3); :func:`save_png` writes one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "FALSE_NEGATIVE",
    "FALSE_POSITIVE",
    "TRUE_POSITIVE",
    "error_overlay",
    "heatmap_overlay",
    "mask_overlay",
    "save_png",
    "to_rgb_uint8",
    "word_weight_chart",
]

TRUE_POSITIVE = (0, 255, 0)
FALSE_NEGATIVE = (255, 0, 0)
FALSE_POSITIVE = (0, 0, 255)

ArrayLike = torch.Tensor | np.ndarray | Image.Image


def to_rgb_uint8(image: ArrayLike) -> np.ndarray:
    """Convert an image to an RGB uint8 array (H, W, 3); grey images are replicated to three channels."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        if array.ndim == 3:
            array = array.permute(1, 2, 0)
        array = array.float().numpy() if array.is_floating_point() else array.numpy()
    else:
        array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(
            f"image must be (H, W), (H, W, 1|3|4) or a tensor (1|3, H, W), got shape {array.shape}"
        )
    array = array[..., :3]
    if array.dtype == np.uint8:
        return array.copy()
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"image must be uint8 or floating point in [0, 1], got {array.dtype}")
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(
            f"a floating-point image must hold values in [0, 1], got [{array.min()}, {array.max()}]"
        )
    return np.round(array * 255.0).astype(np.uint8)


def error_overlay(
    image: ArrayLike, prediction: ArrayLike, target: ArrayLike, alpha: float = 0.5
) -> np.ndarray:
    """Blend true positives green, false negatives red and false positives blue over ``image``.

    ``alpha`` is the colour's weight (1 paints the pure colour); true negatives keep the image.
    """
    rgb = to_rgb_uint8(image)
    predicted = _as_mask(prediction, "prediction", rgb.shape[:2])
    actual = _as_mask(target, "target", rgb.shape[:2])
    out = rgb
    for region, colour in (
        (predicted & actual, TRUE_POSITIVE),
        (~predicted & actual, FALSE_NEGATIVE),
        (predicted & ~actual, FALSE_POSITIVE),
    ):
        out = _tint(out, region, colour, alpha)
    return out


def mask_overlay(
    image: ArrayLike, mask: ArrayLike, color: tuple[int, int, int] = (255, 215, 0), alpha: float = 0.5
) -> np.ndarray:
    """Tint the foreground of ``mask`` over ``image`` with ``color`` (default yellow)."""
    rgb = to_rgb_uint8(image)
    return _tint(rgb, _as_mask(mask, "mask", rgb.shape[:2]), color, alpha)


def heatmap_overlay(image: ArrayLike, weights: ArrayLike, alpha: float = 0.5) -> np.ndarray:
    """Blend a weight map (h, w) over ``image``: upsampled bilinearly, scaled to its own min..max, in a
    jet colour scale (blue low, red high). A constant map shows as uniform blue."""
    rgb = to_rgb_uint8(image)
    _check_alpha(alpha)
    values = (
        weights.detach().float().cpu().numpy() if isinstance(weights, torch.Tensor) else np.asarray(weights)
    )
    values = np.squeeze(values.astype(np.float32))
    if values.ndim != 2:
        raise ValueError(f"weights must be a 2-D map (h, w), got shape {np.shape(weights)}")
    if not np.isfinite(values).all():
        raise ValueError("weights must be finite")
    span = values.max() - values.min()
    values = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    height, width = rgb.shape[:2]
    upsampled = np.asarray(Image.fromarray(values).resize((width, height), Image.Resampling.BILINEAR))
    heat = _jet(np.clip(upsampled, 0.0, 1.0))
    return np.round((1.0 - alpha) * rgb + alpha * heat).astype(np.uint8)


def word_weight_chart(
    words: Sequence[str], weights: Sequence[float] | torch.Tensor | np.ndarray, width: int = 360
) -> np.ndarray:
    """A horizontal bar chart: one row per word, bar length proportional to its weight (e.g. W_woi)."""
    values = (
        weights.detach().float().cpu().numpy() if isinstance(weights, torch.Tensor) else np.asarray(weights)
    )
    values = values.astype(np.float64).reshape(-1)
    if len(words) != values.size or not words:
        raise ValueError(
            f"words and weights must be non-empty and of equal length, got {len(words)} and {values.size}"
        )
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError("weights must be finite and non-negative")
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(int(probe.textlength(w, font=font)) for w in words) + 8
    value_width = int(probe.textlength("0.000", font=font)) + 8
    row_height, pad = 16, 4
    bar_space = width - label_width - value_width - 2 * pad
    if bar_space < 20:
        raise ValueError(
            f"width={width} leaves no room for the bars; use at least {label_width + value_width + 28}"
        )
    canvas = Image.new("RGB", (width, len(words) * row_height + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    top_value = values.max() if values.max() > 0 else 1.0
    for row, (word, value) in enumerate(zip(words, values, strict=True)):
        y = pad + row * row_height
        draw.text((pad, y + 2), word, fill="black", font=font)
        x0 = pad + label_width
        length = round(bar_space * value / top_value)
        if length > 0:
            draw.rectangle((x0, y + 3, x0 + length - 1, y + row_height - 3), fill=(70, 110, 200))
        draw.text((x0 + bar_space + 4, y + 2), f"{value:.3f}", fill="black", font=font)
    return np.asarray(canvas, dtype=np.uint8).copy()


def enlarge(image: ArrayLike, min_side: int = 256) -> np.ndarray:
    """Scale an RGB picture up by a whole factor (nearest neighbour) until its shorter side is at least
    ``min_side``, so that small inputs stay legible in figures."""
    rgb = to_rgb_uint8(image)
    factor = max(1, -(-min_side // min(rgb.shape[:2])))
    return rgb.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else rgb


def save_png(image: ArrayLike, path: Path | str) -> Path:
    """Write ``image`` (anything :func:`to_rgb_uint8` accepts) as an RGB PNG; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_rgb_uint8(image)).save(path, format="PNG")
    return path


def _as_mask(mask: ArrayLike, name: str, shape: tuple[int, int]) -> np.ndarray:
    if isinstance(mask, Image.Image):
        array = np.asarray(mask)
    elif isinstance(mask, torch.Tensor):
        array = mask.detach().cpu().numpy()
    else:
        array = np.asarray(mask)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.shape != shape:
        raise ValueError(f"{name} must have the image's size {shape} (or (1, *size)), got {np.shape(mask)}")
    if array.dtype != np.bool_:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must be boolean or hold only 0 and 1; binarise scores first")
        array = array.astype(bool)
    return array


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def _tint(rgb: np.ndarray, region: np.ndarray, colour: tuple[int, int, int], alpha: float) -> np.ndarray:
    _check_alpha(alpha)
    out = rgb.copy()
    blended = (1.0 - alpha) * rgb[region] + alpha * np.asarray(colour, dtype=np.float64)
    out[region] = np.round(blended).astype(np.uint8)
    return out


def _jet(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to the jet colour scale, as floats in [0, 255] with a trailing RGB axis."""
    channels = [np.clip(1.5 - np.abs(4.0 * values - centre), 0.0, 1.0) for centre in (3.0, 2.0, 1.0)]
    return np.stack(channels, axis=-1) * 255.0
