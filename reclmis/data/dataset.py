"""Datasets in the LViT folder layout (QaTa-COV19, MosMedData+, MoNuSeg).

A dataset root holds one folder per split, each with images, binary masks and a notes table::

    <root>/Train_Folder/img/*.png          images (png, jpg, jpeg, tif, tiff; RGB or grey, 8 or 16 bits)
    <root>/Train_Folder/labelcol/*.png     masks: foreground above half the value range (MASK_RULE)
    <root>/Train_Folder/Train_text.xlsx    columns ``Image`` (the mask file name) and ``Description``
    <root>/Val_Folder/...                  likewise, notes in Val_text.xlsx
    <root>/Test_Folder/...                 likewise, notes in Test_text.xlsx

A mask is named like its image (MoNuSeg, MosMedData+; the extension may differ, e.g. ``img/X.tif`` with
``labelcol/X.png``) or carries QaTa's prefix (``labelcol/mask_X.png`` for ``img/X.png``). Notes may also be
``.csv`` files, may sit in the root instead of the split folder, and QaTa's shared ``Train_Val_text.xlsx``
serves the train and validation splits. Every inconsistency raises :class:`DatasetError` naming the file.

Masks are read as annotation tools write them (:data:`MASK_RULE`, docs/masks.md): 1-, 8- and 16-bit grey,
palette, RGB, grey with alpha and RGBA. A pixel is foreground where its value is above half the value
range: 0..1 when the mask holds nothing above 1 (a label map), else 0..255, else 0..65535. So 0/255 with
JPEG noise, 0/1, 0/128 and probability maps (above 0.5) all give the intended mask. A colour mask takes
its brightest channel; one with alpha takes the alpha channel when the colours are the same at every pixel
(a mask drawn in the alpha channel), else the colours composited over black. 16-bit grey images are scaled
by their bit depth: the one the file states (PNG sBIT, TIFF MaxSampleValue), else the smallest of 8, 10,
12, 14 or 16 bits that holds the image's largest value, with a warning when that is below 16.
"""

from __future__ import annotations

import csv
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openpyxl
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from reclmis.data.transforms import TrainAugmentation, resize_mask

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_RULE",
    "SPLITS",
    "DatasetError",
    "DatasetWarning",
    "LViTDataset",
    "Sample",
    "find_notes_file",
    "load_image",
    "read_notes",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SPLITS = {"train": "Train", "val": "Val", "test": "Test"}
QATA_MASK_PREFIX = "mask_"
SHARED_NOTES_STEM = "Train_Val"

MASK_RANGES = (1, 255, 65535)  # a mask's value range: the smallest of these holding its largest value
MASK_RULE = (
    "foreground above half the value range (0..1 if the mask holds nothing above 1, else 0..255, else "
    "0..65535); colour: the brightest channel; with alpha: the alpha channel if the colours are uniform, "
    "else the colours over black"
)
IMAGE_BIT_DEPTHS = (8, 10, 12, 14, 16)  # for 16-bit images that do not state how many bits they use
UNIFORM_MASKS_SHOWN = 5

JointTransform = Callable[[torch.Tensor, torch.Tensor, str], tuple[torch.Tensor, torch.Tensor, str]]


class DatasetError(ValueError):
    """A dataset folder is incomplete or inconsistent; the message names the file."""


class DatasetWarning(UserWarning):
    """Data that is readable but probably not what was meant (e.g. masks without foreground)."""


@dataclass(frozen=True)
class Sample:
    """One image of a split: its files and its note."""

    image_path: Path
    mask_path: Path
    text: str

    @property
    def name(self) -> str:
        return self.image_path.name


def find_notes_file(root: Path | str, split: str) -> Path:
    """The notes table of ``split``: ``<Split>_text`` in the split folder, then in the root, then QaTa's
    ``Train_Val_text`` (train and val only); ``.xlsx`` before ``.csv`` at each place."""
    root = Path(root)
    stem = _split_stem(split)
    folders = (root / f"{stem}_Folder", root)
    stems = [stem, SHARED_NOTES_STEM] if split in ("train", "val") else [stem]
    candidates = [folder / f"{s}_text{ext}" for s in stems for folder in folders for ext in (".xlsx", ".csv")]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise DatasetError(f"no notes file for split {split!r}; looked for {tried}")


def read_notes(path: Path | str) -> dict[str, str]:
    """Read a notes table (``.xlsx``: first sheet, or ``.csv``) into ``{mask file name: note}``.

    The header row must have the columns ``Image`` and ``Description``; blank rows are ignored. A row with
    an empty name or note, or a name listed twice with different notes, raises :class:`DatasetError`.
    """
    path = Path(path)
    if path.suffix.lower() == ".xlsx":
        rows = _read_xlsx_rows(path)
    elif path.suffix.lower() == ".csv":
        rows = _read_csv_rows(path)
    else:
        raise DatasetError(f"notes file {path} must be .xlsx or .csv")
    if not rows:
        raise DatasetError(f"notes file {path} is empty")
    header = [str(cell).strip().lower() if cell is not None else "" for cell in rows[0]]
    try:
        image_col, text_col = header.index("image"), header.index("description")
    except ValueError:
        raise DatasetError(
            f"notes file {path} needs the columns 'Image' and 'Description' in its first row, found {rows[0]}"
        ) from None
    notes: dict[str, str] = {}
    for row_number, row in enumerate(rows[1:], start=2):
        cells = [_cell_text(row[i]) if i < len(row) else "" for i in (image_col, text_col)]
        name, text = cells
        if not name and not text:
            continue
        if not name or not text:
            missing = "Image" if not name else "Description"
            raise DatasetError(f"notes file {path}, row {row_number}: empty {missing!r} cell")
        if notes.get(name, text) != text:
            raise DatasetError(
                f"notes file {path}, row {row_number}: {name!r} is listed twice with different notes"
            )
        notes[name] = text
    return notes


class LViTDataset(Dataset):
    """One split of an LViT-layout dataset as ``dict(image, mask, text, name)`` items.

    ``image`` is a float32 tensor (3, S, S) in [0, 1] (grey images are replicated to three channels),
    resized bicubic; ``mask`` is a float32 tensor (1, S, S) in {0, 1}, binarised by :data:`MASK_RULE`
    then resized by ``mask_resize`` ("nearest", or "bilinear" then > 0 as the official loader: see
    :func:`~reclmis.data.transforms.resize_mask`); ``text`` is the note; ``name`` the image file name.
    :meth:`check_masks` warns about masks without background or foreground at the model's size.

    The constructor pairs every image with its mask and note and reads every file header, so a broken
    folder fails here, before training. ``transform``, a joint ``(image, mask, note) -> (image, mask, note)``
    callable, is applied to every item; it defaults to :class:`~reclmis.data.transforms.TrainAugmentation` when
    ``augment`` is true. Its randomness comes from torch's generator, which DataLoader seeds per worker. With ``cache`` the decoded, resized
    pictures stay in memory (as uint8) after their first use; :meth:`preload` fills the cache up front,
    e.g. before DataLoader workers fork so that they share it.
    """

    def __init__(
        self,
        root: Path | str,
        split: str,
        image_size: int,
        augment: bool = False,
        cache: bool = True,
        transform: JointTransform | None = None,
        mask_resize: str = "nearest",
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if mask_resize not in ("nearest", "bilinear"):
            raise ValueError(f"mask_resize must be 'nearest' or 'bilinear', got {mask_resize!r}")
        self.root = Path(root)
        self.mask_resize = mask_resize
        self.split = split
        self.image_size = image_size
        self.folder = self.root / f"{_split_stem(split)}_Folder"
        if not self.folder.is_dir():
            raise DatasetError(f"split folder {self.folder} does not exist (split {split!r})")
        self.notes_file = find_notes_file(self.root, split)
        self.samples = _pair_files(self.folder, read_notes(self.notes_file), self.notes_file)
        self.transform = TrainAugmentation() if augment and transform is None else transform
        self.cache = cache
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def texts(self) -> list[str]:
        """The notes in item order (e.g. to train a tokenizer)."""
        return [s.text for s in self.samples]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.samples]

    def preload(self) -> None:
        """Decode and cache every item now (requires ``cache=True``)."""
        if not self.cache:
            raise ValueError("preload() needs cache=True")
        for index in range(len(self)):
            self._load(index)

    def check_masks(self) -> tuple[list[str], list[str]]:
        """The masks that are entirely background and those entirely foreground at the model's size;
        when there are any, one :class:`DatasetWarning` says how many and names the first files (a mask
        encoding read wrongly looks like this)."""
        empty, full = [], []
        for index, sample in enumerate(self.samples):
            cached = self._cache.get(index)
            mask = cached[1] if cached is not None else self._mask(sample)
            if not mask.any():
                empty.append(sample.mask_path.name)
            elif mask.all():
                full.append(sample.mask_path.name)
        if empty or full:
            parts = [
                f"{len(names)} of {len(self)} masks are entirely {kind} ({_first(names)})"
                for names, kind in ((empty, "background"), (full, "foreground"))
                if names
            ]
            warnings.warn(
                f"{self.folder / 'labelcol'}: {' and '.join(parts)} at {self.image_size}x{self.image_size}; "
                f"if they should not be, check how they are encoded (read as: {MASK_RULE})",
                DatasetWarning,
                stacklevel=2,
            )
        return empty, full

    def _mask(self, sample: Sample) -> torch.Tensor:
        foreground = torch.from_numpy(_read_mask(sample.mask_path))
        return resize_mask(foreground, self.image_size, self.mask_resize)[None].to(torch.uint8)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        sample = self.samples[index]
        image_u8, mask_u8 = self._load(index)
        image = image_u8.float().div_(255.0)
        mask = mask_u8.float()
        text = sample.text
        if self.transform is not None:
            image, mask, text = self.transform(image, mask, text)
        return {"image": image, "mask": mask, "text": text, "name": sample.name}

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        sample = self.samples[index]
        item = (_image_tensor_u8(sample.image_path, self.image_size), self._mask(sample))
        if self.cache:
            self._cache[index] = item
        return item

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
            f"image_size={self.image_size}, mask_resize={self.mask_resize!r}, "
            f"augment={self.transform is not None})"
        )


def load_image(path: Path | str, image_size: int) -> torch.Tensor:
    """Read one image as the dataset does: float32 (3, S, S) in [0, 1], grey replicated, resized bicubic.

    Raises :class:`DatasetError` naming the file when it is missing or cannot be decoded.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return _image_tensor_u8(Path(path), image_size).float().div_(255.0)


def _image_tensor_u8(path: Path, image_size: int) -> torch.Tensor:
    image = _read_image(path).resize((image_size, image_size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())


def _split_stem(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return SPLITS[split]


def _read_xlsx_rows(path: Path) -> list[tuple[object, ...]]:
    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises zipfile, KeyError and its own errors for broken files
        raise DatasetError(f"cannot read notes file {path}: {exc}") from exc
    try:
        return [row for row in workbook.worksheets[0].iter_rows(values_only=True) if row is not None]
    finally:
        workbook.close()


def _read_csv_rows(path: Path) -> list[tuple[object, ...]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return [tuple(row) for row in csv.reader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read notes file {path}: {exc}") from exc


def _cell_text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"folder {folder} does not exist")
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DatasetError(
                f"{path} is not an image file with one of the extensions {', '.join(IMAGE_EXTENSIONS)}"
            )
        files.append(path)
    return files


def _pair_files(folder: Path, notes: dict[str, str], notes_file: Path) -> list[Sample]:
    """Pair each image with its mask and note; every image needs both and every mask an image."""
    images = _list_images(folder / "img")
    _check_unique_stems(images)
    masks_by_stem: dict[str, list[Path]] = {}
    for mask in _list_images(folder / "labelcol"):
        masks_by_stem.setdefault(mask.stem, []).append(mask)
    if not images:
        raise DatasetError(f"image folder {folder / 'img'} holds no images")

    samples, used = [], set()
    for image in images:
        candidates = masks_by_stem.get(image.stem, []) + masks_by_stem.get(QATA_MASK_PREFIX + image.stem, [])
        if not candidates:
            raise DatasetError(
                f"no mask for image {image}: expected {folder / 'labelcol' / image.stem}.<ext> "
                f"or {folder / 'labelcol' / (QATA_MASK_PREFIX + image.stem)}.<ext>"
            )
        if len(candidates) > 1:
            raise DatasetError(
                f"image {image} matches several masks: {', '.join(str(c) for c in candidates)}"
            )
        mask = candidates[0]
        text = notes.get(mask.name, notes.get(mask.stem + ".png"))
        if text is None:
            raise DatasetError(f"no note for mask {mask.name!r} (image {image}) in {notes_file}")
        _check_pair(image, mask)
        samples.append(Sample(image_path=image, mask_path=mask, text=text))
        used.add(mask)
    orphans = [str(m) for group in masks_by_stem.values() for m in group if m not in used]
    if orphans:
        raise DatasetError(f"masks without an image in {folder / 'img'}: {', '.join(orphans)}")
    return samples


def _check_unique_stems(images: list[Path]) -> None:
    """Masks are found by the image's name without its suffix: two images may not share it."""
    by_stem: dict[str, list[Path]] = {}
    for image in images:
        by_stem.setdefault(image.stem, []).append(image)
    for stem, group in by_stem.items():
        if len(group) > 1:
            raise DatasetError(
                f"images {' and '.join(str(p) for p in group)} share the name {stem!r}: their mask and note "
                "are found by that name, so keep one of them"
            )


def _first(names: list[str]) -> str:
    more = ", ..." if len(names) > UNIFORM_MASKS_SHOWN else ""
    return ", ".join(names[:UNIFORM_MASKS_SHOWN]) + more


def _check_pair(image: Path, mask: Path) -> None:
    """Read both headers: each file must be a readable picture and both must have the same size."""
    sizes = []
    for path, kind in ((image, "image"), (mask, "mask")):
        try:
            with Image.open(path) as picture:
                sizes.append(picture.size)
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"cannot read {kind} {path}: {exc}") from exc
    if sizes[0] != sizes[1]:
        raise DatasetError(
            f"image {image} is {sizes[0][0]}x{sizes[0][1]} but its mask {mask} is {sizes[1][0]}x{sizes[1][1]}"
        )


def _read_image(path: Path) -> Image.Image:
    """Decode an image as 8-bit RGB (grey replicated; 16-bit grey scaled from its bit depth to 8 bits)."""
    try:
        with Image.open(path) as picture:
            picture.load()
            if picture.mode.startswith("I;16"):
                values = np.asarray(picture, dtype=np.float64)
                top = 2 ** _bit_depth(picture, path, values) - 1
                values = np.clip(values, 0, top) / top * 255.0
                return Image.fromarray(np.round(values).astype(np.uint8)).convert("RGB")
            if picture.mode in ("I", "F"):
                raise DatasetError(
                    f"image {path} has unsupported mode {picture.mode!r} (32-bit); save it as 8 or 16 bits"
                )
            return picture.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


_warned_bit_depths: set[Path] = set()


def _bit_depth(picture: Image.Image, path: Path, values: np.ndarray) -> int:
    """The bits a 16-bit grey image uses: stated by the file (PNG sBIT, TIFF MaxSampleValue), else the
    smallest of IMAGE_BIT_DEPTHS holding its largest value, with a warning (once per folder) below 16."""
    stated = _stated_bit_depth(picture, path)
    if stated is not None:
        return stated
    top = values.max() if values.size else 0
    bits = next(b for b in IMAGE_BIT_DEPTHS if top <= 2**b - 1)
    if bits < 16 and path.parent not in _warned_bit_depths:
        _warned_bit_depths.add(path.parent)
        warnings.warn(
            f"{path}: a 16-bit image whose values reach {int(top)}, read as {bits}-bit data (scaled by "
            f"{2**bits - 1}, not 65535); images of this folder that do not state their bit depth (PNG sBIT) "
            "are read the same way, each by the smallest of 8, 10, 12, 14, 16 bits that holds its values",
            DatasetWarning,
            stacklevel=2,
        )
    return bits


def _stated_bit_depth(picture: Image.Image, path: Path) -> int | None:
    if picture.format == "TIFF":
        top = picture.tag_v2.get(281)  # MaxSampleValue
        top = top[0] if isinstance(top, tuple) else top
        return int(top).bit_length() if top else None
    if picture.format == "PNG":
        bits = _png_chunk(path, b"sBIT")
        return bits[0] if bits and 1 <= bits[0] <= 16 else None
    return None


def _png_chunk(path: Path, name: bytes) -> bytes | None:
    """The data of the first chunk ``name`` before the pixel data of a PNG file, or None."""
    with path.open("rb") as handle:
        handle.read(8)  # the signature
        while header := handle.read(8):
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            if kind in (b"IDAT", b"IEND"):
                return None
            data = handle.read(length)
            handle.read(4)  # CRC
            if kind == name:
                return data
    return None


def _read_mask(path: Path) -> np.ndarray:
    """Decode a mask as a bool array (H, W) by :data:`MASK_RULE`."""
    try:
        with Image.open(path) as picture:
            picture.load()
            values = _mask_values(picture)
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read mask {path}: {exc}") from exc
    top = values.max() if values.size else 0
    value_range = next((r for r in MASK_RANGES if top <= r), None)
    if value_range is None:
        raise DatasetError(f"mask {path} holds values up to {top}, above the 16-bit range")
    return np.ascontiguousarray(values > value_range / 2)


def _mask_values(picture: Image.Image) -> np.ndarray:
    """One value per pixel (H, W): grey as it is, colour's brightest channel, alpha as MASK_RULE says."""
    if picture.mode == "1":
        return np.asarray(picture, dtype=np.uint8)
    if picture.mode in ("P", "PA"):
        has_alpha = picture.mode == "PA" or "transparency" in picture.info
        picture = picture.convert("RGBA" if has_alpha else "RGB")
    elif picture.mode not in ("L", "LA", "RGB", "RGBA", "I", "F") and not picture.mode.startswith("I;16"):
        picture = picture.convert("RGB")
    values = np.asarray(picture)
    if values.ndim == 2:
        return values
    if picture.mode not in ("LA", "RGBA"):
        return values.max(axis=2)
    colour, alpha = values[..., :-1], values[..., -1]
    if _uniform(colour) and not _uniform(alpha):
        return alpha  # the mask is drawn in the alpha channel
    return colour.max(axis=2) * (alpha / 255.0)  # what shows over black


def _uniform(values: np.ndarray) -> bool:
    flat = values.reshape(-1, values.shape[-1]) if values.ndim == 3 else values.reshape(-1)
    return bool((flat == flat[0]).all())
