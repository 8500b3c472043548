"""A split decoded once into uint8 tensors, served as batches gathered by index and augmented as a batch.

:class:`CachedSplit` holds every image (N, C, S, S) and mask (N, 1, S, S) of a split as uint8, in host
memory or on the GPU. :class:`CachedLoader` walks a sampler's order (the DistributedSampler of training,
each rank's shard for validation) in batches: it gathers the batch's rows (into pinned host memory when
they travel to a GPU), converts them to float as :class:`~reclmis.data.dataset.LViTDataset` does, draws
the batch's augmentation on the host and applies it on the batch's device
(:mod:`reclmis.data.augment`), and looks the notes' tokens up in a :class:`~reclmis.data.note_table.NoteTable`.
No worker processes, no per-sample Python, no tokenizer per batch; nothing waits for the device.

The augmentation draws from a generator seeded, when iteration starts, from torch's global generator (as
DataLoader seeds its workers), so an epoch's batches are a function of the global seed at that point:
``seed_epoch`` makes them a function of (seed, epoch, rank).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from reclmis.data.augment import apply_parameters, draw_parameters
from reclmis.data.note_table import NoteTable
from reclmis.data.transforms import TrainAugmentation

__all__ = ["CachedLoader", "CachedSplit"]


class CachedSplit:
    """``images`` uint8 (N, C, S, S) and ``masks`` uint8 (N, 1, S, S) in {0, 1}, on one device, and the
    samples' ``names``."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, names: Sequence[str]) -> None:
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, C, S, S), got {tuple(images.shape)} {images.dtype}")
        n, _, height, width = images.shape
        if (
            masks.shape != (n, 1, height, width)
            or masks.dtype != torch.uint8
            or masks.device != images.device
        ):
            raise ValueError(
                f"masks must be uint8 (N, 1, S, S) = {(n, 1, height, width)} on {images.device}, got "
                f"{tuple(masks.shape)} {masks.dtype} on {masks.device}"
            )
        if len(names) != n:
            raise ValueError(f"names has {len(names)} entries for {n} samples")
        self.images, self.masks, self.names = images, masks, list(names)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.masks.nbytes

    def to(self, device: torch.device | str) -> CachedSplit:
        return CachedSplit(self.images.to(device), self.masks.to(device), self.names)

    def gather(self, samples: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 rows of ``samples`` (host int64 (B,)) on ``device``: gathered where the cache lives, into
        pinned memory when they go from the host to a GPU, and copied without waiting."""
        if self.device == device:
            index = samples.to(device, non_blocking=True)
            return self.images.index_select(0, index), self.masks.index_select(0, index)
        pin = self.device.type == "cpu" and device.type == "cuda"
        index = samples.to(self.device, non_blocking=True)
        out = []
        for tensor in (self.images, self.masks):
            rows = torch.empty(
                (len(samples), *tensor.shape[1:]), dtype=tensor.dtype, device=self.device, pin_memory=pin
            )
            out.append(torch.index_select(tensor, 0, index, out=rows).to(device, non_blocking=True))
        return out[0], out[1]


class CachedLoader:
    """Batches of a :class:`CachedSplit` in the order of ``sampler`` (a Sampler or a sequence of indices),
    as the trainer's collator makes them: ``images`` float (B, C, S, S) in [0, 1], ``masks`` float
    (B, 1, S, S), ``names``, ``texts`` and, when ``notes`` has a tokenizer, ``input_ids`` and
    ``attention_mask``, all on ``device``. ``augmentation`` (None: none) is applied to each batch; ``notes``
    must have been built with its note frame, so that the notes move with the images."""

    def __init__(
        self,
        split: CachedSplit,
        notes: NoteTable,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        *,
        drop_last: bool = False,
        augmentation: TrainAugmentation | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(notes) != len(split):
            raise ValueError(f"notes has {len(notes)} samples, the split {len(split)}")
        if augmentation is not None and augmentation.geometric and notes.frame != augmentation.note_frame:
            raise ValueError(
                f"notes were built for note_frame {notes.frame!r}, the augmentation's is {augmentation.note_frame!r}"
            )
        self.split, self.notes, self.sampler = split, notes, sampler
        self.batch_size, self.drop_last = batch_size, drop_last
        self.augmentation = augmentation
        self.device = torch.device(device)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        generator = None
        if self.augmentation is not None:
            generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_()))
        order = torch.as_tensor(list(self.sampler), dtype=torch.int64)
        for begin in range(0, len(self) * self.batch_size, self.batch_size):
            yield self.batch(order[begin : begin + self.batch_size], generator)

    def batch(self, samples: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, Any]:
        """The batch of ``samples`` (host int64 (B,)), augmented with draws from ``generator``."""
        images, masks = self.split.gather(samples, self.device)
        images, masks = images.float().div_(255.0), masks.float()
        if self.augmentation is None:
            rows = self.notes.unmoved(samples)
        else:
            parameters = draw_parameters(self.augmentation, images.shape[0], images.shape[1], generator)
            rows, parameters = self.notes.follow(samples, parameters)
            images, masks = apply_parameters(images, masks, parameters, self.augmentation, inplace=True)
        batch: dict[str, Any] = {
            "images": images,
            "masks": masks,
            "names": [self.split.names[i] for i in samples.tolist()],
            "texts": self.notes.texts(rows),
        }
        if self.notes.input_ids is not None:
            batch["input_ids"], batch["attention_mask"] = self.notes.tokens(rows)
        return batch
