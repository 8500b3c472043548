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
``torch.manual_seed`` is reproducible with any number of workers. A call draws its parameters
(:meth:`TrainAugmentation.draw`, an :class:`AugmentParameters` of one sample) and applies them
(:meth:`TrainAugmentation.apply`); :mod:`reclmis.data.augment` draws and applies the same law for a whole
batch at once.

:func:`resize_mask` brings a mask to the model's size: nearest neighbour, or as the official loader
(bilinear, then every value above 0 is foreground).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from reclmis.data.note_geometry import FRAMES, Frame, SquareSymmetry, transform_note

__all__ = [
    "IDENTITY",
    "ROT90_FLIP",
    "ROTATE",
    "SYMMETRIES",
    "AugmentParameters",
    "TrainAugmentation",
    "gaussian_blur",
    "hsv_to_rgb",
    "resize_mask",
    "rgb_to_hsv",
    "rotate",
    "rotation_theta",
]

IDENTITY, ROT90_FLIP, ROTATE = 0, 1, 2  # AugmentParameters.geometry


@dataclass(frozen=True)
class AugmentParameters:
    """Draws of :class:`TrainAugmentation`'s law for B samples of C channels, as CPU tensors.

    Steps that were not drawn hold neutral values (no shift, unit scale, zero sigma, no turn).

    geometry        int64 (B,): IDENTITY, ROT90_FLIP or ROTATE
    quarter_turns   int64 (B,): k of ``torch.rot90(image, k, dims=(1, 2))`` (ROT90_FLIP)
    flip_dim        int64 (B,): the (C, H, W) dimension flipped after the turn, 1 (rows) or 2 (columns)
    angle           float64 (B,): the free rotation, degrees counter-clockwise on screen (ROTATE)
    blur            bool (B, C): the channel is blurred
    sigma           float64 (B, C, 2): (sigma_y, sigma_x) of the channel's Gaussian
    brightness_on   bool (B,), brightness float64 (B,): the shift added
    contrast_on     bool (B,), contrast float64 (B,): the scale; contrast_first bool (B,): before the colour
    saturation_on   bool (B,), saturation float64 (B,): the scale of the saturation
    hue_on          bool (B,), hue float64 (B,): the shift of the hue, a fraction of the colour circle
    """

    geometry: torch.Tensor
    quarter_turns: torch.Tensor
    flip_dim: torch.Tensor
    angle: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    brightness_on: torch.Tensor
    brightness: torch.Tensor
    contrast_on: torch.Tensor
    contrast: torch.Tensor
    contrast_first: torch.Tensor
    saturation_on: torch.Tensor
    saturation: torch.Tensor
    hue_on: torch.Tensor
    hue: torch.Tensor

    def __post_init__(self) -> None:
        sizes = {name: value.shape[0] for name, value in self._fields().items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"AugmentParameters fields need one batch size, got {sizes}")
        devices = {value.device.type for value in self._fields().values()}
        if devices != {"cpu"}:
            raise ValueError(f"AugmentParameters live on the host (CPU tensors), got {sorted(devices)}")

    def _fields(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __len__(self) -> int:
        return self.geometry.shape[0]

    @property
    def channels(self) -> int:
        return self.blur.shape[1]

    @classmethod
    def neutral(cls, batch: int, channels: int) -> AugmentParameters:
        """B samples with no step drawn: every sample unchanged."""

        def flag() -> torch.Tensor:
            return torch.zeros(batch, dtype=torch.bool)

        def value(neutral: float) -> torch.Tensor:
            return torch.full((batch,), neutral, dtype=torch.float64)

        return cls(
            geometry=torch.full((batch,), IDENTITY, dtype=torch.int64),
            quarter_turns=torch.zeros(batch, dtype=torch.int64),
            flip_dim=torch.ones(batch, dtype=torch.int64),
            angle=value(0.0),
            blur=torch.zeros(batch, channels, dtype=torch.bool),
            sigma=torch.zeros(batch, channels, 2, dtype=torch.float64),
            brightness_on=flag(),
            brightness=value(0.0),
            contrast_on=flag(),
            contrast=value(1.0),
            contrast_first=flag(),
            saturation_on=flag(),
            saturation=value(1.0),
            hue_on=flag(),
            hue=value(0.0),
        )

    @classmethod
    def cat(cls, parts: list[AugmentParameters]) -> AugmentParameters:
        """The samples of ``parts`` one after another."""
        return cls(
            **{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)}
        )

    def select(self, index: int | slice | torch.Tensor) -> AugmentParameters:
        """The samples at ``index`` (an int keeps the batch dimension: one sample)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return type(self)(**{name: value[index] for name, value in self._fields().items()})

    def replace(self, **changes: torch.Tensor) -> AugmentParameters:
        return dataclasses.replace(self, **changes)

    @property
    def symmetry_code(self) -> torch.Tensor:
        """int64 (B,): 0 for no flip or quarter turn, else 1 + 2 k + (flip_dim - 1) (:data:`SYMMETRIES`)."""
        code = 1 + 2 * self.quarter_turns + (self.flip_dim - 1)
        return torch.where(self.geometry == ROT90_FLIP, code, torch.zeros_like(code))


# the flips and quarter turns a ROT90_FLIP draw can make, by symmetry_code (k quarter turns, then the flip)
SYMMETRIES: dict[int, SquareSymmetry] = {
    1 + 2 * k + (dim - 1): SquareSymmetry.flip(dim) @ SquareSymmetry.rot90(k)
    for k in range(4)
    for dim in (1, 2)
}


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
        if not 0.0 <= hue_delta <= 1.0:
            raise ValueError(f"hue_delta must be a fraction of the colour circle in [0, 1], got {hue_delta}")
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
        _check_sample(image, mask)
        return self.apply(image, mask, note, self.draw(image.shape[0], generator))

    def draw(self, channels: int, generator: torch.Generator | None = None) -> AugmentParameters:
        """One sample's parameters for an image of ``channels`` channels. Geometry is drawn first, then the
        photometric steps in the order they apply; a step that is not taken draws nothing further."""
        g = generator
        p = AugmentParameters.neutral(1, channels)._fields()
        if self.geometric:
            if _coin(self.rot90_flip_prob, g):
                p["geometry"][0] = ROT90_FLIP
                p["quarter_turns"][0] = int(torch.randint(0, 4, (), generator=g))
                p["flip_dim"][0] = 1 + int(torch.randint(0, 2, (), generator=g))
            elif _coin(self.rotate_prob, g):
                p["geometry"][0] = ROTATE
                p["angle"][0] = _uniform(-self.max_angle, self.max_angle, g)
        if not self.photometric:
            return AugmentParameters(**p)
        if _coin(self.blur_prob, g):
            for c in range(channels):
                if _coin(self.blur_channel_prob, g):
                    p["blur"][0, c] = True
                    p["sigma"][0, c, 0] = _uniform(*self.blur_sigma, g)
                    p["sigma"][0, c, 1] = _uniform(*self.blur_sigma, g)
        if _coin(0.5, g):
            p["brightness_on"][0] = True
            p["brightness"][0] = _uniform(-self.brightness_delta, self.brightness_delta, g)
        p["contrast_first"][0] = contrast_first = _coin(0.5, g)
        if contrast_first:
            self._draw_contrast(p, g)
        if channels == 3:
            if _coin(0.5, g):
                p["saturation_on"][0] = True
                p["saturation"][0] = _uniform(*self.saturation_range, g)
            if _coin(0.5, g):
                p["hue_on"][0] = True
                p["hue"][0] = _uniform(-self.hue_delta, self.hue_delta, g)
        if not contrast_first:
            self._draw_contrast(p, g)
        return AugmentParameters(**p)

    def _draw_contrast(self, p: dict[str, torch.Tensor], g: torch.Generator | None) -> None:
        if _coin(0.5, g):
            p["contrast_on"][0] = True
            p["contrast"][0] = _uniform(*self.contrast_range, g)

    def apply(
        self, image: torch.Tensor, mask: torch.Tensor, note: str | None, parameters: AugmentParameters
    ) -> tuple[torch.Tensor, torch.Tensor, str | None]:
        """``(image, mask, note)`` under one sample's drawn ``parameters``: photometric steps, then the
        geometry. A flip or quarter turn rewrites the note with a ``note_frame``; a note that cannot say the
        result keeps its sample's orientation (the geometry becomes the identity)."""
        _check_sample(image, mask)
        if len(parameters) != 1 or parameters.channels != image.shape[0]:
            raise ValueError(
                f"parameters must be one sample's of {image.shape[0]} channels, got {len(parameters)} "
                f"samples of {parameters.channels}"
            )
        image = self._photometric(image, parameters)
        kind, k, flip_dim = (
            int(parameters.geometry[0]),
            int(parameters.quarter_turns[0]),
            int(parameters.flip_dim[0]),
        )
        if kind == ROT90_FLIP and self.note_frame is not None and note is not None:
            moved = transform_note(note, SYMMETRIES[1 + 2 * k + (flip_dim - 1)], self.note_frame)
            kind = IDENTITY if moved is None else kind
            note = note if moved is None else moved
        if kind == ROT90_FLIP:
            image = torch.rot90(image, k, dims=(1, 2)).flip(flip_dim)
            mask = torch.rot90(mask, k, dims=(1, 2)).flip(flip_dim)
        elif kind == ROTATE:  # within +-20 degrees: the note's places still hold
            angle = float(parameters.angle[0])
            image = rotate(image, angle, mode=self.interpolation)
            mask = rotate(mask, angle, mode="nearest")
        return image.contiguous(), mask.contiguous(), note

    def _photometric(self, image: torch.Tensor, p: AugmentParameters) -> torch.Tensor:
        if p.blur[0].any():
            image = torch.stack(
                [
                    gaussian_blur(channel, (float(p.sigma[0, c, 0]), float(p.sigma[0, c, 1])))
                    if p.blur[0, c]
                    else channel
                    for c, channel in enumerate(image)
                ]
            )
        if p.brightness_on[0]:
            image = (image + float(p.brightness[0])).clamp(0, 1)
        if p.contrast_first[0]:
            image = self._contrast(image, p)
        if image.shape[0] == 3:
            image = self._colour(image, p)
        if not p.contrast_first[0]:
            image = self._contrast(image, p)
        return image

    @staticmethod
    def _contrast(image: torch.Tensor, p: AugmentParameters) -> torch.Tensor:
        if p.contrast_on[0]:
            image = (image * float(p.contrast[0])).clamp(0, 1)
        return image

    @staticmethod
    def _colour(image: torch.Tensor, p: AugmentParameters) -> torch.Tensor:
        if not (p.saturation_on[0] or p.hue_on[0]):
            return image
        h, s, v = rgb_to_hsv(image)
        if p.saturation_on[0]:
            s = (s * float(p.saturation[0])).clamp(0, 1)
        if p.hue_on[0]:
            h = torch.remainder(h + float(p.hue[0]), 1.0)
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
    theta = torch.tensor(rotation_theta(angle, *x.shape[-2:]), dtype=torch.float32, device=x.device)
    grid = F.affine_grid(theta[None], [1, *x.shape], align_corners=False)
    out = F.grid_sample(x[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out[0].to(x.dtype)


def rotation_theta(angle: float, height: int, width: int) -> list[list[float]]:
    """The affine map of :func:`rotate` for ``F.affine_grid``: output pixel to source pixel, in grid_sample's
    normalised coordinates (aspect ratio corrected)."""
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]]


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


def _check_sample(image: torch.Tensor, mask: torch.Tensor) -> None:
    if image.ndim != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float tensor (C, H, W), got {tuple(image.shape)} {image.dtype}")
    if mask.ndim != 3 or mask.shape[0] != 1 or mask.shape[1:] != image.shape[1:]:
        raise ValueError(
            f"mask must be (1, H, W) with the image's H, W {tuple(image.shape[1:])}, got {tuple(mask.shape)}"
        )


def _coin(p: float, g: torch.Generator | None) -> bool:
    return bool(torch.rand((), generator=g) < p)


def _uniform(low: float, high: float, g: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))
