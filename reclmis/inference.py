"""Evaluation on a dataset split and prediction for one image and note."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from reclmis.data import MASK_RULE, LViTDataset, load_image
from reclmis.data.note_probe import probe_notes
from reclmis.metrics import DiceIoUMeter, binarize
from reclmis.model import RecLMIS
from reclmis.train.trainer import NoteCollator
from reclmis.viz import enlarge, error_overlay, heatmap_overlay, mask_overlay, save_png, word_weight_chart


@torch.no_grad()
def evaluate(
    model: RecLMIS,
    data_root: str | Path,
    split: str = "test",
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    save_predictions: str | Path | None = None,
    per_image_csv: str | Path | None = None,
    progress: bool = True,
    mask_resize: str = "nearest",
    empty_score: float = 1.0,
    notes: str = "own",
) -> dict[str, float | int | str]:
    """Dice and IoU at threshold 0.5 on ``split``, in both protocols (``reclmis.metrics``): per image and
    averaged over images ("dice", "iou"), and pooled over every pixel ("pooled_dice", "pooled_iou").

    Ground-truth masks are binarised by :data:`~reclmis.data.MASK_RULE`, then resized to the model's input
    by ``mask_resize`` ("nearest", or "bilinear" then > 0 as the official loader); an image whose mask and
    prediction are both empty scores ``empty_score`` (1, or 0 as the official test script). These
    conventions are returned with the scores; a split with masks that are entirely background or
    foreground at the model's size gets a warning (:meth:`~reclmis.data.LViTDataset.check_masks`).
    ``save_predictions`` receives, per image, the predicted mask and an overlay (true positives green,
    false negatives red, false positives blue); ``per_image_csv`` the per-image scores. ``notes``: "own",
    or a probe of how much the model reads its note (:mod:`reclmis.data.note_probe`): "constant" gives
    every image the same note, "shuffled" another image's.
    """
    model = model.eval().to(device)
    dataset = LViTDataset(data_root, split, model.config.image_size, cache=False, mask_resize=mask_resize)
    dataset.check_masks()
    if notes != "own":
        replaced = probe_notes(dataset.texts, notes)
        dataset.samples = [
            dataclasses.replace(s, text=t) for s, t in zip(dataset.samples, replaced, strict=True)
        ]
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=NoteCollator(model.tokenizer))
    meter = DiceIoUMeter(empty_score)
    rows: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    out_dir = Path(save_predictions) if save_predictions is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    for batch in tqdm(loader, desc=f"evaluate {split}", disable=not progress, leave=False):
        images = batch["images"].to(device)
        ids, mask = (batch[k].to(device) if k in batch else None for k in ("input_ids", "attention_mask"))
        predicted = binarize(model(images, ids, mask).logits.float(), from_logits=True)
        target = batch["masks"].to(device) > 0.5
        dice, iou = meter.update(predicted, target)
        rows.extend(zip(batch["names"], dice, iou, strict=True))
        if out_dir is not None:
            for name, image, pred, true in zip(
                batch["names"], batch["images"], predicted.cpu(), target.cpu(), strict=True
            ):
                stem = Path(name).stem
                save_png((pred[0].numpy() * 255).astype(np.uint8), out_dir / f"{stem}_mask.png")
                save_png(
                    error_overlay(image.permute(1, 2, 0).numpy(), pred[0], true[0]),
                    out_dir / f"{stem}_overlay.png",
                )
    if per_image_csv is not None:
        with Path(per_image_csv).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "dice", "iou"])
            writer.writerows((name, f"{float(d):.6f}", f"{float(i):.6f}") for name, d, i in rows)
    protocols = {"dice": "per image, mean over images", "pooled_dice": "pooled over every pixel of the split"}
    conventions = {"mask_foreground": MASK_RULE, "mask_resize": mask_resize, "empty_score": empty_score}
    return meter.compute() | {"protocols": protocols} | conventions | {"notes": notes}


@dataclass
class Prediction:
    probabilities: torch.Tensor  # (S, S) in [0, 1]
    mask: torch.Tensor  # (S, S) bool
    image: torch.Tensor  # (3, S, S) in [0, 1], the resized input
    w_poi: torch.Tensor | None  # (g, g) patches-of-interest weights
    words: list[str]  # the note's tokens
    w_woi: torch.Tensor | None  # (len(words),) words-of-interest weights


@torch.no_grad()
def predict(
    model: RecLMIS, image_path: str | Path, text: str | None, device: torch.device | str = "cpu"
) -> Prediction:
    model = model.eval().to(device)
    cfg = model.config
    image = load_image(image_path, cfg.image_size)
    ids = mask = None
    words: list[str] = []
    if cfg.use_text:
        if not text:
            raise ValueError("--text is required: this model reads a clinical note")
        ids, mask = model.tokenize([text], device)
        words = model.tokenizer.tokens(text)[: int(mask.sum())]
    out = model(image[None].to(device), ids, mask, return_weights=cfg.use_text)
    probabilities = torch.sigmoid(out.logits.float())[0, 0].cpu()
    w_poi = out.w_poi[0].view(cfg.grid_size, cfg.grid_size).cpu() if out.w_poi is not None else None
    w_woi = out.w_woi[0, : len(words)].cpu() if out.w_woi is not None else None
    return Prediction(probabilities, probabilities >= 0.5, image, w_poi, words, w_woi)


# the mask's file formats, by suffix: lossless only (JPEG would blur its edges)
MASK_FORMATS = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}


def prediction_outputs(out: str | Path, explain: bool = False, compare: bool = False) -> dict[str, Path]:
    """The files that predicting into ``out`` writes: the mask (in the format of ``out``'s suffix, see
    ``MASK_FORMATS``), ``<out>_overlay.png``, with ``explain`` ``<out>_wpoi.png`` and ``<out>_wwoi.png``,
    with ``compare`` ``<out>_compare.png``. An unsupported or lossy suffix raises ValueError."""
    out = Path(out)
    if out.suffix.lower() not in MASK_FORMATS:
        given = out.suffix or "a name without suffix"
        lossy = " (a lossy format: its compression would change the mask's pixels)"
        raise ValueError(
            f"--out {out}: a mask is written as {', '.join(MASK_FORMATS)}, not {given}"
            + (lossy if out.suffix.lower() in (".jpg", ".jpeg", ".webp", ".jp2") else "")
        )
    paths = {"mask": out, "overlay": out.with_name(f"{out.stem}_overlay.png")}
    if explain:
        paths |= {
            "wpoi": out.with_name(f"{out.stem}_wpoi.png"),
            "wwoi": out.with_name(f"{out.stem}_wwoi.png"),
        }
    if compare:
        paths["compare"] = out.with_name(f"{out.stem}_compare.png")
    return paths


def check_no_overwrite(outputs: dict[str, Path], inputs: dict[str, Path]) -> None:
    """Raise ValueError when an output file would replace an input file (paths resolved, links followed)."""
    for output in outputs.values():
        for kind, source in inputs.items():
            same = Path(output).resolve() == Path(source).resolve()
            if not same and Path(output).exists() and Path(source).exists():
                same = os.path.samefile(output, source)
            if same:
                raise ValueError(f"{output} would overwrite the input {kind} {source}; choose another --out")


def write_prediction(prediction: Prediction, out: str | Path, explain: bool = False) -> list[Path]:
    """``out`` gets the binary mask (0/255, in the format its suffix names: see :func:`prediction_outputs`);
    ``<out>_overlay.png`` the mask over the image; with ``explain``, ``<out>_wpoi.png`` the W_poi heatmap
    and ``<out>_wwoi.png`` the W_woi weight of each word (the paper's Fig. 13). Figures of small inputs are
    enlarged to at least 256 pixels."""
    paths = prediction_outputs(out, explain)
    rgb = prediction.image.permute(1, 2, 0).numpy()
    written = [
        save_mask(prediction.mask, paths["mask"]),
        save_png(enlarge(mask_overlay(rgb, prediction.mask)), paths["overlay"]),
    ]
    if explain:
        if prediction.w_poi is None:
            raise ValueError("--explain needs a model with the text branch (W_poi and W_woi)")
        heatmap = enlarge(heatmap_overlay(rgb, prediction.w_poi))
        written.append(save_png(heatmap, paths["wpoi"]))
        chart = word_weight_chart(prediction.words, prediction.w_woi)
        written.append(save_png(chart, paths["wwoi"]))
    return written


def save_mask(mask: torch.Tensor, path: str | Path) -> Path:
    """Write a boolean mask (H, W) as an 8-bit grey 0/255 picture in the format of ``path``'s suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(path, format=MASK_FORMATS[path.suffix.lower()])
    return path


def write_comparison(first: Prediction, second: Prediction, texts: tuple[str, str], out: str | Path) -> Path:
    """The segmentations of one image under two notes, side by side with the notes beneath (the paper's
    Fig. 14)."""
    panels = [enlarge(mask_overlay(p.image.permute(1, 2, 0).numpy(), p.mask)) for p in (first, second)]
    height, width = panels[0].shape[:2]
    font = ImageFont.load_default()
    wrapped = [_wrap(text, width - 8, font) for text in texts]
    caption = 6 + 14 * max(len(lines) for lines in wrapped)
    canvas = Image.new("RGB", (2 * width + 8, height + caption), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, lines) in enumerate(zip(panels, wrapped, strict=True)):
        x = i * (width + 8)
        canvas.paste(Image.fromarray(panel), (x, 0))
        for k, line in enumerate(lines):
            draw.text((x + 4, height + 4 + 14 * k), line, fill="black", font=font)
    return save_png(np.asarray(canvas), out)


def _wrap(text: str, width: int, font: ImageFont.ImageFont) -> list[str]:
    """Greedy word wrap to ``width`` pixels."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines or [""]


def write_metrics_json(metrics: dict[str, float | int], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path
