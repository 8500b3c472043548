"""Batched augmentation (reclmis.data.augment) against the per-sample TrainAugmentation, the note table and
the cached loader."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from reclmis.data import LViTDataset, TrainAugmentation, make_synthetic
from reclmis.data import augment as batched
from reclmis.data.augment import apply_parameters, augment_batch, draw_parameters, follow_notes
from reclmis.data.cached import CachedLoader, CachedSplit
from reclmis.data.note_table import NoteTable
from reclmis.data.transforms import IDENTITY, ROT90_FLIP, ROTATE, SYMMETRIES, AugmentParameters
from reclmis.model import NoteTokenizer
from reclmis.train.trainer import NoteCollator

NOTES = [
    "Lesion in the upper left lung.",
    "Bilateral pulmonary infection, two infected areas, all left lung and middle lower right lung.",
    "The nuclei density in the upper right is high.",
    "No positional words here.",
]


def smooth_images(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Pictures with structure at every scale a blur or rotation touches, values in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, 5, 5, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    images = images + 0.15 * torch.rand(batch, channels, size, size, generator=g)
    images[0, :, :3] = 0.0  # black rows: zero value and saturation
    images[1, :, :, :3] = 1.0  # white columns: clamped by a positive brightness
    images[2] = images[2, :1]  # a grey sample: no saturation, every hue
    return (images / images.amax()).clamp(0, 1)


def reference(augmentation, images, masks, parameters, notes=None):
    """The per-sample transform under each sample's parameters, stacked."""
    out = [
        augmentation.apply(images[i], masks[i], None if notes is None else notes[i], parameters.select(i))
        for i in range(len(parameters))
    ]
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out]), [o[2] for o in out]


def assert_covers_every_branch(
    p: AugmentParameters, photometric: bool = True, geometric: bool = True
) -> None:
    """A comparison that never met a step proves nothing about it."""
    if geometric:
        assert {IDENTITY, ROT90_FLIP, ROTATE} <= set(p.geometry.tolist())
        assert set(p.symmetry_code[p.geometry == ROT90_FLIP].tolist()) == set(SYMMETRIES)
    if photometric:
        assert p.blur.any() and (~p.blur).any()
        for flag in (p.brightness_on, p.contrast_on & p.contrast_first, p.contrast_on & ~p.contrast_first):
            assert flag.any() and (~flag).any()
        if p.channels == 3:
            for flag in (
                p.saturation_on & ~p.hue_on,
                p.hue_on & ~p.saturation_on,
                p.hue_on & p.saturation_on,
            ):
                assert flag.any()


LAWS = {
    "default": {},
    "nearest": {"interpolation": "nearest"},
    "photometric": {"geometric": False},
    "geometric": {"photometric": False},
    "wide": {"blur_sigma": (0.2, 2.0), "hue_delta": 0.45, "saturation_range": (0.0, 3.0), "max_angle": 90.0},
}


@pytest.mark.parametrize("law", sorted(LAWS))
@pytest.mark.parametrize(("channels", "size"), [(3, 23), (1, 16)])
def test_batched_equals_per_sample_for_the_same_parameters(law, channels, size, monkeypatch) -> None:
    """For fixed parameters the batched ops give the per-sample transform's result: masks exactly (the
    same sampling grids), images up to float rounding (the colour step's closed form, the blur's sums)."""
    monkeypatch.setattr(batched, "CPU_CHUNK_PIXELS", 5 * channels * size * size)  # chunks of 5 samples
    augmentation = TrainAugmentation(**LAWS[law])
    images = smooth_images(96, channels, size, seed=1)
    masks = (images[:, :1] > 0.5).float()
    for parameters in (
        draw_parameters(augmentation, 96, channels, torch.Generator().manual_seed(2)),
        AugmentParameters.cat(
            [augmentation.draw(channels, torch.Generator().manual_seed(s)) for s in range(96)]
        ),
    ):
        assert_covers_every_branch(parameters, augmentation.photometric, augmentation.geometric)
        out_images, out_masks = apply_parameters(images, masks, parameters, augmentation)
        ref_images, ref_masks, _ = reference(augmentation, images, masks, parameters)
        assert out_images.shape == images.shape and out_images.dtype == torch.float32
        assert torch.equal(out_masks, ref_masks)
        torch.testing.assert_close(out_images, ref_images, rtol=0, atol=1e-5)
        assert out_images.min() >= 0 and out_images.max() <= 1 + 1e-6


def test_hand_made_parameters_at_the_edges() -> None:
    """Blur radii 2 to 4 in one stack and a sigma of 0 on one axis, saturation pushed to 0 and past 1, hue
    shifts across red, contrast on either side of the colour, zero rotation and half turns."""
    augmentation = TrainAugmentation(blur_sigma=(0.0, 1.0))
    images = smooth_images(8, 3, 20, seed=3)
    masks = (images[:, :1] > 0.4).float()
    p = AugmentParameters.neutral(8, 3)._fields()
    p["blur"][:4] = True
    p["sigma"][:4] = torch.tensor([[0.5, 1.0], [0.0, 0.8], [1.0, 0.0], [0.62, 0.5]], dtype=torch.float64)[
        :, None
    ]
    p["saturation_on"][:] = p["hue_on"][:] = True
    p["saturation"][:] = torch.tensor([0.0, 3.0, 1.0, 0.5, 1.5, 1.0, 2.0, 0.1], dtype=torch.float64)
    p["hue"][:] = torch.tensor([-0.1, 0.1, 0.5, -0.5, 0.0, 0.99, -0.99, 0.05], dtype=torch.float64)
    p["contrast_on"][:] = True
    p["contrast"][:] = 1.4
    p["contrast_first"][::2] = True
    p["geometry"][4:] = torch.tensor([ROTATE, ROT90_FLIP, ROT90_FLIP, ROTATE])
    p["quarter_turns"][5:7] = torch.tensor([2, 2])
    p["flip_dim"][5:7] = torch.tensor([1, 2])
    p["angle"][4], p["angle"][7] = 0.0, -45.0
    parameters = AugmentParameters(**p)
    out_images, out_masks = apply_parameters(images, masks, parameters, augmentation)
    ref_images, ref_masks, _ = reference(augmentation, images, masks, parameters)
    assert torch.equal(out_masks, ref_masks)
    torch.testing.assert_close(out_images, ref_images, rtol=0, atol=1e-5)


def test_the_four_reflections_are_the_eight_draws() -> None:
    """flip(rows) after k turns equals flip(columns) after k + 2, which the batched geometry relies on."""
    image = torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 5, 5)
    for k in range(4):
        assert torch.equal(torch.rot90(image, k, (1, 2)).flip(1), torch.rot90(image, k + 2, (1, 2)).flip(2))


def _binomial_bound(p: float, n: int, m: int | None = None) -> float:
    """Five standard deviations of a frequency over n draws (of a difference of two with m)."""
    return 5 * math.sqrt(p * (1 - p) * (1 / n + (1 / m if m else 0.0)))


def test_parameter_frequencies_match_the_configured_law() -> None:
    """Every coin's frequency within five standard deviations of its probability over 40,000 draws (a
    wrong law, e.g. the rotation's coin not conditioned on the turn's, is off by tens of deviations), every
    value inside its range with the uniform's mean, and the batch's frequencies as the per-sample draws'."""
    law = dict(rot90_flip_prob=0.3, rotate_prob=0.6, blur_prob=0.7, blur_channel_prob=0.4, max_angle=15.0)
    ranges = dict(blur_sigma=(0.3, 1.2), brightness_delta=0.2, contrast_range=(0.6, 1.3))
    ranges |= dict(saturation_range=(0.2, 1.8), hue_delta=0.15)  # each its own: a swap must fail
    augmentation = TrainAugmentation(**law, **ranges, note_frame="radiological")
    n = 40_000
    p = draw_parameters(augmentation, n, 3, torch.Generator().manual_seed(0))
    turned, rotated = p.geometry == ROT90_FLIP, p.geometry == ROTATE
    pb, pc = law["blur_prob"], law["blur_channel_prob"]
    expected = {
        "rot90_flip": (turned, 0.3),
        "rotate": (rotated, 0.7 * 0.6),
        "identity": (p.geometry == IDENTITY, 0.7 * 0.4),
        "plane blurred": (p.blur.flatten(), pb * pc),
        "two channels blurred": (p.blur[:, 0] & p.blur[:, 2], pb * pc * pc),
        "any channel blurred": (p.blur.any(1), pb * (1 - (1 - pc) ** 3)),
        "brightness": (p.brightness_on, 0.5),
        "contrast": (p.contrast_on, 0.5),
        "contrast first": (p.contrast_first, 0.5),
        "saturation": (p.saturation_on, 0.5),
        "hue": (p.hue_on, 0.5),
        "saturation and hue": (p.saturation_on & p.hue_on, 0.25),
    }
    for k in range(4):
        expected[f"{k} turns"] = (p.quarter_turns[turned] == k, 0.25)
    expected["rows flipped"] = (p.flip_dim[turned] == 1, 0.5)
    for name, (drawn, probability) in expected.items():
        frequency = drawn.double().mean().item()
        assert abs(frequency - probability) < _binomial_bound(probability, drawn.numel()), (name, frequency)

    drawn_values = {
        "angle": (p.angle[rotated], (-15.0, 15.0)),
        "sigma": (p.sigma[p.blur], (0.3, 1.2)),
        "brightness": (p.brightness[p.brightness_on], (-0.2, 0.2)),
        "contrast": (p.contrast[p.contrast_on], (0.6, 1.3)),
        "saturation": (p.saturation[p.saturation_on], (0.2, 1.8)),
        "hue": (p.hue[p.hue_on], (-0.15, 0.15)),
    }
    for name, (values, (low, high)) in drawn_values.items():
        assert values.min() >= low and values.max() <= high, name
        mean_bound = 5 * (high - low) / math.sqrt(12 * values.numel())
        assert abs(values.mean().item() - (low + high) / 2) < mean_bound, name
        quartile = values.quantile(0.25).item()  # uniform, not merely centred
        assert abs(quartile - (low + 0.25 * (high - low))) < 0.02 * (high - low), name
    assert torch.equal(p.angle[~rotated], torch.zeros((~rotated).sum(), dtype=torch.float64))
    assert not p.sigma[~p.blur].any() and (p.contrast[~p.contrast_on] == 1).all()

    m = 6_000  # the per-sample transform's own draws: the same law
    single = AugmentParameters.cat([augmentation.draw(3, torch.Generator().manual_seed(s)) for s in range(m)])
    for name, drawn_batch, drawn_single in (
        ("rot90_flip", turned, single.geometry == ROT90_FLIP),
        ("rotate", rotated, single.geometry == ROTATE),
        ("plane blurred", p.blur.flatten(), single.blur.flatten()),
        ("contrast first", p.contrast_first, single.contrast_first),
        ("hue", p.hue_on, single.hue_on),
    ):
        a, b = drawn_batch.double().mean().item(), drawn_single.double().mean().item()
        assert abs(a - b) < _binomial_bound((a + b) / 2, drawn_batch.numel(), drawn_single.numel()), name


def test_switches_and_channels_leave_steps_undrawn() -> None:
    g = torch.Generator().manual_seed(0)
    neutral = AugmentParameters.neutral(64, 3)
    geometric = draw_parameters(TrainAugmentation(photometric=False), 64, 3, g)
    photometric = draw_parameters(TrainAugmentation(geometric=False), 64, 3, g)
    grey = draw_parameters(TrainAugmentation(), 64, 1, g)
    for name in ("blur", "sigma", "brightness_on", "contrast_on", "saturation_on", "hue_on", "hue"):
        assert torch.equal(getattr(geometric, name), getattr(neutral, name)), name
    for name in ("geometry", "quarter_turns", "flip_dim", "angle"):
        assert torch.equal(getattr(photometric, name), getattr(neutral, name)), name
    assert not grey.saturation_on.any() and not grey.hue_on.any() and grey.brightness_on.any()


def test_notes_follow_the_batch_as_they_follow_each_sample() -> None:
    """follow_notes and the note table rewrite each note as the per-sample transform does, and keep the
    orientation of samples whose note cannot say it."""
    tokenizer = NoteTokenizer.train(NOTES * 3, max_len=32, vocab_size=300)
    for frame in ("radiological", "image", "axial"):
        augmentation = TrainAugmentation(photometric=False, rot90_flip_prob=0.8, note_frame=frame)
        samples = torch.arange(64) % len(NOTES)
        notes = [NOTES[i] for i in samples.tolist()]
        parameters = draw_parameters(augmentation, 64, 3, torch.Generator().manual_seed(1))
        images = smooth_images(64, 3, 8, seed=0)
        masks = (images[:, :1] > 0.5).float()
        _, ref_masks, ref_notes = reference(augmentation, images, masks, parameters, notes)
        moved, followed = follow_notes(notes, parameters, augmentation)
        assert moved == ref_notes
        assert torch.equal(apply_parameters(images, masks, followed, augmentation)[1], ref_masks)
        kept = (parameters.geometry == ROT90_FLIP) & (followed.geometry == IDENTITY)
        assert kept.any() and (followed.geometry == ROT90_FLIP).any()

        table = NoteTable(NOTES, tokenizer, frame)
        rows, by_table = table.follow(samples, parameters)
        assert table.texts(rows) == moved
        for name in ("geometry", "quarter_turns", "flip_dim"):
            assert torch.equal(getattr(by_table, name), getattr(followed, name)), name
        ids, mask = table.tokens(rows)
        expected_ids, expected_mask = tokenizer(moved)
        assert torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask)
    unmoved = NoteTable(NOTES, tokenizer, None)
    assert len(unmoved.strings) == len(NOTES) and (unmoved.rows == torch.arange(4)[:, None]).all()


def test_note_table_holds_each_string_once() -> None:
    notes = [NOTES[0], NOTES[2], NOTES[0], NOTES[0], NOTES[2]]
    table = NoteTable(notes, None, "image")
    assert table.sample_note.tolist() == [0, 1, 0, 0, 1]
    assert len(table.strings) == len(set(table.strings))
    # "upper left lung" (a lung zone, radiological or image frame alike) has no name across the axes
    assert (table.rows[0, 1:] >= 0).tolist() == [c in (1, 2, 5, 6) for c in range(1, 9)]
    assert (table.rows[1] >= 0).all()  # a region of the picture follows every symmetry
    with pytest.raises(ValueError, match="without a tokenizer"):
        table.tokens(torch.tensor([0]))


def blob_region(mask: torch.Tensor) -> str:
    rows, cols = mask[0].nonzero(as_tuple=True)
    half = (mask.shape[-1] - 1) / 2
    return f"{'upper' if rows.float().mean() < half else 'lower'} {'left' if cols.float().mean() < half else 'right'}"


def test_augment_batch_moves_images_masks_and_notes_together() -> None:
    augmentation = TrainAugmentation(rotate_prob=0.0, rot90_flip_prob=1.0, note_frame="image")
    images, masks = torch.zeros(32, 3, 16, 16), torch.zeros(32, 1, 16, 16)
    masks[:, :, 2:5, 10:14] = 1  # upper right
    images[:, :, 2:5, 10:14] = 1
    note = "The nuclei density in the upper right is high."
    out_images, out_masks, notes = augment_batch(
        images, masks, torch.Generator().manual_seed(0), notes=[note] * 32, augmentation=augmentation
    )
    regions = {blob_region(m) for m in out_masks}
    assert regions == {"upper left", "upper right", "lower left", "lower right"}
    for out_mask, out_image, moved in zip(out_masks, out_images, notes, strict=True):
        assert moved == f"The nuclei density in the {blob_region(out_mask)} is high."
        assert torch.equal(out_image.amax(0) > 0.5, out_mask[0] > 0.5)  # blur and colour kept the blob
    assert torch.equal(images[:, :, 2:5, 10:14], torch.ones(32, 3, 3, 4))  # the input is not modified
    again = augment_batch(
        images, masks, torch.Generator().manual_seed(0), notes=[note] * 32, augmentation=augmentation
    )
    assert torch.equal(again[0], out_images) and again[2] == notes


def test_inplace_and_bad_arguments() -> None:
    augmentation = TrainAugmentation()
    images = smooth_images(4, 3, 12, seed=0)
    masks = (images[:, :1] > 0.5).float()
    p = draw_parameters(augmentation, 4, 3, torch.Generator().manual_seed(0))
    expected = apply_parameters(images, masks, p, augmentation)
    work_images, work_masks = images.clone(), masks.clone()
    out = apply_parameters(work_images, work_masks, p, augmentation, inplace=True)
    assert out[0].data_ptr() == work_images.data_ptr() and torch.equal(work_images, expected[0])
    assert torch.equal(work_masks, expected[1])
    with pytest.raises(ValueError, match="images must be"):
        apply_parameters(images[0], masks, p, augmentation)
    with pytest.raises(ValueError, match="masks must be"):
        apply_parameters(images, masks.bool(), p, augmentation)
    with pytest.raises(ValueError, match="parameters are for 4 samples"):
        apply_parameters(images[:3], masks[:3], p, augmentation)
    turned = AugmentParameters.neutral(4, 3).replace(geometry=torch.full((4,), ROT90_FLIP))
    with pytest.raises(ValueError, match="square"):
        apply_parameters(images[..., :10], masks[..., :10], turned, augmentation)
    with pytest.raises(ValueError, match="contiguous"):
        apply_parameters(images.transpose(2, 3), masks, p, augmentation, inplace=True)
    with pytest.raises(ValueError, match="one batch size"):
        p.replace(hue=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="notes has 3 entries"):
        follow_notes(NOTES[:3], p, augmentation)


# ---------------------------------------------------------------- the cached loader


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data"), size=32, n_train=20, n_val=4, n_test=2, seed=4)


def cached_split(dataset: LViTDataset) -> CachedSplit:
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([(item["image"] * 255).round().to(torch.uint8) for item in items])
    masks = torch.stack([item["mask"].to(torch.uint8) for item in items])
    return CachedSplit(images, masks, dataset.names)


def test_cached_loader_without_augmentation_is_the_collated_loader(synthetic) -> None:
    dataset = LViTDataset(synthetic, "train", image_size=32)
    tokenizer = NoteTokenizer.train(dataset.texts, max_len=24, vocab_size=300)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    loader = CachedLoader(cached_split(dataset), NoteTable(dataset.texts, tokenizer, None), order, 6)
    reference_loader = DataLoader(dataset, batch_size=6, sampler=order, collate_fn=NoteCollator(tokenizer))
    assert len(loader) == len(reference_loader) == 4
    for ours, theirs in zip(loader, reference_loader, strict=True):
        assert set(ours) == set(theirs)
        for key, value in theirs.items():
            assert torch.equal(ours[key], value) if torch.is_tensor(value) else ours[key] == value, key
    assert len(CachedLoader(loader.split, loader.notes, order, 6, drop_last=True)) == 3


def test_cached_loader_augments_each_batch_as_drawn(synthetic) -> None:
    """A batch is the batched draw, the notes' rewrite and the batched ops; an epoch's batches follow from
    torch's global seed when iteration starts."""
    dataset = LViTDataset(synthetic, "train", image_size=32)
    tokenizer = NoteTokenizer.train(dataset.texts, max_len=24, vocab_size=300)
    augmentation = TrainAugmentation(note_frame="radiological")
    split, notes = cached_split(dataset), NoteTable(dataset.texts, tokenizer, "radiological")
    loader = CachedLoader(split, notes, list(range(20)), 8, augmentation=augmentation)

    def epoch(seed: int) -> list[dict]:
        torch.manual_seed(seed)
        return list(loader)

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert [len(b["names"]) for b in first] == [8, 8, 4]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["images"], b["images"]) and a["texts"] == b["texts"]
    assert not all(torch.equal(a["images"], b["images"]) for a, b in zip(first, other, strict=True))

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_()))
    parameters = draw_parameters(augmentation, 8, 3, generator)
    items = [dataset[i] for i in range(8)]
    images, masks = torch.stack([i["image"] for i in items]), torch.stack([i["mask"] for i in items])
    texts, parameters = follow_notes([i["text"] for i in items], parameters, augmentation)
    images, masks = apply_parameters(images, masks, parameters, augmentation)
    batch = first[0]
    assert batch["names"] == dataset.names[:8] and batch["texts"] == texts
    assert torch.equal(batch["images"], images) and torch.equal(batch["masks"], masks)
    assert torch.equal(batch["input_ids"], tokenizer(texts)[0])
    assert set(batch["masks"].unique().tolist()) <= {0.0, 1.0}


def test_cached_split_and_loader_check_their_inputs(synthetic) -> None:
    dataset = LViTDataset(synthetic, "val", image_size=32)
    split = cached_split(dataset)
    with pytest.raises(ValueError, match="images must be uint8"):
        CachedSplit(split.images.float(), split.masks, split.names)
    with pytest.raises(ValueError, match="masks must be uint8"):
        CachedSplit(split.images, split.masks[:2], split.names)
    with pytest.raises(ValueError, match="names has 3 entries"):
        CachedSplit(split.images, split.masks, split.names[:3])
    notes = NoteTable(dataset.texts, None, None)
    with pytest.raises(ValueError, match="note_frame"):
        CachedLoader(split, notes, [0, 1], 2, augmentation=TrainAugmentation(note_frame="radiological"))
    with pytest.raises(ValueError, match="notes has 2 samples"):
        CachedLoader(split, NoteTable(dataset.texts[:2], None, None), [0, 1], 2)
    assert "input_ids" not in next(iter(CachedLoader(split, notes, [0, 1, 2], 2)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_augmentation_on_cuda_equals_cpu(synthetic) -> None:
    augmentation = TrainAugmentation(note_frame="radiological")
    images = smooth_images(64, 3, 40, seed=5)
    masks = (images[:, :1] > 0.5).float()
    parameters = draw_parameters(augmentation, 64, 3, torch.Generator().manual_seed(6))
    cpu = apply_parameters(images, masks, parameters, augmentation)
    cuda = apply_parameters(images.cuda(), masks.cuda(), parameters, augmentation)
    torch.testing.assert_close(cuda[0].cpu(), cpu[0], rtol=0, atol=1e-5)
    assert (cuda[1].cpu() != cpu[1]).float().mean() < 1e-3  # nearest sampling may round differently
    dataset = LViTDataset(synthetic, "train", image_size=32)
    split = cached_split(dataset)
    for cache in (split, split.to("cuda")):
        loader = CachedLoader(
            cache, NoteTable(dataset.texts, None, "radiological"), list(range(20)), 8,
            augmentation=augmentation, device="cuda",
        )  # fmt: skip
        torch.manual_seed(0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # a batch never waits for the device
        try:
            batches = list(loader)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(b["images"].is_cuda and b["masks"].is_cuda for b in batches)
