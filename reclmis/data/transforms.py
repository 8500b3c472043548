"""Training augmentation of the paper's official code, on tensors and with torch's random generator.

The official pipeline (RecLMIS ``Load_Dataset.py``, after LViT) applies, per training item:

1. Gaussian blur with probability 0.5: each channel with probability 0.5, sigma drawn from [0.5, 1.0] per
   channel and per axis (batchgenerators' ``GaussianBlur``);
2. photometric distortion (mmseg's ``PhotoMetricDistortion``), each step with probability 0.5: brightness
   shift within +-32/255, contrast (a scale within [0.5, 1.5]) either first or last, saturation scale within
   [0.5, 1.5], hue shift within +-18/180 of the colour circle;
3. with probability 0.5 a random rot90 followed by a flip along a random axis, otherwise with probability 0.5
   a rotation by an angle within +-20 degrees (zero fill); image and mask move together, the mask with
   nearest-neighbour sampling so that it stays binary.

The official pipeline keeps the note as it is, so a flipped image keeps "upper left lung". With a
``note_frame`` the note moves with the image instead (:mod:`reclmis.data.note_geometry`): a flip or
quarter turn rewrites its positional words, and a sample whose note cannot say the result (a quarter turn
of a lung zone) keeps its orientation.

All randomness comes from ``torch.rand`` with an optional ``torch.Generator`` (torch's global generator by
default). DataLoader seeds torch's generator in each worker from the loader's base seed, so training with
``torch.manual_seed`` is reproducible with any number of workers.

:func:`resize_mask` brings a mask to the model's size: nearest neighbour, or as the official loader
(bilinear, then every value above 0 is foreground).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from reclmis.data.note_geometry import FRAMES, Frame, SquareSymmetry, transform_note

__all__ = ["TrainAugmentation", "gaussian_blur", "hsv_to_rgb", "resize_mask", "rgb_to_hsv", "rotate"]


class TrainAugmentation:
    """Joint random augmentation of an image (C, H, W) in [0, 1], its binary mask (1, H, W) and its note.

    ``photometric`` (blur and colour) or ``geometric`` (rot90/flip and rotation) may be switched off.
    ``note_frame`` ("image" for pathology tiles, "radiological" for chest radiographs, whose "left" is the
    patient's left on the image's right, "axial" for axial CT slices) makes flips and quarter turns rewrite
    the note's positional words; None keeps the note unchanged, as the official code does.
    ``interpolation`` is the image's sampling mode for the free rotation ("bilinear" or "nearest").
    Geometric parameters are drawn before photometric ones, so two calls with equally seeded generators
    move the mask identically whether or not ``photometric`` is on.
    """

    def __init__(
        self,
        *,
        photometric: bool = True,
        geometric: bool = True,
        blur_prob: float = 0.5,
        blur_channel_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.5, 1.0),
        brightness_delta: float = 32 / 255,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 18 / 180,
        rot90_flip_prob: float = 0.5,
        rotate_prob: float = 0.5,
        max_angle: float = 20.0,
        interpolation: str = "bilinear",
        note_frame: Frame | None = None,
    ) -> None:
        for name, p in (
            ("blur_prob", blur_prob),
            ("blur_channel_prob", blur_channel_prob),
            ("rot90_flip_prob", rot90_flip_prob),
            ("rotate_prob", rotate_prob),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        for name, (low, high) in (
            ("blur_sigma", blur_sigma),
            ("contrast_range", contrast_range),
            ("saturation_range", saturation_range),
        ):
            if not 0.0 <= low <= high:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {(low, high)}")
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
        if note_frame is not None and note_frame not in FRAMES:
            raise ValueError(f"note_frame must be None or one of {FRAMES}, got {note_frame!r}")
        self.photometric = photometric
        self.geometric = geometric
        self.blur_prob = blur_prob
        self.blur_channel_prob = blur_channel_prob
        self.blur_sigma = blur_sigma
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta
        self.rot90_flip_prob = rot90_flip_prob
        self.rotate_prob = rotate_prob
        self.max_angle = max_angle
        self.interpolation = interpolation
        self.note_frame = note_frame

    def __call__(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        note: str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, str | None]:
        """``(image, mask, note)`` augmented; the note is rewritten only with a ``note_frame``."""
        if image.ndim != 3 or not image.is_floating_point():
            raise ValueError(
                f"image must be a float tensor (C, H, W), got {tuple(image.shape)} {image.dtype}"
            )
        if mask.ndim != 3 or mask.shape[0] != 1 or mask.shape[1:] != image.shape[1:]:
            raise ValueError(
                f"mask must be (1, H, W) with the image's H, W {tuple(image.shape[1:])}, got {tuple(mask.shape)}"
            )
        geometry = self._draw_geometry(generator) if self.geometric else None
        if self.photometric:
            image = self._photometric(image, generator)
        if geometry is not None:
            kind, value, flip_dim = geometry
            if kind == "rot90_flip" and self.note_frame is not None and note is not None:
                moved = transform_note(
                    note, SquareSymmetry.flip(flip_dim) @ SquareSymmetry.rot90(int(value)), self.note_frame
                )
                geometry = ("identity", 0, 0) if moved is None else geometry
                note = note if moved is None else moved
            image, mask = self._apply_geometry(image, mask, geometry)
        return image.contiguous(), mask.contiguous(), note

    def _draw_geometry(self, g: torch.Generator | None) -> tuple[str, float, int]:
        if _coin(self.rot90_flip_prob, g):
            k = int(torch.randint(0, 4, (), generator=g))
            flip_dim = 1 + int(torch.randint(0, 2, (), generator=g))
            return "rot90_flip", k, flip_dim
        if _coin(self.rotate_prob, g):
            return "rotate", _uniform(-self.max_angle, self.max_angle, g), 0
        return "identity", 0, 0

    def _apply_geometry(
        self, image: torch.Tensor, mask: torch.Tensor, geometry: tuple[str, float, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kind, value, flip_dim = geometry
        if kind == "rot90_flip":
            image = torch.rot90(image, int(value), dims=(1, 2)).flip(flip_dim)
            mask = torch.rot90(mask, int(value), dims=(1, 2)).flip(flip_dim)
        elif kind == "rotate":  # within +-20 degrees: the note's places still hold
            image = rotate(image, value, mode=self.interpolation)
            mask = rotate(mask, value, mode="nearest")
        return image, mask

    def _photometric(self, image: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        if _coin(self.blur_prob, g):
            channels = []
            for channel in image:
                if _coin(self.blur_channel_prob, g):
                    sigma = (_uniform(*self.blur_sigma, g), _uniform(*self.blur_sigma, g))
                    channel = gaussian_blur(channel, sigma)
                channels.append(channel)
            image = torch.stack(channels)
        if _coin(0.5, g):
            image = (image + _uniform(-self.brightness_delta, self.brightness_delta, g)).clamp(0, 1)
        contrast_first = _coin(0.5, g)
        if contrast_first:
            image = self._contrast(image, g)
        if image.shape[0] == 3:
            image = self._colour(image, g)
        if not contrast_first:
            image = self._contrast(image, g)
        return image

    def _contrast(self, image: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        if _coin(0.5, g):
            image = (image * _uniform(*self.contrast_range, g)).clamp(0, 1)
        return image

    def _colour(self, image: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        saturation_scale = _uniform(*self.saturation_range, g) if _coin(0.5, g) else None
        hue_shift = _uniform(-self.hue_delta, self.hue_delta, g) if _coin(0.5, g) else None
        if saturation_scale is None and hue_shift is None:
            return image
        h, s, v = rgb_to_hsv(image)
        if saturation_scale is not None:
            s = (s * saturation_scale).clamp(0, 1)
        if hue_shift is not None:
            h = torch.remainder(h + hue_shift, 1.0)
        return hsv_to_rgb(h, s, v)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(photometric={self.photometric}, geometric={self.geometric}, "
            f"note_frame={self.note_frame!r})"
        )


def gaussian_blur(channel: torch.Tensor, sigma: tuple[float, float]) -> torch.Tensor:
    """Blur one channel (H, W) with a separable Gaussian of ``sigma = (sigma_y, sigma_x)``.

    The kernel reaches 4 sigma (as scipy's ``gaussian_filter``); borders replicate the edge pixels.
    """
    out = channel
    for dim, s in enumerate(sigma):
        if s <= 0:
            continue
        radius = max(1, int(4.0 * s + 0.5))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (offsets / s) ** 2)
        kernel = (kernel / kernel.sum()).tolist()
        length = out.shape[dim]
        index = torch.arange(-radius, length + radius, device=out.device).clamp_(0, length - 1)
        padded = out.index_select(dim, index)  # replicate padding
        out = sum(w * padded.narrow(dim, k, length) for k, w in enumerate(kernel))
    return out


def rgb_to_hsv(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split an RGB image (3, H, W) in [0, 1] into hue, saturation and value (each (H, W) in [0, 1])."""
    r, g, b = image
    value, argmax = image.max(dim=0)
    delta = value - image.min(dim=0).values
    saturation = torch.where(value > 0, delta / value.clamp_min(1e-12), torch.zeros_like(value))
    safe = delta.clamp_min(1e-12)
    hue = torch.stack((torch.remainder((g - b) / safe, 6.0), (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = hue.gather(0, argmax[None])[0] / 6.0
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    return hue, saturation, value


def hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`: an RGB image (3, H, W)."""
    h6 = torch.remainder(hue, 1.0) * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    p = value * (1 - saturation)
    q = value * (1 - saturation * f)
    t = value * (1 - saturation * (1 - f))
    sector = sector.long().remainder(6)[None]
    r = torch.stack((value, q, p, p, t, value)).gather(0, sector)
    g = torch.stack((t, value, value, q, p, p)).gather(0, sector)
    b = torch.stack((p, p, t, value, value, q)).gather(0, sector)
    return torch.cat((r, g, b))


def rotate(x: torch.Tensor, angle: float, mode: str = "bilinear") -> torch.Tensor:
    """Rotate (C, H, W) about its centre by ``angle`` degrees (counter-clockwise on screen), same size,
    zero fill outside the source; ``mode`` "bilinear" or "nearest" (for masks)."""
    height, width = x.shape[-2:]
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    # output pixel -> source pixel, in grid_sample's normalised coordinates (aspect ratio corrected)
    theta = torch.tensor(
        [[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]],
        dtype=torch.float32,
        device=x.device,
    )
    grid = F.affine_grid(theta[None], [1, *x.shape], align_corners=False)
    out = F.grid_sample(x[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out[0].to(x.dtype)


def resize_mask(foreground: torch.Tensor, size: int, mode: str = "nearest") -> torch.Tensor:
    """Resize a binary mask (H, W) bool to (size, size) bool.

    "nearest": each output pixel takes the input pixel under its centre (PIL's nearest neighbour, as
    before this option existed).
    "bilinear": the official loader's ``cv2.resize`` of the 0/255 mask (bilinear, half-pixel centres, no
    antialiasing, rounded to 8 bits), then foreground wherever the result is above 0. Every output pixel
    whose bilinear footprint touches the foreground by at least 1/510 is kept, so the mask comes out
    slightly dilated, and thin structures that nearest sampling can skip when shrinking survive.
    """
    if foreground.ndim != 2 or foreground.dtype != torch.bool or foreground.device.type != "cpu":
        raise ValueError(
            f"foreground must be a bool CPU tensor (H, W), got {tuple(foreground.shape)} {foreground.dtype} "
            f"on {foreground.device}"
        )
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    if tuple(foreground.shape) == (size, size):
        return foreground.clone()
    if mode == "nearest":
        picture = Image.fromarray(foreground.numpy().astype(np.uint8))
        return torch.from_numpy(np.asarray(picture.resize((size, size), Image.Resampling.NEAREST)) > 0)
    values = foreground[None, None].float() * 255.0
    resized = F.interpolate(values, size=(size, size), mode="bilinear", align_corners=False)
    return resized[0, 0] >= 0.5  # 8-bit rounding (half up, as cv2's fixed point) is above 0


def _coin(p: float, g: torch.Generator | None) -> bool:
    return bool(torch.rand((), generator=g) < p)


def _uniform(low: float, high: float, g: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))
