"""Batched training augmentation: :class:`~reclmis.data.transforms.TrainAugmentation`'s law for a whole batch.

:func:`draw_parameters` draws every sample's parameters at once, as host tensors (:class:`AugmentParameters`):
the same probabilities and ranges as the per-sample transform, each sample independent of the others.
:func:`apply_parameters` applies them to a batch (B, C, H, W) with batched tensor ops on whatever device the
batch is on, in the per-sample order (blur, brightness, contrast before or after the colour, colour, then
the geometry):

- blur: the blurred (sample, channel) planes gathered into one stack and filtered by a depthwise separable
  convolution with one Gaussian per plane, replicate padding (the per-sample ``gaussian_blur``);
- brightness, contrast, saturation and hue: elementwise on the samples that drew them, the colour step by
  the closed form of HSV's round trip (below);
- flips and quarter turns: the samples grouped by the four maps the draws make; free rotations: one
  batched ``F.affine_grid`` and ``F.grid_sample`` for the images (bilinear) and their masks (nearest).

Which samples take which step is known on the host, so the device never reports back: the indices travel to
it with the batch, and nothing waits for the device. The note's rewrite (:func:`follow_notes`) is string work
on the host; :class:`~reclmis.data.note_table.NoteTable` does it by table look-up.

The colour step (``rgb_to_hsv``, then scaling the saturation S and shifting the hue H, then ``hsv_to_rgb``)
in closed form, with V the largest channel, D the largest minus the smallest, ``a`` the saturation scale
(so V S' = V min(a S, 1) = min(a D, V)) and h = 6 H' the shifted hue in sixths of the circle:

    channel = V - min(a D, V) * clamp(2 - d(h, c), 0, 1),

d the distance around the circle of six and c = 3, 5, 1 for red, green and blue (the hue where that
channel is the smallest): ``hsv_to_rgb``'s clamp(min(k, 4 - k), 0, 1) with k = (n + h) mod 6, n = 5, 3, 1.
It equals the per-sample round trip up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reclmis.data.note_geometry import transform_note
from reclmis.data.transforms import (
    IDENTITY,
    ROT90_FLIP,
    ROTATE,
    SYMMETRIES,
    AugmentParameters,
    TrainAugmentation,
    rotation_theta,
)

__all__ = ["AugmentParameters", "apply_parameters", "augment_batch", "draw_parameters", "follow_notes"]

_HSV_CENTRES = (3.0, 5.0, 1.0)  # red, green, blue: the hues (in sixths) where each channel is smallest
CPU_CHUNK_PIXELS = 4 * 3 * 224 * 224  # values per chunk of a CPU batch: a few samples, in the cache


def draw_parameters(
    augmentation: TrainAugmentation, batch: int, channels: int, generator: torch.Generator | None = None
) -> AugmentParameters:
    """Every sample's parameters under ``augmentation``'s law, drawn at once on the host.

    Each sample draws every value and keeps those of the steps its coins take: the same law as
    ``augmentation.draw`` per sample, from another stream of ``generator`` (a CPU generator; torch's global
    one by default).
    """
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU generator (parameters are drawn on the host), got {generator.device}"
        )
    a, g = augmentation, generator

    def coin(p: float, *shape: int) -> torch.Tensor:
        return torch.rand(batch, *shape, generator=g) < p

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, *shape, generator=g).double()

    p = AugmentParameters.neutral(batch, channels)
    changes: dict[str, torch.Tensor] = {}
    if a.geometric:
        turn_flip, rotate = coin(a.rot90_flip_prob), coin(a.rotate_prob)
        k, flip_dim = (
            torch.randint(0, 4, (batch,), generator=g),
            1 + torch.randint(0, 2, (batch,), generator=g),
        )
        angle = uniform(-a.max_angle, a.max_angle)
        rotate &= ~turn_flip
        changes["geometry"] = torch.where(turn_flip, ROT90_FLIP, torch.where(rotate, ROTATE, IDENTITY))
        changes["quarter_turns"] = torch.where(turn_flip, k, 0)
        changes["flip_dim"] = torch.where(turn_flip, flip_dim, 1)
        changes["angle"] = torch.where(rotate, angle, 0.0)
    if a.photometric:
        blur = coin(a.blur_prob)[:, None] & coin(a.blur_channel_prob, channels)
        changes["blur"] = blur
        changes["sigma"] = torch.where(blur[..., None], uniform(*a.blur_sigma, channels, 2), 0.0)
        colour = channels == 3
        for name, drawn, value, neutral in (
            ("brightness", coin(0.5), uniform(-a.brightness_delta, a.brightness_delta), 0.0),
            ("contrast", coin(0.5), uniform(*a.contrast_range), 1.0),
            ("saturation", coin(0.5) & colour, uniform(*a.saturation_range), 1.0),
            ("hue", coin(0.5) & colour, uniform(-a.hue_delta, a.hue_delta), 0.0),
        ):
            changes[f"{name}_on"] = drawn
            changes[name] = torch.where(drawn, value, neutral)
        changes["contrast_first"] = coin(0.5)
    return p.replace(**changes)


def follow_notes(
    notes: list[str], parameters: AugmentParameters, augmentation: TrainAugmentation
) -> tuple[list[str], AugmentParameters]:
    """The notes moved with their samples' flips and quarter turns (``augmentation.note_frame``), and the
    parameters with the identity where a note cannot say its sample's geometry (as the per-sample
    transform). Without a note frame the notes and parameters come back unchanged."""
    if len(notes) != len(parameters):
        raise ValueError(f"notes has {len(notes)} entries for {len(parameters)} samples")
    if augmentation.note_frame is None:
        return list(notes), parameters
    moved, kept = [], torch.zeros(len(notes), dtype=torch.bool)
    for i, (note, code) in enumerate(zip(notes, parameters.symmetry_code.tolist(), strict=True)):
        rewritten = note if code == 0 else transform_note(note, SYMMETRIES[code], augmentation.note_frame)
        kept[i] = rewritten is None
        moved.append(note if rewritten is None else rewritten)
    return moved, keep_orientation(parameters, kept)


def keep_orientation(parameters: AugmentParameters, kept: torch.Tensor) -> AugmentParameters:
    """``parameters`` with no flip or quarter turn for the samples where ``kept`` (bool (B,)) is true."""
    turned = kept & (parameters.geometry == ROT90_FLIP)
    return parameters.replace(
        geometry=torch.where(turned, IDENTITY, parameters.geometry),
        quarter_turns=torch.where(turned, 0, parameters.quarter_turns),
        flip_dim=torch.where(turned, 1, parameters.flip_dim),
    )


def apply_parameters(
    images: torch.Tensor,
    masks: torch.Tensor,
    parameters: AugmentParameters,
    augmentation: TrainAugmentation,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` (B, C, H, W) float in [0, 1] and ``masks`` (B, 1, H, W) float under ``parameters``, on their
    device. ``augmentation`` gives the free rotation's interpolation; its switches and probabilities were
    spent when the parameters were drawn. The inputs are modified only with ``inplace`` (contiguous ones)."""
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor (B, C, H, W), got {tuple(images.shape)} {images.dtype}"
        )
    batch, channels, height, width = images.shape
    if (
        masks.shape != (batch, 1, height, width)
        or not masks.is_floating_point()
        or masks.device != images.device
    ):
        raise ValueError(
            f"masks must be a float tensor (B, 1, H, W) = {(batch, 1, height, width)} on {images.device}, got "
            f"{tuple(masks.shape)} {masks.dtype} on {masks.device}"
        )
    if len(parameters) != batch or parameters.channels != channels:
        raise ValueError(
            f"parameters are for {len(parameters)} samples of {parameters.channels} channels, the batch has "
            f"{batch} of {channels}"
        )
    if height != width and bool((parameters.geometry == ROT90_FLIP).any()):
        raise ValueError(f"flips and quarter turns of a batch need square images, got {height}x{width}")
    if not inplace:
        images, masks = (
            images.clone(memory_format=torch.contiguous_format),
            masks.clone(memory_format=torch.contiguous_format),
        )
    elif not (images.is_contiguous() and masks.is_contiguous()):
        raise ValueError("inplace augmentation needs contiguous images and masks")
    # a few samples at a time on the CPU, so that every step's passes stay in the cache; one chunk on a GPU
    chunk = batch if images.device.type != "cpu" else max(1, CPU_CHUNK_PIXELS // (channels * height * width))
    for begin in range(0, batch, chunk):
        part = slice(begin, begin + chunk)
        _augment_(images[part], masks[part], parameters.select(part), augmentation.interpolation)
    return images, masks


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    notes: list[str] | None = None,
    augmentation: TrainAugmentation | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """``(images, masks, notes)`` of a batch augmented under ``augmentation``'s law (the default
    :class:`TrainAugmentation`): parameters drawn on the host from ``generator``, notes moved with their
    samples when the augmentation has a note frame, then the batched ops on the images' device."""
    augmentation = augmentation if augmentation is not None else TrainAugmentation()
    parameters = draw_parameters(augmentation, images.shape[0], images.shape[1], generator)
    if notes is not None:
        notes, parameters = follow_notes(notes, parameters, augmentation)
    images, masks = apply_parameters(images, masks, parameters, augmentation)
    return images, masks, notes


# ---------------------------------------------------------------- the steps


def _to(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A host tensor on ``like``'s device, without waiting for it."""
    return index.to(like.device, non_blocking=True)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """float64 host values (n,) as ``like``'s dtype on its device, shaped to broadcast over (n, C, H, W)."""
    return _to(values.to(like.dtype), like).view(-1, *([1] * (like.ndim - 1)))


def _augment_(images: torch.Tensor, masks: torch.Tensor, p: AugmentParameters, interpolation: str) -> None:
    """Every step, in place on contiguous ``images`` and ``masks``."""
    _blur_(images, p)
    _pointwise_(images, p)
    _geometry_(images, masks, p, interpolation)


def _blur_(images: torch.Tensor, p: AugmentParameters) -> None:
    planes = p.blur.flatten().nonzero().flatten()
    if planes.numel() == 0:
        return
    batch, channels, height, width = images.shape
    sigma = p.sigma.flatten(0, 1)[planes]
    flat, index = images.view(batch * channels, height, width), _to(planes, images)
    stack = _gaussian_pass(flat.index_select(0, index), sigma[:, 0], dim=1)
    flat.index_copy_(0, index, _gaussian_pass(stack, sigma[:, 1], dim=2))


def _gaussian_pass(stack: torch.Tensor, sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """One axis of the separable Gaussian of each plane of ``stack`` (n, H, W), ``sigma`` (n,) float64 on the
    host: ``gaussian_blur``'s kernel (radius max(1, int(4 sigma + 0.5)), none for sigma <= 0) zero-padded to
    the largest radius R, as 2R + 1 shifted multiply-adds over replicate-padded planes (a depthwise
    convolution, one kernel per plane)."""
    radius = torch.where(sigma > 0, (4.0 * sigma + 0.5).floor().clamp_min(1.0), 0.0)
    reach = int(radius.max())
    if reach == 0:
        return stack
    offsets = torch.arange(-reach, reach + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma.clamp_min(1e-12)[:, None]) ** 2)
    kernel = torch.where(offsets.abs() <= radius[:, None], kernel, 0.0)
    kernel = torch.where((sigma > 0)[:, None], kernel, (offsets == 0).double())  # sigma <= 0: unchanged
    kernel = _to((kernel / kernel.sum(1, keepdim=True)).to(stack.dtype), stack)
    length = stack.shape[dim]
    index = torch.arange(-reach, length + reach, device=stack.device).clamp_(0, length - 1)
    padded = stack.index_select(dim, index)  # replicate padding
    weights = kernel.view(-1, 2 * reach + 1, 1, 1).unbind(1)
    out = padded.narrow(dim, 0, length) * weights[0]
    for k in range(1, 2 * reach + 1):
        out.addcmul_(padded.narrow(dim, k, length), weights[k])
    return out


def _pointwise_(images: torch.Tensor, p: AugmentParameters) -> None:
    """Brightness, contrast (before or after the colour) and colour. A shift or scale runs over the whole
    chunk with the neutral value (0, 1) for samples that did not draw it, and the clamp to [0, 1] it implies
    leaves those unchanged: their values are in [0, 1] (up to the blur's rounding)."""
    if p.brightness_on.any():
        images.add_(_per_sample(p.brightness, images)).clamp_(0.0, 1.0)
    if (p.contrast_on & p.contrast_first).any():
        images.mul_(_per_sample(torch.where(p.contrast_first, p.contrast, 1.0), images)).clamp_(0.0, 1.0)
    coloured = (p.saturation_on | p.hue_on).nonzero().flatten()
    if images.shape[1] == 3 and coloured.numel() > 0:
        if coloured.numel() == images.shape[0]:
            images.copy_(_colour(images, p.saturation, p.hue))
        else:
            index = _to(coloured, images)
            images.index_copy_(
                0, index, _colour(images.index_select(0, index), p.saturation[coloured], p.hue[coloured])
            )
    if (p.contrast_on & ~p.contrast_first).any():
        images.mul_(_per_sample(torch.where(p.contrast_first, 1.0, p.contrast), images)).clamp_(0.0, 1.0)


def _colour(images: torch.Tensor, saturation: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """HSV's round trip with the saturation scaled and the hue shifted, in closed form (module docstring)."""
    red, green, blue = images.unbind(1)
    value = torch.maximum(torch.maximum(red, green), blue)
    delta = value - torch.minimum(torch.minimum(red, green), blue)
    # the hue in sixths of the circle, from the largest channel (red, then green, on ties: as argmax)
    is_red, is_green = value == red, value == green
    numerator = torch.where(is_red, green - blue, torch.where(is_green, blue - red, red - green))
    sector = torch.where(is_red, 0.0, torch.where(is_green, 2.0, 4.0)).add_(
        _per_sample(6.0 * hue + 12.0, value)
    )
    # (sector + numerator / delta + 6 hue) mod 6 as the fraction of a positive number (|hue| <= 1, + 12)
    hue6 = torch.addcdiv(sector, numerator, delta.clamp_min(1e-12))
    hue6 = hue6.div_(6.0).frac_().mul_(6.0)
    chroma = torch.minimum(delta * _per_sample(saturation, delta), value)  # V * S'
    # clamp(min(k, 4 - k), 0, 1) with k = (n + h) mod 6 is clamp(2 - d, 0, 1), d the distance from h to
    # 2 - n around the circle of six: 3, 5 and 1 for red, green and blue
    centre = _to(torch.tensor(_HSV_CENTRES, dtype=images.dtype), images).view(1, 3, 1, 1)
    distance = (hue6[:, None] - centre).abs_()
    distance = torch.minimum(distance, 6.0 - distance)
    weight = (2.0 - distance).clamp_min_(0.0).clamp_max_(1.0)
    return value[:, None] - chroma[:, None] * weight


def _geometry_(images: torch.Tensor, masks: torch.Tensor, p: AugmentParameters, interpolation: str) -> None:
    # flip(rows) after k turns is flip(columns) after k + 2 turns: four maps in all, one group each
    turns = (p.quarter_turns + 2 * (p.flip_dim == 1)) % 4
    for k in range(4):
        chosen = ((p.geometry == ROT90_FLIP) & (turns == k)).nonzero().flatten()
        if chosen.numel() > 0:
            for x in (images, masks):
                _replace_(x, chosen, lambda part, k=k: torch.rot90(part, k, dims=(2, 3)).flip(3))
    rotated = (p.geometry == ROTATE).nonzero().flatten()
    if rotated.numel() == 0:
        return
    height, width = images.shape[-2:]
    theta = torch.tensor(
        [rotation_theta(a, height, width) for a in p.angle[rotated].tolist()], dtype=torch.float32
    )
    grid = F.affine_grid(_to(theta, images), [rotated.numel(), 1, height, width], align_corners=False)
    for x, mode in ((images, interpolation), (masks, "nearest")):
        _replace_(
            x,
            rotated,
            lambda part, mode=mode: F.grid_sample(
                part, grid, mode=mode, padding_mode="zeros", align_corners=False
            ),
        )


def _replace_(x: torch.Tensor, chosen: torch.Tensor, step) -> None:
    """``x[chosen] = step(x[chosen])`` in place, ``chosen`` host indices."""
    if chosen.numel() == x.shape[0]:
        x.copy_(step(x))
    else:
        index = _to(chosen, x)
        x.index_copy_(0, index, step(x.index_select(0, index)))
