"""Datasets in the LViT folder layout (QaTa-COV19, MosMedData+, MoNuSeg).

A dataset root holds one folder per split, each with images, binary masks and a notes table::

    <root>/Train_Folder/img/*.png          images (png, jpg, jpeg, tif, tiff; RGB or grey)
    <root>/Train_Folder/labelcol/*.png     masks, foreground = any value above 0
    <root>/Train_Folder/Train_text.xlsx    columns ``Image`` (the mask file name) and ``Description``
    <root>/Val_Folder/...                  likewise, notes in Val_text.xlsx
    <root>/Test_Folder/...                 likewise, notes in Test_text.xlsx

A mask is named like its image (MoNuSeg, MosMedData+; the extension may differ, e.g. ``img/X.tif`` with
``labelcol/X.png``) or carries QaTa's prefix (``labelcol/mask_X.png`` for ``img/X.png``). Notes may also be
``.csv`` files, may sit in the root instead of the split folder, and QaTa's shared ``Train_Val_text.xlsx``
serves the train and validation splits. Every inconsistency raises :class:`DatasetError` naming the file.
"""

from __future__ import annotations

import csv
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
    "SPLITS",
    "DatasetError",
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

JointTransform = Callable[[torch.Tensor, torch.Tensor, str], tuple[torch.Tensor, torch.Tensor, str]]


class DatasetError(ValueError):
    """A dataset folder is incomplete or inconsistent; the message names the file."""


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
    resized bicubic; ``mask`` is a float32 tensor (1, S, S) in {0, 1}, binarised (> 0) then resized by
    ``mask_resize`` ("nearest", or "bilinear" then > 0 as the official loader: see
    :func:`~reclmis.data.transforms.resize_mask`); ``text`` is the note; ``name`` the image file name.

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

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item decoded once, untransformed, as uint8 tensors: images (N, 3, S, S) and masks
        (N, 1, S, S) in {0, 1}. With ``cache`` the per-item cache then holds views of them (no second copy)."""
        size = self.image_size
        images = torch.empty(len(self), 3, size, size, dtype=torch.uint8)
        masks = torch.empty(len(self), 1, size, size, dtype=torch.uint8)
        for index in range(len(self)):
            image, mask = self._load(index)
            images[index], masks[index] = image, mask
            if self.cache:
                self._cache[index] = (images[index], masks[index])
        return images, masks

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
        foreground = torch.from_numpy(_read_mask(sample.mask_path))
        mask = resize_mask(foreground, self.image_size, self.mask_resize)
        item = (_image_tensor_u8(sample.image_path, self.image_size), mask[None].to(torch.uint8))
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
    """Decode an image as 8-bit RGB (grey replicated; 16-bit grey scaled to 8 bits)."""
    try:
        with Image.open(path) as picture:
            picture.load()
            if picture.mode.startswith("I;16"):
                values = np.asarray(picture, dtype=np.float64) / 65535.0 * 255.0
                return Image.fromarray(np.round(values).astype(np.uint8)).convert("RGB")
            if picture.mode in ("I", "F"):
                raise DatasetError(
                    f"image {path} has unsupported mode {picture.mode!r} (32-bit); save it as 8 or 16 bits"
                )
            return picture.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def _read_mask(path: Path) -> np.ndarray:
    """Decode a mask as a bool array (H, W): foreground is any value above 0 in any colour channel."""
    try:
        with Image.open(path) as picture:
            picture.load()
            if picture.mode in ("P", "PA", "RGBA", "LA", "CMYK"):
                picture = picture.convert("RGB")
            values = np.asarray(picture)
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read mask {path}: {exc}") from exc
    foreground = values > 0
    if foreground.ndim == 3:
        foreground = foreground.any(axis=2)
    return np.ascontiguousarray(foreground)
