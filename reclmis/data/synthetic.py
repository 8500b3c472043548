"""Synthetic language-guided segmentation data: the note decides which lesions belong to the mask.

Each image is a grey chest-radiograph-like picture with two dark lung fields, ribs and a spine, and 2 to 4
bright textured lesions, each in a different lung zone (upper, middle or lower third of the left or right
lung; radiological convention: the patient's left lung is on the image's right). The note names a
non-empty strict subset of the lesions in the wording of QaTa-COV19's reports ("Bilateral pulmonary
infection, two infected areas, upper left lung and lower right lung.") and the mask covers exactly the
named lesions. All lesions look alike, so only the note tells a model which ones to segment.

:func:`make_synthetic` writes the LViT layout with QaTa's naming (``img/X.png``, ``labelcol/mask_X.png``,
notes ``<Split>_text.xlsx`` keyed by the mask name) and a counterfactual test split,
``<out>/counterfactual/Test_Folder``: the same test images with notes and masks naming a different subset
of their lesions. A model that reads the note scores about as well there as on the normal test split; one
that ignores the note cannot. Each split folder also holds ``lesioncol/``, masks of all lesions (named or
not; the dataset reader ignores it), to measure how much of the unnamed lesions a model segments. Notes
name positions in the radiological frame: ``augment: full`` with ``note_frame: radiological`` moves them with
every flip, where the official augmentation (``augment: official``) would contradict them.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import openpyxl
from PIL import Image

__all__ = ["ZONES", "describe_zones", "make_synthetic", "zone_boxes"]

# (vertical third, lung side); "left"/"right" are the patient's sides
ZONES = (
    "upper left",
    "middle left",
    "lower left",
    "upper right",
    "middle right",
    "lower right",
)
_THIRDS = ("upper", "middle", "lower")
# lung ellipses in fractions of the image side: centre x, centre y, half width, half height
_LUNG_CENTRE_X = {"right": 0.31, "left": 0.69}  # patient's right lung on the image's left
_LUNG_CENTRE_Y = 0.50
_LUNG_HALF_WIDTH = 0.16
_LUNG_HALF_HEIGHT = 0.34
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
_SPLITS = (("Train", "train"), ("Val", "val"), ("Test", "test"))
MIN_SIZE = 32


def zone_boxes(size: int) -> dict[str, tuple[int, int, int, int]]:
    """Pixel box ``(top, bottom, left, right)`` (half-open) of each zone in a ``size`` x ``size`` image.

    Boxes of the same lung do not overlap; every lesion of a zone lies inside its box.
    """
    boxes = {}
    for zone in ZONES:
        top, bottom, left, right = _zone_bounds(zone)
        boxes[zone] = tuple(int(np.ceil(v * size - 0.5)) for v in (top, bottom, left, right))
    return boxes


def describe_zones(zones: Sequence[str], rng: np.random.Generator) -> str:
    """A report-style note naming ``zones`` (a non-empty selection of :data:`ZONES`), in a random wording."""
    if not zones or any(z not in ZONES for z in zones) or len(set(zones)) != len(zones):
        raise ValueError(f"zones must be distinct names from {ZONES}, got {list(zones)}")
    ordered = [z for z in ZONES if z in zones]
    places = [f"{z} lung" for z in ordered]
    where = places[0] if len(places) == 1 else ", ".join(places[:-1]) + " and " + places[-1]
    n = len(ordered)
    count, plural = _NUMBERS[n], "s" if n > 1 else ""
    sides = {z.split()[1] for z in ordered}
    lateral = "Bilateral" if len(sides) == 2 else "Unilateral"
    templates = (
        f"{lateral} pulmonary infection, {count} infected area{plural}, {where}.",
        f"{lateral} infection, {count} area{plural} in the {where}.",
        f"{count.capitalize()} infected area{plural} in the {where}.",
        f"{lateral} pulmonary infection in the {where}.",
        f"Lesion{plural} in the {where}.",
    )
    return templates[int(rng.integers(len(templates)))]


def make_synthetic(
    out: Path | str,
    size: int = 64,
    n_train: int = 400,
    n_val: int = 64,
    n_test: int = 100,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic language-guided dataset under ``out`` and return ``out``.

    The defaults (400/64/100 images of 64x64) take a second or two to write and are sized for short CPU
    runs of the ``tiny`` preset (``make demo``). The same ``seed`` gives the same pictures and notes;
    each split draws from its own stream, so changing one split's size leaves the others unchanged.
    Existing split folders in ``out`` raise FileExistsError unless ``overwrite`` is set.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer of at least {MIN_SIZE}, got {size!r}")
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    out = Path(out)
    targets = [out / f"{stem}_Folder" for stem, _ in _SPLITS] + [out / "counterfactual"]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist; pass overwrite=True to replace them"
        )
    for target in existing:
        shutil.rmtree(target)

    counts = {"train": n_train, "val": n_val, "test": n_test}
    for index, (stem, split) in enumerate(_SPLITS):
        rng = np.random.default_rng([seed, index])
        folder = out / f"{stem}_Folder"
        notes = {}
        cases = [_draw_case(rng, size) for _ in range(counts[split])]
        for number, (image, lesions, named) in enumerate(cases):
            name = f"{split}_{number:04d}.png"
            notes["mask_" + name] = _write_pair(folder, name, image, lesions, named, rng)
        _write_notes(folder / f"{stem}_text.xlsx", notes)
        if split == "test":
            _write_counterfactual(out / "counterfactual" / "Test_Folder", cases, seed)
    return out


def _zone_bounds(zone: str) -> tuple[float, float, float, float]:
    third, side = zone.split()
    centre_x = _LUNG_CENTRE_X[side]
    top = _LUNG_CENTRE_Y - _LUNG_HALF_HEIGHT
    step = 2 * _LUNG_HALF_HEIGHT / 3
    row = _THIRDS.index(third)
    return top + row * step, top + (row + 1) * step, centre_x - _LUNG_HALF_WIDTH, centre_x + _LUNG_HALF_WIDTH


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in fractions of the side."""
    axis = (np.arange(size) + 0.5) / size
    return np.meshgrid(axis, axis, indexing="ij")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in about [-1, 1]: a coarse Gaussian grid upsampled bicubically."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)) / 2.0


def _lung_inside(y: np.ndarray, x: np.ndarray, side: str) -> np.ndarray:
    """Normalised elliptic radius of each point from the centre of one lung (<= 1 inside)."""
    return np.hypot((x - _LUNG_CENTRE_X[side]) / _LUNG_HALF_WIDTH, (y - _LUNG_CENTRE_Y) / _LUNG_HALF_HEIGHT)


def _chest(rng: np.random.Generator, size: int) -> np.ndarray:
    """A chest-radiograph-like grey background in [0, 1] without lesions."""
    y, x = _grid(size)
    gain = rng.uniform(0.9, 1.1)
    body = np.clip((1.0 - np.hypot((x - 0.5) / 0.47, (y - 0.6) / 0.56)) * 12.0, 0.0, 1.0)
    image = 0.05 + body * (0.45 + 0.1 * y)
    spine = np.clip((0.07 - np.abs(x - 0.5)) * 40.0, 0.0, 1.0) * (y > 0.12)
    image = image + 0.15 * spine * body
    for side in _LUNG_CENTRE_X:
        radius = _lung_inside(y, x, side)
        lung = np.clip((1.0 - radius) * 10.0, 0.0, 1.0)
        curve = y + 0.08 * ((x - _LUNG_CENTRE_X[side]) / _LUNG_HALF_WIDTH) ** 2
        ribs = np.clip(np.sin(2 * np.pi * curve / 0.085), 0.0, 1.0) ** 2
        darkness = rng.uniform(0.26, 0.34) + 0.03 * _smooth_noise(rng, size, 6)
        image = image - lung * (darkness - 0.05 * ribs)
    return np.clip(image * gain, 0.0, 1.0)


def _draw_lesion(rng: np.random.Generator, size: int, zone: str) -> tuple[np.ndarray, np.ndarray]:
    """One lesion inside ``zone``: its soft opacity (for the picture) and its binary mask."""
    top, bottom, left, right = _zone_bounds(zone)
    side = zone.split()[1]
    y, x = _grid(size)
    for _ in range(100):
        r_max = rng.uniform(0.055, 0.085)
        margin = r_max + 0.5 / size
        cy, cx = rng.uniform(top + margin, bottom - margin), rng.uniform(left + margin, right - margin)
        if _lung_inside(np.array(cy), np.array(cx), side) > 0.8:
            continue
        angle = np.arctan2(y - cy, x - cx)
        phase = rng.uniform(0, 2 * np.pi, size=2)
        wobble = 0.5 + 0.3 * np.sin(2 * angle + phase[0]) + 0.2 * np.sin(3 * angle + phase[1])
        outline = r_max * (1.0 - 0.4 * wobble)
        inside_lung = _lung_inside(y, x, side) <= 1.0
        distance = (outline - np.hypot(y - cy, x - cx)) * size  # in pixels, > 0 inside the outline
        mask = (distance >= 0) & inside_lung
        if mask.sum() >= 4:
            opacity = np.clip(distance + 0.5, 0.0, 1.0) * inside_lung
            return opacity, mask
    raise RuntimeError(f"could not place a lesion in zone {zone!r} at size {size}")


def _draw_case(
    rng: np.random.Generator, size: int
) -> tuple[np.ndarray, list[tuple[str, np.ndarray]], list[int]]:
    """A picture with its lesions ``(zone, mask)`` and the indices of the lesions its note names."""
    image = _chest(rng, size)
    n_lesions = int(rng.choice([2, 3, 4], p=[0.45, 0.4, 0.15]))
    zones = [ZONES[i] for i in rng.choice(len(ZONES), size=n_lesions, replace=False)]
    lesions = []
    for zone in zones:
        opacity, mask = _draw_lesion(rng, size, zone)
        texture = 0.75 + 0.25 * _smooth_noise(rng, size, max(4, size // 6))
        image = image + opacity * rng.uniform(0.35, 0.5) * texture
        lesions.append((zone, mask))
    image = image + rng.normal(0.0, 0.015, image.shape)
    n_named = int(rng.integers(1, n_lesions))
    named = sorted(int(i) for i in rng.choice(n_lesions, size=n_named, replace=False))
    return np.clip(image, 0.0, 1.0), lesions, named


def _write_pair(
    folder: Path,
    name: str,
    image: np.ndarray,
    lesions: list[tuple[str, np.ndarray]],
    named: list[int],
    rng: np.random.Generator,
) -> str:
    """Write the picture, the mask of the ``named`` lesions and the mask of all lesions; return the note."""
    for sub in ("img", "labelcol", "lesioncol"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(folder / "img" / name)
    for sub, chosen in (("labelcol", named), ("lesioncol", range(len(lesions)))):
        mask = np.zeros(image.shape, dtype=bool)
        for index in chosen:
            mask |= lesions[index][1]
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / sub / f"mask_{name}")
    return describe_zones([lesions[i][0] for i in named], rng)


def _write_counterfactual(
    folder: Path,
    cases: list[tuple[np.ndarray, list[tuple[str, np.ndarray]], list[int]]],
    seed: int,
) -> None:
    """The test pictures again, each with a note and mask naming another strict subset of its lesions."""
    rng = np.random.default_rng([seed, len(_SPLITS)])
    notes = {}
    for number, (image, lesions, named) in enumerate(cases):
        name = f"test_{number:04d}.png"
        subsets = [
            list(c)
            for k in range(1, len(lesions))
            for c in itertools.combinations(range(len(lesions)), k)
            if list(c) != named
        ]
        other = subsets[int(rng.integers(len(subsets)))]
        notes["mask_" + name] = _write_pair(folder, name, image, lesions, other, rng)
    _write_notes(folder / "Test_text.xlsx", notes)


def _write_notes(path: Path, notes: dict[str, str]) -> None:
    workbook = openpyxl.Workbook(write_only=True)
    sheet = workbook.create_sheet("Sheet1")
    sheet.append(["Image", "Description"])
    for name, text in notes.items():
        sheet.append([name, text])
    workbook.save(path)
