"""LViT-layout datasets and training augmentation."""

from __future__ import annotations

import contextlib
import csv
import os
import warnings
from pathlib import Path

import numpy as np
import openpyxl
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from reclmis.data import (
    DatasetError,
    DatasetWarning,
    LViTDataset,
    TrainAugmentation,
    find_notes_file,
    load_image,
    make_synthetic,
    read_notes,
)
from reclmis.data.note_probe import probe_notes
from reclmis.data.transforms import gaussian_blur, hsv_to_rgb, resize_mask, rgb_to_hsv, rotate

MONUSEG = Path(
    os.environ.get(
        "RECLMIS_MONUSEG", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "monuseg"
    )
)
needs_monuseg = pytest.mark.skipif(
    not MONUSEG.is_dir(), reason=f"MoNuSeg copy not found at {MONUSEG} (set RECLMIS_MONUSEG to its folder)"
)


def write_notes(
    path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("Image", "Description")
) -> None:
    if path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            csv.writer(handle).writerows([header, *rows])
        return
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    for row in [header, *rows]:
        sheet.append(list(row))
    workbook.save(path)


def make_split(
    root: Path,
    split: str = "Train",
    n: int = 3,
    *,
    qata: bool = False,
    notes: str = "xlsx",
    image_ext: str = ".png",
    grey: bool = False,
    size: int = 20,
) -> list[str]:
    """A small hand-made split: image i is a gradient, its mask the square [4, 12) x [4 + i, 12 + i)."""
    folder = root / f"{split}_Folder"
    (folder / "img").mkdir(parents=True)
    (folder / "labelcol").mkdir()
    rows, names = [], []
    for i in range(n):
        stem = f"case{i}"
        values = np.add.outer(np.arange(size), np.arange(size)) * (255 // (2 * size)) + 10 * i
        rgb = np.stack([values, values[::-1], values.T], axis=2).astype(np.uint8)
        Image.fromarray(rgb[..., 0] if grey else rgb).save(folder / "img" / f"{stem}{image_ext}")
        mask = np.zeros((size, size), np.uint8)
        mask[4:12, 4 + i : 12 + i] = 255
        mask_name = f"mask_{stem}.png" if qata else f"{stem}.png"
        Image.fromarray(mask).save(folder / "labelcol" / mask_name)
        rows.append((mask_name, f"note {i} for {stem}"))
        names.append(f"{stem}{image_ext}")
    write_notes(folder / f"{split}_text.{notes}", rows)
    return names


# ---------------------------------------------------------------- the real MoNuSeg copy


@needs_monuseg
def test_monuseg_splits_read_from_xlsx_with_tif_test_images():
    lengths = {"train": 24, "val": 6, "test": 14}
    for split, n in lengths.items():
        dataset = LViTDataset(MONUSEG, split, image_size=64, cache=False)
        assert len(dataset) == n
        assert dataset.notes_file.suffix == ".xlsx"
        assert dataset.notes_file.parent == MONUSEG / f"{split.capitalize()}_Folder"
        assert all(text.strip() for text in dataset.texts)
    test = LViTDataset(MONUSEG, "test", image_size=64, cache=False)
    assert {Path(name).suffix for name in test.names} == {".tif"}
    assert {s.mask_path.suffix for s in test.samples} == {".png"}


@needs_monuseg
def test_monuseg_items_have_the_contract_shapes_and_values():
    dataset = LViTDataset(MONUSEG, "test", image_size=64)
    notes = read_notes(MONUSEG / "Test_Folder" / "Test_text.xlsx")
    for index in (0, len(dataset) - 1):
        item = dataset[index]
        sample = dataset.samples[index]
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, 64, 64) and item["mask"].dtype == torch.float32
        assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
        assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
        assert item["name"] == sample.image_path.name and item["name"].endswith(".tif")
        assert item["text"] == notes[sample.mask_path.name]
        with Image.open(sample.image_path) as original:
            expected = np.asarray(original.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(
            item["image"].permute(1, 2, 0).numpy() * 255, expected.astype(np.float32)
        )
        with Image.open(sample.mask_path) as original_mask:
            full_fraction = (np.asarray(original_mask) > 0).mean()
        assert abs(item["mask"].mean().item() - full_fraction) < 0.05


# ---------------------------------------------------------------- generated and hand-made folders


def test_generated_folders_in_qata_naming(tmp_path):
    make_synthetic(tmp_path, size=32, n_train=5, n_val=3, n_test=4, seed=1)
    for split, n in (("train", 5), ("val", 3), ("test", 4)):
        dataset = LViTDataset(tmp_path, split, image_size=32)
        assert len(dataset) == n
        notes = read_notes(dataset.notes_file)
        for index, sample in enumerate(dataset.samples):
            assert sample.mask_path.name == "mask_" + sample.image_path.name
            item = dataset[index]
            assert item["text"] == notes[sample.mask_path.name]
            assert torch.equal(item["image"][0], item["image"][1]) and torch.equal(
                item["image"][0], item["image"][2]
            )
            assert item["mask"].sum() > 0


def test_plain_naming_csv_notes_grey_and_binarised_masks(tmp_path):
    names = make_split(tmp_path, "Val", notes="csv", grey=True, image_ext=".jpg")
    mask_path = tmp_path / "Val_Folder" / "labelcol" / "case1.png"
    soft = np.zeros((20, 20), np.uint8)
    soft[2, 3], soft[5, 6] = 127, 128  # foreground above half the 8-bit range
    Image.fromarray(soft).save(mask_path)
    dataset = LViTDataset(tmp_path, "val", image_size=20, cache=False)
    assert dataset.names == names
    item = dataset[1]
    assert item["image"].shape == (3, 20, 20)
    assert torch.equal(item["image"][0], item["image"][2])
    assert item["mask"].sum() == 1 and item["mask"][0, 5, 6] == 1
    assert item["text"] == "note 1 for case1"


def test_tif_images_and_masks_keyed_by_the_png_mask_name(tmp_path):
    make_split(tmp_path, "Test", image_ext=".tif")
    labelcol = tmp_path / "Test_Folder" / "labelcol"
    for path in sorted(labelcol.iterdir()):
        Image.open(path).save(path.with_suffix(".tiff"))
        path.unlink()
    dataset = LViTDataset(tmp_path, "test", image_size=16)
    assert dataset.names == ["case0.tif", "case1.tif", "case2.tif"]
    assert [s.mask_path.name for s in dataset.samples] == ["case0.tiff", "case1.tiff", "case2.tiff"]
    assert dataset.texts == ["note 0 for case0", "note 1 for case1", "note 2 for case2"]
    assert dataset[2]["mask"].sum() > 0


def test_load_image_matches_the_dataset_and_names_bad_files(tmp_path):
    make_split(tmp_path, grey=True)
    dataset = LViTDataset(tmp_path, "train", image_size=12)
    image = load_image(dataset.samples[1].image_path, 12)
    assert torch.equal(image, dataset[1]["image"]) and image.shape == (3, 12, 12)
    with pytest.raises(DatasetError, match=r"cannot read image .*absent\.png"):
        load_image(tmp_path / "absent.png", 12)


def test_masks_resize_nearest_and_stay_binary(tmp_path):
    make_split(tmp_path, n=1, size=40)
    mask = np.zeros((40, 40), np.uint8)
    mask[4:12, 4:12] = 255
    mask[21, 33] = mask[35, 7] = 255  # single pixels survive nearest sampling (source pixel 2i + 1)
    Image.fromarray(mask).save(tmp_path / "Train_Folder" / "labelcol" / "case0.png")
    item = LViTDataset(tmp_path, "train", image_size=20)[0]
    expected = torch.zeros(1, 20, 20)
    expected[0, 2:6, 2:6] = 1
    expected[0, 10, 16] = expected[0, 17, 3] = 1
    assert torch.equal(item["mask"], expected)


def test_masks_resize_bilinear_then_above_zero_as_the_official_loader(tmp_path):
    """cv2.resize (bilinear, half-pixel centres) of the 0/255 mask, then > 0: shrinking 40 -> 20, output
    pixel i blends source pixels 2i and 2i + 1 equally, so a single pixel survives wherever it lies."""
    make_split(tmp_path, n=1, size=40)
    mask = np.zeros((40, 40), np.uint8)
    mask[4:12, 4:12] = 255
    mask[21, 33] = mask[20, 6] = 255  # odd and even coordinates; nearest sampling keeps only the first
    Image.fromarray(mask).save(tmp_path / "Train_Folder" / "labelcol" / "case0.png")
    expected = torch.zeros(1, 20, 20)
    expected[0, 2:6, 2:6] = 1
    expected[0, 10, 16] = 1
    nearest = LViTDataset(tmp_path, "train", image_size=20)[0]["mask"]
    assert torch.equal(nearest, expected)
    expected[0, 10, 3] = 1
    bilinear = LViTDataset(tmp_path, "train", image_size=20, mask_resize="bilinear")[0]["mask"]
    assert torch.equal(bilinear, expected)
    with pytest.raises(ValueError, match="mask_resize"):
        LViTDataset(tmp_path, "train", image_size=20, mask_resize="area")


def test_bilinear_mask_upscaling_dilates_by_the_bilinear_footprint():
    """4 -> 8: output row y samples source row y / 2 - 1/4 (clamped at 0), so source pixel (1, 1) reaches
    output rows and columns 1..4 with weights 1/16 to 9/16 (all above the 8-bit threshold 1/510); nearest
    sampling gives the 2 x 2 block 2..3."""
    source = torch.zeros(4, 4, dtype=torch.bool)
    source[1, 1] = True
    bilinear = torch.zeros(8, 8, dtype=torch.bool)
    bilinear[1:5, 1:5] = True
    nearest = torch.zeros(8, 8, dtype=torch.bool)
    nearest[2:4, 2:4] = True
    assert torch.equal(resize_mask(source, 8, "bilinear"), bilinear)
    assert torch.equal(resize_mask(source, 8, "nearest"), nearest)
    assert torch.equal(resize_mask(source, 4, "bilinear"), source)  # same size: untouched
    # no antialiasing (cv2's INTER_LINEAR): shrinking 1000 -> 2, output (0, 0) samples source
    # (249.5, 249.5) and never sees pixel (0, 0)
    big = torch.zeros(1000, 1000, dtype=torch.bool)
    big[0, 0] = True
    assert not resize_mask(big, 2, "bilinear").any()
    with pytest.raises(ValueError, match="bool CPU tensor"):
        resize_mask(source.float(), 8)


def test_shared_train_val_notes_in_the_root_serve_train_and_val(tmp_path):
    for split in ("Train", "Val"):
        make_split(tmp_path, split, qata=True)
        (tmp_path / f"{split}_Folder" / f"{split}_text.xlsx").unlink()
    write_notes(tmp_path / "Train_Val_text.xlsx", [(f"mask_case{i}.png", f"shared {i}") for i in range(3)])
    for split in ("train", "val"):
        dataset = LViTDataset(tmp_path, split, image_size=16)
        assert dataset.notes_file == tmp_path / "Train_Val_text.xlsx"
        assert dataset.texts == ["shared 0", "shared 1", "shared 2"]
    make_split(tmp_path, "Test")
    with pytest.raises(DatasetError, match="Test_text"):
        find_notes_file(tmp_path / "nowhere", "test")


def test_cache_and_preload_give_the_same_items(tmp_path):
    make_split(tmp_path)
    cached = LViTDataset(tmp_path, "train", image_size=16, cache=True)
    cached.preload()
    plain = LViTDataset(tmp_path, "train", image_size=16, cache=False)
    for index in range(len(plain)):
        assert torch.equal(cached[index]["image"], plain[index]["image"])
        assert torch.equal(cached[index]["mask"], plain[index]["mask"])
    with pytest.raises(ValueError, match="cache=True"):
        plain.preload()


# ---------------------------------------------------------------- broken inputs


def test_missing_mask_names_the_image(tmp_path):
    make_split(tmp_path)
    (tmp_path / "Train_Folder" / "labelcol" / "case1.png").unlink()
    with pytest.raises(DatasetError, match=r"no mask for image .*case1\.png"):
        LViTDataset(tmp_path, "train", image_size=16)


def test_unreadable_image_names_the_file(tmp_path):
    make_split(tmp_path)
    (tmp_path / "Train_Folder" / "img" / "case2.png").write_bytes(b"not a picture")
    with pytest.raises(DatasetError, match=r"cannot read image .*case2\.png"):
        LViTDataset(tmp_path, "train", image_size=16)


def test_truncated_image_fails_when_decoded_and_names_the_file(tmp_path):
    make_split(tmp_path, size=64)
    path = tmp_path / "Train_Folder" / "img" / "case0.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header survives, the pixel data does not
    dataset = LViTDataset(tmp_path, "train", image_size=16)
    with pytest.raises(DatasetError, match=r"cannot read image .*case0\.png"):
        dataset[0]


def test_unreadable_mask_names_the_file(tmp_path):
    make_split(tmp_path)
    (tmp_path / "Train_Folder" / "labelcol" / "case0.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"cannot read mask .*case0\.png"):
        LViTDataset(tmp_path, "train", image_size=16)


def test_missing_note_names_the_mask(tmp_path):
    make_split(tmp_path, qata=True)
    notes = tmp_path / "Train_Folder" / "Train_text.xlsx"
    write_notes(notes, [("mask_case0.png", "a"), ("mask_case2.png", "c")])
    with pytest.raises(DatasetError, match=r"no note for mask 'mask_case1\.png'"):
        LViTDataset(tmp_path, "train", image_size=16)


def test_missing_notes_file_names_the_places_searched(tmp_path):
    make_split(tmp_path, "Test")
    (tmp_path / "Test_Folder" / "Test_text.xlsx").unlink()
    with pytest.raises(DatasetError, match=r"no notes file for split 'test'.*Test_text\.xlsx"):
        LViTDataset(tmp_path, "test", image_size=16)


def test_missing_split_folder_names_the_folder(tmp_path):
    make_split(tmp_path, "Train")
    with pytest.raises(DatasetError, match=r"split folder .*Val_Folder does not exist"):
        LViTDataset(tmp_path, "val", image_size=16)
    write_notes(tmp_path / "Test_text.xlsx", [("case0.png", "a")])  # notes alone do not make a split
    with pytest.raises(DatasetError, match=r"split folder .*Test_Folder does not exist"):
        LViTDataset(tmp_path, "test", image_size=16)


def test_missing_labelcol_folder_names_the_folder(tmp_path):
    make_split(tmp_path)
    for path in (tmp_path / "Train_Folder" / "labelcol").iterdir():
        path.unlink()
    (tmp_path / "Train_Folder" / "labelcol").rmdir()
    with pytest.raises(DatasetError, match=r"folder .*labelcol does not exist"):
        LViTDataset(tmp_path, "train", image_size=16)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("orphan_mask", r"masks without an image .*case9\.png"),
        ("two_masks", r"case0\.png matches several masks"),
        ("size_mismatch", r"case1\.png is 20x20 but its mask .* is 10x10"),
        ("stray_file", r"notes\.txt is not an image file"),
        ("no_description_column", r"needs the columns 'Image' and 'Description'"),
        ("empty_note", r"row 3: empty 'Description' cell"),
        ("conflicting_notes", r"row 5: 'case0\.png' is listed twice"),
        ("no_images", r"holds no images"),
    ],
)
def test_inconsistent_folders_raise_named_errors(tmp_path, breakage, message):
    make_split(tmp_path)
    folder = tmp_path / "Train_Folder"
    notes = folder / "Train_text.xlsx"
    rows = [(f"case{i}.png", f"note {i}") for i in range(3)]
    if breakage == "orphan_mask":
        Image.fromarray(np.zeros((20, 20), np.uint8)).save(folder / "labelcol" / "case9.png")
    elif breakage == "two_masks":
        Image.fromarray(np.zeros((20, 20), np.uint8)).save(folder / "labelcol" / "mask_case0.png")
    elif breakage == "size_mismatch":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "labelcol" / "case1.png")
    elif breakage == "stray_file":
        (folder / "img" / "notes.txt").write_text("x")
    elif breakage == "no_description_column":
        write_notes(notes, rows, header=("Image", "Text"))
    elif breakage == "empty_note":
        write_notes(notes, [rows[0], ("case1.png", "  "), rows[2]])
    elif breakage == "conflicting_notes":
        write_notes(notes, [*rows, ("case0.png", "another note")])
    elif breakage == "no_images":
        for path in [*folder.glob("img/*"), *folder.glob("labelcol/*")]:
            path.unlink()
    with pytest.raises(DatasetError, match=message):
        LViTDataset(tmp_path, "train", image_size=16)


def test_bad_arguments_raise(tmp_path):
    make_split(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        LViTDataset(tmp_path, "validation", image_size=16)
    with pytest.raises(ValueError, match="image_size"):
        LViTDataset(tmp_path, "train", image_size=0)


# ---------------------------------------------------------------- mask encodings and bit depths


@contextlib.contextmanager
def warnings_as_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def encode_mask(foreground: np.ndarray, encoding: str, path: Path) -> Path:
    """Write the bool mask ``foreground`` as an annotation tool would; returns the file written."""
    rng = np.random.default_rng(0)
    fg = foreground.astype(np.uint8)
    if encoding == "grey 0/255":
        Image.fromarray(fg * 255).save(path)
    elif encoding == "background 3, foreground 255":
        Image.fromarray(np.where(foreground, 255, 3).astype(np.uint8)).save(path)
    elif encoding == "jpeg 0/255":
        path = path.with_suffix(".jpg")
        Image.fromarray(fg * 255).save(path, quality=75)
    elif encoding == "grey 0/1":
        Image.fromarray(fg).save(path)
    elif encoding == "grey 0/128":
        Image.fromarray(fg * 128).save(path)
    elif encoding == "soft map":  # probabilities above 0.5 in the foreground, below in the background
        high, low = rng.uniform(0.55, 1.0, fg.shape), rng.uniform(0.0, 0.45, fg.shape)
        Image.fromarray(np.round(255 * np.where(foreground, high, low)).astype(np.uint8)).save(path)
    elif encoding == "bilevel":
        Image.fromarray(foreground).convert("1").save(path)
    elif encoding in ("16-bit 0/65535", "16-bit 0/1", "16-bit 0/255"):
        top = int(encoding.split("/")[1])
        Image.fromarray(fg.astype(np.uint16) * top).save(path)
    elif encoding == "float probabilities":
        path = path.with_suffix(".tif")
        Image.fromarray(np.where(foreground, 0.9, 0.1).astype(np.float32)).save(path)
    elif encoding == "palette":  # index 1 is VOC's first class colour (128, 0, 0)
        picture = Image.fromarray(fg, mode="L").convert("P")
        picture.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
        picture.save(path)
    elif encoding == "palette, background transparent":
        picture = Image.fromarray(fg, mode="L").convert("P")
        picture.putpalette([255, 255, 255, 255, 255, 255] + [0] * 762)
        picture.save(path, transparency=0)
    elif encoding == "RGB red on black":
        Image.fromarray(np.stack([fg * 255, fg * 0, fg * 0], axis=2)).save(path)
    elif encoding == "RGBA white, mask in alpha":
        Image.fromarray(np.dstack([np.full((*fg.shape, 3), 255, np.uint8), fg * 255])).save(path)
    elif encoding == "RGBA black, mask in alpha":
        Image.fromarray(np.dstack([np.zeros((*fg.shape, 3), np.uint8), fg * 255])).save(path)
    elif encoding == "RGBA white on transparent black":
        Image.fromarray(np.dstack([np.repeat(fg[..., None] * 255, 3, axis=2), fg * 255])).save(path)
    elif encoding == "RGBA red on transparent white":
        colour = np.where(foreground[..., None], [255, 0, 0], [255, 255, 255]).astype(np.uint8)
        Image.fromarray(np.dstack([colour, fg * 255])).save(path)
    elif encoding == "RGBA opaque white on black":
        Image.fromarray(
            np.dstack([np.repeat(fg[..., None] * 255, 3, axis=2), np.full(fg.shape, 255, np.uint8)])
        ).save(path)
    elif encoding == "grey and alpha, mask in alpha":
        Image.fromarray(np.dstack([np.full(fg.shape, 255, np.uint8), fg * 255]), mode="LA").save(path)
    else:
        raise AssertionError(encoding)
    return path


MASK_ENCODINGS = [
    "grey 0/255",
    "background 3, foreground 255",
    "jpeg 0/255",
    "grey 0/1",
    "grey 0/128",
    "soft map",
    "bilevel",
    "16-bit 0/65535",
    "16-bit 0/1",
    "16-bit 0/255",
    "float probabilities",
    "palette",
    "palette, background transparent",
    "RGB red on black",
    "RGBA white, mask in alpha",
    "RGBA black, mask in alpha",
    "RGBA white on transparent black",
    "RGBA red on transparent white",
    "RGBA opaque white on black",
    "grey and alpha, mask in alpha",
]


@pytest.mark.parametrize("encoding", MASK_ENCODINGS)
def test_masks_read_in_every_encoding_give_the_drawn_foreground(tmp_path, encoding):
    make_split(tmp_path, n=2)
    labelcol = tmp_path / "Train_Folder" / "labelcol"
    clean = LViTDataset(tmp_path, "train", image_size=20, cache=False)[1]["mask"]
    assert clean.sum() == 64
    foreground = np.zeros((20, 20), bool)
    foreground[4:12, 5:13] = True
    (labelcol / "case1.png").unlink()
    written = encode_mask(foreground, encoding, labelcol / "case1.png")
    if written.suffix != ".png":  # the notes name the mask; the reader also finds it under "<stem>.png"
        assert written.stem == "case1"
    item = LViTDataset(tmp_path, "train", image_size=20, cache=False)[1]
    assert torch.equal(item["mask"], clean), encoding


def test_uniform_masks_get_one_warning_naming_them(tmp_path):
    make_split(tmp_path, n=4)
    with warnings_as_errors():
        LViTDataset(tmp_path, "train", image_size=20).check_masks()  # clean masks: no warning
    labelcol = tmp_path / "Train_Folder" / "labelcol"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(labelcol / "case0.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(labelcol / "case2.png")
    Image.fromarray(np.full((20, 20), 255, np.uint8)).save(labelcol / "case3.png")
    dataset = LViTDataset(tmp_path, "train", image_size=10)
    with pytest.warns(DatasetWarning) as caught:
        empty, full = dataset.check_masks()
    assert (empty, full) == (["case0.png", "case2.png"], ["case3.png"])
    (message,) = [str(w.message) for w in caught]
    assert "2 of 4 masks are entirely background (case0.png, case2.png)" in message
    assert "1 of 4 masks are entirely foreground (case3.png)" in message and "at 10x10" in message
    # at the model's size: a single pixel vanishes when nearest resizing skips it
    Image.fromarray(np.pad(np.full((1, 1), 255, np.uint8), ((0, 19), (0, 19)))).save(labelcol / "case0.png")
    with pytest.warns(DatasetWarning, match="1 of 4 masks are entirely background"):
        assert LViTDataset(tmp_path, "train", image_size=20).check_masks()[0] == ["case2.png"]
    with pytest.warns(DatasetWarning, match="2 of 4 masks are entirely background"):
        assert LViTDataset(tmp_path, "train", image_size=10).check_masks()[0] == ["case0.png", "case2.png"]


def write_16bit(path: Path, values: np.ndarray, significant_bits: int | None = None) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = None
    if significant_bits is not None:
        info = PngInfo()
        info.add(b"sBIT", bytes([significant_bits]))
    Image.fromarray(values.astype(np.uint16)).save(path, pnginfo=info)


def test_16_bit_images_are_scaled_by_their_bit_depth(tmp_path):
    """12-bit data in a 16-bit PNG: scaled by 4095 as its sBIT chunk says, or, without one, by the smallest
    even bit depth that holds its values with a warning; a full-range image by 65535, silently."""
    ramp = np.linspace(0, 4095, 16 * 16).round().reshape(16, 16)
    expected = torch.from_numpy(np.round(ramp / 4095 * 255)).float() / 255
    stated, guessed, full = (
        tmp_path / "stated" / "a.png",
        tmp_path / "guessed" / "a.png",
        tmp_path / "full.png",
    )
    for path in (stated, guessed):
        path.parent.mkdir()
    write_16bit(stated, ramp, significant_bits=12)
    write_16bit(guessed, ramp)
    write_16bit(full, ramp * 16)
    with warnings_as_errors():
        image = load_image(stated, 16)
    torch.testing.assert_close(image[0], expected, rtol=0, atol=0)
    with pytest.warns(
        DatasetWarning, match=r"a\.png: a 16-bit image whose values reach 4095, read as 12-bit"
    ):
        image = load_image(guessed, 16)
    torch.testing.assert_close(image[0], expected, rtol=0, atol=0)
    with warnings_as_errors():
        image = load_image(full, 16)
    torch.testing.assert_close(image[0], torch.from_numpy(np.round(ramp * 16 / 65535 * 255)).float() / 255)
    assert image.max() > 0.99


def test_an_image_beside_another_of_the_same_name_is_an_error_naming_both(tmp_path):
    make_split(tmp_path)
    image = tmp_path / "Train_Folder" / "img" / "case1.png"
    Image.open(image).save(image.with_suffix(".jpg"))
    with pytest.raises(DatasetError, match=r"images .*case1\.jpg and .*case1\.png share the name 'case1'"):
        LViTDataset(tmp_path, "train", image_size=16)


# ---------------------------------------------------------------- augmentation


def smooth_image(seed: int, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]


def test_geometric_augmentation_moves_image_and_mask_together():
    augment = TrainAugmentation(photometric=False, interpolation="nearest")
    dihedral, other = 0, 0
    for seed in range(40):
        image = smooth_image(seed)
        mask = (image[:1] > 0.5).float()
        out_image, out_mask, _ = augment(image, mask, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out_mask, (out_image[:1] > 0.5).float())
        moves = [torch.rot90(image, k, dims=(1, 2)) for k in range(4)]
        if any(torch.equal(out_image, m) or torch.equal(out_image, m.flip(2)) for m in moves):
            dihedral += 1
        else:
            other += 1
    assert dihedral > 5 and other > 5  # both rot90/flip (or identity) and free rotations occurred


def test_bilinear_rotation_stays_aligned_up_to_boundary_pixels():
    augment = TrainAugmentation(photometric=False, rot90_flip_prob=0.0, rotate_prob=1.0)
    for seed in range(10):
        image = smooth_image(seed, size=64)
        mask = (image[:1] > 0.5).float()
        out_image, out_mask, _ = augment(image, mask, generator=torch.Generator().manual_seed(seed))
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
        disagree = (out_mask != (out_image[:1] > 0.5).float()).float().mean().item()
        assert disagree < 0.02


def test_full_augmentation_is_seeded_binary_and_in_range():
    augment = TrainAugmentation()
    image, mask = smooth_image(0), (smooth_image(0)[:1] > 0.5).float()
    geometric_only = TrainAugmentation(photometric=False)
    changed = 0
    for seed in range(20):
        a = augment(image, mask, generator=torch.Generator().manual_seed(seed))
        b = augment(image, mask, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert a[0].shape == image.shape and a[0].dtype == torch.float32
        assert a[0].min() >= 0.0 and a[0].max() <= 1.0
        assert set(a[1].unique().tolist()) <= {0.0, 1.0}
        # geometry is drawn first: the mask moves as without the photometric steps
        assert torch.equal(
            a[1], geometric_only(image, mask, generator=torch.Generator().manual_seed(seed))[1]
        )
        changed += not torch.equal(
            a[0], geometric_only(image, mask, generator=torch.Generator().manual_seed(seed))[0]
        )
    assert changed > 10


def test_augmentation_uses_torch_global_rng_by_default():
    augment = TrainAugmentation()
    image, mask = smooth_image(1), (smooth_image(1)[:1] > 0.5).float()
    torch.manual_seed(5)
    first = [augment(image, mask) for _ in range(5)]
    torch.manual_seed(5)
    second = [augment(image, mask) for _ in range(5)]
    for (a_image, a_mask, _), (b_image, b_mask, _) in zip(first, second, strict=True):
        assert torch.equal(a_image, b_image) and torch.equal(a_mask, b_mask)


def test_augmented_loader_is_reproducible_with_workers(tmp_path):
    make_synthetic(tmp_path, size=32, n_train=8, n_val=1, n_test=1)
    dataset = LViTDataset(tmp_path, "train", image_size=32, augment=True)

    def epoch(seed: int) -> list[torch.Tensor]:
        loader = DataLoader(
            dataset, batch_size=4, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(seed)
        )
        return [torch.cat([batch["image"].flatten(), batch["mask"].flatten()]) for batch in loader]

    first, again, other = epoch(3), epoch(3), epoch(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def blob_region(mask: torch.Tensor) -> str:
    """ "upper left", "lower right", ... of a blob in a (1, S, S) mask, in the image frame."""
    rows, cols = mask[0].nonzero(as_tuple=True)
    half = (mask.shape[-1] - 1) / 2
    return f"{'upper' if rows.float().mean() < half else 'lower'} {'left' if cols.float().mean() < half else 'right'}"


def test_note_follows_flips_and_turns_in_the_image_frame():
    """Pathology tiles: every flip and quarter turn rewrites the region the note names."""
    augment = TrainAugmentation(photometric=False, rotate_prob=0.0, rot90_flip_prob=1.0, note_frame="image")
    image, mask = torch.zeros(3, 16, 16), torch.zeros(1, 16, 16)
    mask[:, 2:5, 10:14] = 1  # upper right
    image[:, 2:5, 10:14] = 1
    regions = set()
    for seed in range(30):
        out_image, out_mask, note = augment(
            image, mask, "The nuclei density in the upper right is high.", torch.Generator().manual_seed(seed)
        )
        assert torch.equal(out_mask[0], out_image[0])
        assert note == f"The nuclei density in the {blob_region(out_mask)} is high."
        regions.add(blob_region(out_mask))
    assert regions == {"upper left", "upper right", "lower left", "lower right"}


def test_lung_zone_note_keeps_its_orientation_under_quarter_turns():
    """Chest images: flips rewrite the lung zone; a quarter turn, which the words cannot say, is skipped."""
    augment = TrainAugmentation(
        photometric=False, rotate_prob=0.0, rot90_flip_prob=1.0, note_frame="radiological"
    )
    image, mask = torch.zeros(3, 16, 16), torch.zeros(1, 16, 16)
    mask[:, 2:5, 10:14] = 1  # image upper right = the patient's upper left
    image[:, 2:5, 10:14] = 1
    patient = {"upper right": "upper left", "upper left": "upper right", "lower right": "lower left"}
    patient["lower left"] = "lower right"
    skipped = 0
    for seed in range(30):
        out_image, out_mask, note = augment(
            image, mask, "Lesion in the upper left lung.", torch.Generator().manual_seed(seed)
        )
        assert note == f"Lesion in the {patient[blob_region(out_mask)]} lung."
        skipped += torch.equal(out_image, image)
    assert 0 < skipped < 30
    official = TrainAugmentation(photometric=False, rotate_prob=0.0, rot90_flip_prob=1.0)
    assert official(image, mask, "Lesion in the upper left lung.")[2] == "Lesion in the upper left lung."


def test_dataset_items_carry_the_rewritten_note(tmp_path):
    make_synthetic(tmp_path, size=32, n_train=4, n_val=1, n_test=1)
    flip = TrainAugmentation(
        photometric=False, rotate_prob=0.0, rot90_flip_prob=1.0, note_frame="radiological"
    )
    dataset = LViTDataset(tmp_path, "train", image_size=32, transform=flip)
    torch.manual_seed(0)
    items = [dataset[i % 4] for i in range(16)]
    changed = [item["text"] != dataset.texts[i % 4] for i, item in enumerate(items)]
    assert any(changed)  # some flips rewrote a note (every synthetic note names a lung zone)


def test_colour_and_blur_helpers():
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hsv_to_rgb(*rgb_to_hsv(image)), image, atol=1e-6, rtol=0)
    hue, saturation, value = rgb_to_hsv(torch.tensor([1.0, 0.5, 0.0]).view(3, 1, 1))
    torch.testing.assert_close(
        torch.stack([hue, saturation, value]).flatten(), torch.tensor([30 / 360, 1.0, 1.0])
    )
    channel = torch.zeros(9, 9)
    channel[4, 4] = 1.0
    blurred = gaussian_blur(channel, (1.0, 1.0))
    torch.testing.assert_close(blurred.sum(), torch.tensor(1.0))
    torch.testing.assert_close(blurred, blurred.T)
    assert blurred[4, 4] == blurred.max() and blurred[4, 4] < 0.2


def test_rotation_direction_and_identity():
    x = torch.zeros(1, 9, 9)
    x[0, 4, 8] = 1.0  # right of the centre
    assert torch.equal(rotate(x, 0.0, mode="nearest"), x)
    assert rotate(x, 90.0, mode="nearest")[0, 0, 4] == 1.0  # counter-clockwise: to the top


def test_augmentation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="blur_prob"):
        TrainAugmentation(blur_prob=1.5)
    with pytest.raises(ValueError, match="interpolation"):
        TrainAugmentation(interpolation="cubic")
    with pytest.raises(ValueError, match="mask must be"):
        TrainAugmentation()(torch.rand(3, 8, 8), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="note_frame"):
        TrainAugmentation(note_frame="patient")


def test_probe_notes_constant_and_shuffled() -> None:
    notes = ["a", "b", "b", "c", "d"]
    assert probe_notes(notes, "constant") == ["b"] * 5  # the most frequent note
    assert probe_notes(["x", "y"], "constant") == ["x", "x"]  # ties: the first in file order
    shuffled = probe_notes(notes, "shuffled")
    assert shuffled == probe_notes(notes, "shuffled")  # a fixed seed
    assert sorted(shuffled) == sorted(notes)  # the same notes, every one used once
    unique = [f"note {i}" for i in range(50)]
    for seed in range(5):  # a derangement: no image keeps its own note
        assert all(a != b for a, b in zip(unique, probe_notes(unique, "shuffled", seed), strict=True))
    with pytest.raises(ValueError, match="probe"):
        probe_notes(notes, "reversed")
    with pytest.raises(ValueError, match="two images"):
        probe_notes(["only"], "shuffled")
