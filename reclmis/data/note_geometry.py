"""Positional words of a clinical note under the flips and quarter turns of an augmentation.

The official augmentation flips and rotates the image and keeps its note, so after a horizontal flip
"upper left lung" names the wrong lung and a model learns that the note's positions do not matter. Here the
note moves with the image: each flip or quarter turn is an element g of the square's symmetry group acting
on image coordinates (x to the right, y down, origin at the centre),

    p -> G p,   G a signed 2x2 permutation matrix,

and every positional phrase of the note is mapped through G and said again in the same words.

Positional phrases are runs of the words upper, middle, lower, all, left and right (QaTa-COV19 and
MosMedData+: "middle lower left lung"; MoNuSeg: "in the upper right"; the synthetic set). A run is read as a
set of vertical places (upper, middle, lower; "all" for the whole height) and a set of sides (left, right).
Sides are stated in a frame: the image frame (pathology tiles: "left" is the image's left), the
radiological frame (chest radiographs: "left" is the patient's left, which lies on the image's right), or
the axial frame (axial CT slices, MosMedData+: sides as in the radiological frame, but "upper" and "lower"
name lobes, which lie along the body's axis, across the slice: a flip of the slice's rows leaves them as
they are, and a quarter turn would put the sides front and back, which no note says). A flip
or a half turn keeps the axes and only mirrors places; a quarter turn exchanges the axes, which the
vocabulary can say for a region of the picture ("upper right" becomes "upper left") but not for a lung
zone (a run followed by "lung": the lungs' thirds stay vertical and their sides horizontal) nor for a
middle or a whole height. Such a note cannot follow the geometry, and :func:`transform_note` returns None:
the augmentation then leaves that sample's geometry alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from reclmis.config import NOTE_FRAMES

__all__ = ["FRAMES", "Frame", "SquareSymmetry", "transform_note"]

Frame = Literal["image", "radiological", "axial"]
FRAMES: tuple[str, ...] = NOTE_FRAMES

_VERTICAL = {"upper": -1, "middle": 0, "lower": 1}
_SIDE = {"left": -1, "right": 1}  # image frame; the radiological frame negates
_WORD = r"(?:upper|middle|lower|all|left|right)"
# a run of positional words separated by blanks or hyphens; "lung(s)" after it makes it a lung zone
_RUN = re.compile(rf"\b{_WORD}(?:[\s-]+{_WORD})*\b(?P<lung>\s+lungs?\b)?", re.IGNORECASE)


@dataclass(frozen=True)
class SquareSymmetry:
    """A flip, quarter turn or composition of them, as the matrix ``G`` with ``p' = G p``.

    ``G = [[xx, xy], [yx, yy]]`` acts on centred image coordinates (x right, y down).
    """

    xx: int = 1
    xy: int = 0
    yx: int = 0
    yy: int = 1

    def __post_init__(self) -> None:
        keeps = self.xy == self.yx == 0 and abs(self.xx) == abs(self.yy) == 1
        swaps = self.xx == self.yy == 0 and abs(self.xy) == abs(self.yx) == 1
        if not (keeps or swaps):
            raise ValueError(f"not a symmetry of the square: {self}")

    @classmethod
    def rot90(cls, k: int) -> SquareSymmetry:
        """``torch.rot90(image, k, dims=(-2, -1))``: k quarter turns counter-clockwise on screen."""
        g = cls()
        for _ in range(k % 4):
            g = cls(0, 1, -1, 0) @ g  # (x, y) -> (y, -x)
        return g

    @classmethod
    def flip(cls, dim: int) -> SquareSymmetry:
        """``image.flip(dim)`` of a (C, H, W) image: dim 1 (or -2) mirrors rows, dim 2 (or -1) columns."""
        if dim in (1, -2):
            return cls(1, 0, 0, -1)
        if dim in (2, -1):
            return cls(-1, 0, 0, 1)
        raise ValueError(f"flip dim must be 1 or 2 (rows or columns of a (C, H, W) image), got {dim}")

    def __matmul__(self, other: SquareSymmetry) -> SquareSymmetry:
        """``self @ other``: apply ``other`` first."""
        return SquareSymmetry(
            self.xx * other.xx + self.xy * other.yx,
            self.xx * other.xy + self.xy * other.yy,
            self.yx * other.xx + self.yy * other.yx,
            self.yx * other.xy + self.yy * other.yy,
        )

    @property
    def swaps_axes(self) -> bool:
        return self.xx == 0

    @property
    def is_identity(self) -> bool:
        return self == SquareSymmetry()


def transform_note(note: str, g: SquareSymmetry, frame: Frame) -> str | None:
    """``note`` with each positional phrase moved by ``g``, or None when its words cannot say the result.

    Words other than positional ones are kept; a rewritten phrase keeps the capital of its first letter.
    A note without positional words is returned unchanged for every ``g``.
    """
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    side_sign = 1 if frame == "image" else -1
    pieces, end = [], 0
    for run in _RUN.finditer(note):
        moved = _move_run(run, g, side_sign, vertical_in_plane=frame != "axial")
        if moved is None:
            return None
        if run.group(0)[0].isupper():
            moved = moved[0].upper() + moved[1:]
        pieces += [note[end : run.start()], moved]
        end = run.end()
    return "".join([*pieces, note[end:]])


def _move_run(run: re.Match[str], g: SquareSymmetry, side_sign: int, vertical_in_plane: bool) -> str | None:
    words = re.findall(_WORD, run.group(0).removesuffix(run.group("lung") or ""), re.IGNORECASE)
    words = [w.lower() for w in words]
    whole_height = "all" in words
    ys = {_VERTICAL[w] for w in words if w in _VERTICAL}
    xs = {_SIDE[w] * side_sign for w in words if w in _SIDE}
    lung = run.group("lung") or ""
    if g.swaps_axes:
        if lung or whole_height or 0 in ys or not vertical_in_plane:
            return None  # a lung zone, a whole height, a middle or a lobe has no name across the other axis
        xs, ys = {g.xy * y for y in ys}, {g.yx * x for x in xs}
    else:
        xs, ys = {g.xx * x for x in xs}, ({g.yy * y for y in ys} if vertical_in_plane else ys)
    vertical = ["all"] if whole_height else [w for w, y in _VERTICAL.items() if y in ys]
    sides = [w for w, x in _SIDE.items() if x * side_sign in xs]
    return " ".join(vertical + sides) + lung
