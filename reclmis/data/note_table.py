"""Every distinct note of a split and each geometric rewrite of it, tokenised once and looked up by index.

A split's notes repeat (QaTa-COV19's 7,145 training notes hold a few hundred distinct ones), and a flip or
quarter turn rewrites a note into one of at most eight others (:mod:`reclmis.data.note_geometry`). The table
holds each distinct string once, its tokens in one (M, L) tensor, and for each distinct note and each
:data:`~reclmis.data.transforms.SYMMETRIES` code the row of its rewrite (-1 where the note cannot say the
geometry), so that a batch's notes are two look-ups: no string work and no tokenizer per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from reclmis.data.augment import keep_orientation
from reclmis.data.note_geometry import Frame, transform_note
from reclmis.data.transforms import SYMMETRIES, AugmentParameters

if TYPE_CHECKING:
    from reclmis.model.tokenizer import NoteTokenizer

__all__ = ["NoteTable"]

CODES = 1 + len(SYMMETRIES)  # symmetry_code 0 (unchanged) to 8


class NoteTable:
    """The notes of one split (``notes[i]`` is sample i's), their rewrites under ``frame`` (None: notes
    never move) and, with a ``tokenizer``, their tokens.

    ``strings`` (M,) are the distinct notes then the distinct rewrites; ``rows`` (distinct notes, 9) int64
    the row of ``strings`` for each symmetry code, -1 where the note cannot follow; ``sample_note`` (N,) the
    distinct note of each sample; ``input_ids`` and ``attention_mask`` (M, L) the tokens of ``strings``.
    """

    def __init__(self, notes: Sequence[str], tokenizer: NoteTokenizer | None, frame: Frame | None) -> None:
        if isinstance(notes, str):
            raise TypeError("notes must be a sequence of strings, not a single string")
        self.frame = frame
        position: dict[str, int] = {}
        for note in notes:
            position.setdefault(note, len(position))
        self.sample_note = torch.tensor([position[note] for note in notes], dtype=torch.int64)
        self.rows = torch.full((len(position), CODES), -1, dtype=torch.int64)
        self.rows[:, 0] = torch.arange(len(position))
        for note, n in list(position.items()):
            for code, symmetry in SYMMETRIES.items():
                moved = note if frame is None else transform_note(note, symmetry, frame)
                if moved is not None:
                    self.rows[n, code] = position.setdefault(moved, len(position))
        self.strings: list[str] = list(position)
        self.input_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        if tokenizer is not None:
            self.input_ids, self.attention_mask = tokenizer(self.strings)

    def __len__(self) -> int:
        return len(self.sample_note)

    def to(self, device: torch.device | str) -> NoteTable:
        """The tokens on ``device`` (the look-up tables stay on the host)."""
        if self.input_ids is not None:
            self.input_ids = self.input_ids.to(device)
            self.attention_mask = self.attention_mask.to(device)
        return self

    def follow(
        self, samples: torch.Tensor, parameters: AugmentParameters
    ) -> tuple[torch.Tensor, AugmentParameters]:
        """The note rows of ``samples`` (host int64 (B,)) under their drawn geometry, and the parameters with
        the identity where a note cannot say its sample's flip or quarter turn (as the per-sample transform)."""
        if samples.shape != (len(parameters),):
            raise ValueError(f"samples must be ({len(parameters)},) indices, got {tuple(samples.shape)}")
        note = self.sample_note[samples]
        rows = self.rows[note, parameters.symmetry_code]
        blocked = rows < 0
        return torch.where(blocked, self.rows[note, 0], rows), keep_orientation(parameters, blocked)

    def unmoved(self, samples: torch.Tensor) -> torch.Tensor:
        """The note rows of ``samples`` as written."""
        return self.rows[self.sample_note[samples], 0]

    def texts(self, rows: torch.Tensor) -> list[str]:
        return [self.strings[r] for r in rows.tolist()]

    def tokens(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (B, L) of ``rows``, on the tokens' device."""
        if self.input_ids is None:
            raise ValueError("this NoteTable was built without a tokenizer")
        index = rows.to(self.input_ids.device, non_blocking=True)
        return self.input_ids.index_select(0, index), self.attention_mask.index_select(0, index)
