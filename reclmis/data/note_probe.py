"""Notes replaced to probe how much a trained model reads them (``reclmis evaluate --notes``).

"constant": every image gets the same note, the split's most frequent one (ties: the first in file order),
so the note carries nothing about the image. "shuffled": every image gets another image's note, a
derangement drawn from a fixed seed, so the note is a real one about the wrong image. A model that ignores
its note scores the same under both as under its own notes; one that follows it loses Dice under
"shuffled" (it segments what the other note names) and under "constant".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

NOTE_PROBES = ("constant", "shuffled")

__all__ = ["NOTE_PROBES", "probe_notes"]


def probe_notes(notes: Sequence[str], probe: str, seed: int = 0) -> list[str]:
    """The notes an evaluation under ``probe`` gives the images in place of ``notes`` (same order)."""
    if probe not in NOTE_PROBES:
        raise ValueError(f"probe must be one of {NOTE_PROBES}, got {probe!r}")
    notes = list(notes)
    if probe == "constant":
        counts = Counter(notes)
        most = max(counts.values(), default=0)
        return [next(n for n in notes if counts[n] == most)] * len(notes)
    if len(notes) < 2:
        raise ValueError(f"shuffled notes need at least two images, got {len(notes)}")
    # a random cyclic order: image order[i] takes the note of order[i + 1], so no image keeps its own
    order = torch.randperm(len(notes), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = list(notes)
    for position, index in enumerate(order):
        shuffled[index] = notes[order[(position + 1) % len(order)]]
    return shuffled
