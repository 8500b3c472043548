"""Synthetic language-guided data: the notes and the masks must agree, and the note must matter."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reclmis.data import ZONES, LViTDataset, describe_zones, make_synthetic, read_notes, zone_boxes

ZONE_PATTERN = re.compile(r"(upper|middle|lower) (left|right) lung")


def named_zones(note: str) -> set[str]:
    return {f"{third} {side}" for third, side in ZONE_PATTERN.findall(note)}


def load(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The picture in [0, 1], the mask of the named lesions and the mask of all lesions."""
    image = np.asarray(Image.open(folder / "img" / name), dtype=np.float32) / 255
    mask = np.asarray(Image.open(folder / "labelcol" / f"mask_{name}")) > 0
    lesions = np.asarray(Image.open(folder / "lesioncol" / f"mask_{name}")) > 0
    return image, mask, lesions


def zones_of(mask: np.ndarray) -> set[str]:
    return {zone for zone, (t, b, l, r) in zone_boxes(mask.shape[0]).items() if mask[t:b, l:r].any()}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic(
        tmp_path_factory.mktemp("synthetic"), size=64, n_train=12, n_val=4, n_test=16, seed=3
    )


def test_layout_and_counts(synthetic):
    for split, n in (("Train", 12), ("Val", 4), ("Test", 16)):
        folder = synthetic / f"{split}_Folder"
        images = sorted(p.name for p in (folder / "img").iterdir())
        assert len(images) == n
        for sub in ("labelcol", "lesioncol"):
            assert sorted(p.name for p in (folder / sub).iterdir()) == [f"mask_{name}" for name in images]
        assert sorted(read_notes(folder / f"{split}_text.xlsx")) == [f"mask_{name}" for name in images]
        with Image.open(folder / "img" / images[0]) as picture:
            assert picture.mode == "L" and picture.size == (64, 64)
    counterfactual = LViTDataset(synthetic / "counterfactual", "test", image_size=64)
    assert counterfactual.names == LViTDataset(synthetic, "test", image_size=64).names


def test_masks_cover_exactly_the_named_lesions(synthetic):
    boxes = zone_boxes(64)
    brightness = {"named": [], "unnamed": []}
    for split in ("Train", "Val", "Test"):
        folder = synthetic / f"{split}_Folder"
        for key, note in read_notes(folder / f"{split}_text.xlsx").items():
            image, mask, lesions = load(folder, key.removeprefix("mask_"))
            named = named_zones(note)
            inside = np.zeros_like(mask)
            for zone in named:
                top, bottom, left, right = boxes[zone]
                inside[top:bottom, left:right] = True
            assert not (mask & ~inside).any(), (key, note)  # mask pixels only in the named zones
            assert zones_of(mask) == named, (key, note)  # and in every one of them
            assert not (mask & ~lesions).any()  # the mask is made of lesions
            assert named < zones_of(lesions), (key, note)  # the note names a strict subset of them
            assert np.array_equal(lesions & inside, mask)  # and the whole of each named lesion
            # lesions are bright on the dark lung
            lung = np.percentile(image[inside & ~lesions], 25)
            unnamed = lesions & ~mask
            assert image[mask].mean() > lung + 0.15 and image[unnamed].mean() > lung + 0.15
            brightness["named"].append(image[mask].mean())
            brightness["unnamed"].append(image[unnamed].mean())
    # named and unnamed lesions look alike: only the note tells them apart
    assert abs(np.mean(brightness["named"]) - np.mean(brightness["unnamed"])) < 0.05


def test_note_wording_matches_the_named_zones(synthetic):
    counts = {"one": 1, "two": 2, "three": 3}
    wordings = set()
    for key, note in read_notes(synthetic / "Train_Folder" / "Train_text.xlsx").items():
        zones = named_zones(note)
        sides = {zone.split()[1] for zone in zones}
        if note.split()[0] in ("Bilateral", "Unilateral"):
            assert note.startswith("Bilateral" if len(sides) == 2 else "Unilateral"), (key, note)
        number = re.search(r"\b(one|two|three)\b", note.lower())
        if number:
            assert counts[number.group(1)] == len(zones), (key, note)
        wordings.add(ZONE_PATTERN.sub("Z", note).split(",")[0].split(" in the ")[0])
    assert len(wordings) >= 3


def test_counterfactual_names_other_lesions_of_the_same_images(synthetic):
    test, counterfactual = synthetic / "Test_Folder", synthetic / "counterfactual" / "Test_Folder"
    notes = read_notes(test / "Test_text.xlsx")
    other_notes = read_notes(counterfactual / "Test_text.xlsx")
    assert sorted(notes) == sorted(other_notes)
    for key in notes:
        name = key.removeprefix("mask_")
        assert (test / "img" / name).read_bytes() == (counterfactual / "img" / name).read_bytes()
        _, mask, lesions = load(test, name)
        _, other_mask, other_lesions = load(counterfactual, name)
        zones, other_zones = named_zones(notes[key]), named_zones(other_notes[key])
        assert np.array_equal(lesions, other_lesions)
        assert other_zones and other_zones != zones and other_zones < zones_of(lesions)
        assert zones_of(other_mask) == other_zones and not (other_mask & ~lesions).any()
        assert not np.array_equal(mask, other_mask)
        for zone, (top, bottom, left, right) in zone_boxes(64).items():
            if zone in zones and zone in other_zones:  # a lesion named by both keeps its outline
                assert np.array_equal(mask[top:bottom, left:right], other_mask[top:bottom, left:right])


def test_deterministic_for_a_seed_and_split_streams_are_independent(tmp_path):
    first = make_synthetic(tmp_path / "a", size=32, n_train=6, n_val=2, n_test=3, seed=7)
    again = make_synthetic(tmp_path / "b", size=32, n_train=6, n_val=5, n_test=3, seed=7)
    other = make_synthetic(tmp_path / "c", size=32, n_train=6, n_val=2, n_test=3, seed=8)
    for folder in ("Train_Folder", "Test_Folder", "counterfactual/Test_Folder"):
        for sub in ("img", "labelcol", "lesioncol"):
            for path in sorted((first / folder / sub).iterdir()):
                assert path.read_bytes() == (again / folder / sub / path.name).read_bytes()
    assert read_notes(first / "Train_Folder" / "Train_text.xlsx") == read_notes(
        again / "Train_Folder" / "Train_text.xlsx"
    )
    name = "img/train_0000.png"
    assert (first / "Train_Folder" / name).read_bytes() != (other / "Train_Folder" / name).read_bytes()


def test_default_sizes(tmp_path):
    out = make_synthetic(tmp_path)
    assert [len(LViTDataset(out, split, image_size=64)) for split in ("train", "val", "test")] == [
        400,
        64,
        100,
    ]
    assert len(LViTDataset(out / "counterfactual", "test", image_size=64)) == 100


def test_existing_output_needs_overwrite(tmp_path):
    make_synthetic(tmp_path, size=32, n_train=2, n_val=1, n_test=1)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_synthetic(tmp_path, size=32, n_train=2, n_val=1, n_test=1)
    make_synthetic(tmp_path, size=32, n_train=3, n_val=1, n_test=1, overwrite=True)
    assert len(LViTDataset(tmp_path, "train", image_size=32)) == 3


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"size": 16}, "size"), ({"n_train": 0}, "n_train"), ({"n_test": 2.5}, "n_test")],
)
def test_bad_arguments(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic(tmp_path, **arguments)


def test_describe_zones():
    rng = np.random.default_rng(0)
    for _ in range(20):
        note = describe_zones(["lower right", "upper left"], rng)
        assert named_zones(note) == {"lower right", "upper left"}
        assert "upper left lung and lower right lung" in note
    with pytest.raises(ValueError, match="zones"):
        describe_zones([], rng)
    with pytest.raises(ValueError, match="zones"):
        describe_zones(["upper centre"], rng)
    assert len(ZONES) == 6
