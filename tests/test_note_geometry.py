"""Positional words of a note under flips and quarter turns (reclmis.data.note_geometry)."""

from __future__ import annotations

import pytest
import torch

from reclmis.data.note_geometry import SquareSymmetry, transform_note

FLIP_ROWS, FLIP_COLUMNS = SquareSymmetry.flip(1), SquareSymmetry.flip(2)
# the eight symmetries as the augmentation draws them: k quarter turns, then an optional flip
ALL = [(k, dim) for k in range(4) for dim in (None, 1, 2)]


def symmetry(k: int, dim: int | None) -> SquareSymmetry:
    turn = SquareSymmetry.rot90(k)
    return turn if dim is None else SquareSymmetry.flip(dim) @ turn


def apply_to_image(image: torch.Tensor, k: int, dim: int | None) -> torch.Tensor:
    image = torch.rot90(image, k, dims=(1, 2))
    return image if dim is None else image.flip(dim)


def region_of_blob(image: torch.Tensor) -> str:
    """The region ("upper left", "lower", ...) of the one bright blob of a (1, 8, 8) image, image frame."""
    rows, cols = image[0].nonzero(as_tuple=True)
    y, x = rows.float().mean() - 3.5, cols.float().mean() - 3.5
    vertical = "upper" if y < -1 else "lower" if y > 1 else ""
    side = "left" if x < -1 else "right" if x > 1 else ""
    return f"{vertical} {side}".strip()


BLOBS = {  # a 2x2 blob in each region of an 8x8 picture
    "upper left": (0, 0),
    "upper right": (0, 6),
    "lower left": (6, 0),
    "lower right": (6, 6),
    "upper": (0, 3),
    "lower": (6, 3),
    "left": (3, 0),
    "right": (3, 6),
}


@pytest.mark.parametrize(("k", "dim"), ALL)
@pytest.mark.parametrize("region", sorted(BLOBS))
def test_image_frame_region_follows_the_pixels(region, k, dim):
    """MoNuSeg's regions: the rewritten note names where torch's rot90 and flip moved the blob."""
    image = torch.zeros(1, 8, 8)
    top, left = BLOBS[region]
    image[0, top : top + 2, left : left + 2] = 1
    moved = region_of_blob(apply_to_image(image, k, dim))
    note = f"The nuclei density in the {region} is high."
    assert transform_note(note, symmetry(k, dim), "image") == f"The nuclei density in the {moved} is high."


@pytest.mark.parametrize(("k", "dim"), ALL)
def test_radiological_frame_names_the_patients_sides(k, dim):
    """Chest images: the patient's right lies on the image's left, so a region is mirrored into the
    image frame, moved, and mirrored back."""
    image = torch.zeros(1, 8, 8)
    image[0, 0:2, 0:2] = 1  # image upper left = patient's upper right
    image_region = region_of_blob(apply_to_image(image, k, dim))
    patient = " ".join({"left": "right", "right": "left"}.get(w, w) for w in image_region.split())
    assert transform_note("Opacity in the upper right.", symmetry(k, dim), "radiological") == (
        f"Opacity in the {patient}."
    )


@pytest.mark.parametrize("frame", ["image", "radiological"])
def test_lung_zones_under_flips(frame):
    note = "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."
    assert transform_note(note, FLIP_COLUMNS, frame) == (
        "Bilateral pulmonary infection, two infected areas, upper right lung and lower left lung."
    )
    assert transform_note(note, FLIP_ROWS, frame) == (
        "Bilateral pulmonary infection, two infected areas, lower left lung and upper right lung."
    )
    assert transform_note(note, SquareSymmetry.rot90(2), frame) == (
        "Bilateral pulmonary infection, two infected areas, lower right lung and upper left lung."
    )


def test_axial_frame_keeps_lobes_and_mirrors_sides():
    """Axial CT (MosMedData+): "upper"/"lower" name lobes along the body, so a flip of the slice's rows
    keeps them; sides are the patient's; a quarter turn of a note with positions is refused."""
    note = "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."
    assert transform_note(note, FLIP_ROWS, "axial") == note
    flipped = "Bilateral pulmonary infection, two infected areas, upper right lung and lower left lung."
    assert transform_note(note, FLIP_COLUMNS, "axial") == flipped
    assert transform_note(note, SquareSymmetry.rot90(2), "axial") == flipped  # a half turn mirrors both
    for k, dim in ALL:
        if symmetry(k, dim).swaps_axes:
            assert transform_note("Opacity in the upper right.", symmetry(k, dim), "axial") is None
    assert transform_note("Opacity in the upper right.", FLIP_ROWS, "axial") == "Opacity in the upper right."


def test_phrases_with_several_places():
    note = "Unilateral pulmonary infection, one infected area, middle lower left lung."
    assert transform_note(note, FLIP_ROWS, "radiological") == (
        "Unilateral pulmonary infection, one infected area, upper middle left lung."
    )
    assert transform_note(note, FLIP_COLUMNS, "radiological") == (
        "Unilateral pulmonary infection, one infected area, middle lower right lung."
    )
    note = "Bilateral pulmonary infection, two infected areas, all left lung and all right lung."
    assert transform_note(note, FLIP_ROWS, "radiological") == note
    assert transform_note(note, FLIP_COLUMNS, "radiological") == (
        "Bilateral pulmonary infection, two infected areas, all right lung and all left lung."
    )


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dim", [None, 1, 2])
@pytest.mark.parametrize(
    "note",
    [
        "Lesion in the middle left lung.",
        "Unilateral infection, one area in the upper right lung.",
        "Infection in all left lung.",
        "The nuclei density in the middle is high.",
    ],
)
def test_quarter_turns_the_vocabulary_cannot_say(note, k, dim):
    assert transform_note(note, symmetry(k, dim), "radiological") is None
    assert transform_note(note, symmetry(k, dim), "image") is None


@pytest.mark.parametrize(("k", "dim"), ALL)
@pytest.mark.parametrize(
    "note",
    ["The nuclei are sparsely distributed.", "The nuclei density is higher around.", "Overall rightly so."],
)
def test_notes_without_positions_are_unchanged(note, k, dim):
    for frame in ("image", "radiological", "axial"):
        assert transform_note(note, symmetry(k, dim), frame) == note


def test_capitals_and_identity():
    assert transform_note("Upper left lung clear.", FLIP_COLUMNS, "radiological") == "Upper right lung clear."
    note = "Lesions in the upper left lung and the lower right lung."
    assert transform_note(note, SquareSymmetry(), "radiological") == note


def test_group_structure():
    """rot90 has order 4, flips order 2, and a flip conjugates a turn into its inverse."""
    r, f = SquareSymmetry.rot90(1), FLIP_COLUMNS
    assert (r @ r @ r @ r).is_identity and (f @ f).is_identity and not r.is_identity
    assert f @ r @ f == SquareSymmetry.rot90(3)
    assert len({symmetry(k, d) for k, d in ALL}) == 8  # the draws cover the whole group


def test_errors():
    with pytest.raises(ValueError, match="frame"):
        transform_note("upper left", SquareSymmetry(), "patient")
    with pytest.raises(ValueError, match="flip dim"):
        SquareSymmetry.flip(0)
    with pytest.raises(ValueError, match="not a symmetry"):
        SquareSymmetry(1, 1, 0, 1)
