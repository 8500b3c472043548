"""Command line: ``reclmis {train,evaluate,predict,make-synthetic,profile,info}`` (also ``python -m reclmis``).

Multi-GPU: ``torchrun --nproc_per_node=N -m reclmis train ...`` (``--batch-size`` is per process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from reclmis.config import PRESETS, build_configs, read_recipe
from reclmis.data.note_probe import NOTE_PROBES

TRAIN_FLAGS = {  # CLI flag -> (section, field)
    "image_size": ("model", "image_size"),
    "text_encoder": ("model", "text_encoder"),
    "trust_remote_code": ("model", "trust_remote_code"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"),
    "device": ("train", "device"),
    "seed": ("train", "seed"),
    "workers": ("train", "num_workers"),
    "precision": ("train", "precision"),
    "compile": ("train", "compile"),
}


def _parse_override(text: str) -> tuple[str, str, Any]:
    key, sep, value = text.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or section not in ("model", "train") or not name:
        raise ValueError(f"--set expects model.FIELD=VALUE or train.FIELD=VALUE, got {text!r}")
    return section, name, yaml.safe_load(value)


def train_configs(args: argparse.Namespace):
    """Recipe (``--config``), then ``--preset``, then the flags and ``--set`` overrides, in that order."""
    sections = read_recipe(args.config) if args.config else {"model": {}, "train": {}}
    if args.preset:
        sections["model"]["preset"] = args.preset
    sections["model"].setdefault("preset", "tiny")
    for flag, (section, name) in TRAIN_FLAGS.items():
        if getattr(args, flag) is not None:
            sections[section][name] = getattr(args, flag)
    for override in args.set:
        section, name, value = _parse_override(override)
        sections[section][name] = value
    return build_configs(sections, "configuration")


def check_output_file(path: str | Path, flag: str) -> Path:
    """Raise ValueError, naming ``flag``, when the file ``path`` cannot be written: it is a folder, its
    folder is a file, or that folder is not writable. Missing folders are fine (they are created)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    _check_writable_parent(path, flag)
    return path


def check_output_folder(path: str | Path, flag: str) -> Path:
    """As :func:`check_output_file`, for a folder that is created if missing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder")
    _check_writable_parent(path / "_", flag)
    return path


def _check_writable_parent(path: Path, flag: str) -> None:
    existing = next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {path} cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} cannot be written: no permission to write in {existing}")


def _train(args: argparse.Namespace) -> int:
    from reclmis.train import Trainer

    model_config, train_config = train_configs(args)
    out = Path(args.out or f"runs/{Path(args.data).name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_output_folder(out, "--out")
    trainer = Trainer(model_config, train_config, args.data, out, resume=args.resume)
    results = trainer.fit()
    if trainer.dist.is_main:
        best = max((r.val["dice"] for r in results), default=trainer.best_dice)
        print(f"done: best validation Dice {best:.4f}; checkpoints in {out} (best.pt, last.pt)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from reclmis.inference import evaluate, write_metrics_json
    from reclmis.train import model_from_checkpoint
    from reclmis.train.trainer import resolve_device

    for flag, path in (("--json", args.json), ("--per-image-csv", args.per_image_csv)):
        if path is not None:
            check_output_file(path, flag)
    if args.save_predictions is not None:
        check_output_folder(args.save_predictions, "--save-predictions")
    device = resolve_device(args.device)
    model, state = model_from_checkpoint(args.checkpoint, device)
    mask_resize = args.mask_resize
    if args.official_metrics:
        mask_resize = mask_resize or "bilinear"
    if mask_resize is None:  # as the model was trained (checkpoints without the field resized nearest)
        mask_resize = (state.get("train_config") or {}).get("mask_resize", "nearest")
    if args.official_metrics and args.empty_score is not None:
        raise ValueError("--official-metrics sets the empty-mask score to 0; drop --empty-score")
    empty_score = (
        0.0 if args.official_metrics else (args.empty_score if args.empty_score is not None else 1.0)
    )
    if args.notes is not None and not model.config.use_text:
        raise ValueError("--notes probes the note, but this checkpoint's model has no text branch")
    scoring = dict(
        batch_size=args.batch_size, device=device, mask_resize=mask_resize, empty_score=empty_score
    )
    metrics = evaluate(
        model,
        args.data,
        args.split,
        save_predictions=args.save_predictions,
        per_image_csv=args.per_image_csv,
        **scoring,
    )
    rows = [("own", metrics)]
    if args.notes is not None:
        metrics["probe"] = evaluate(model, args.data, args.split, notes=args.notes, **scoring)
        rows.append((args.notes, metrics["probe"]))
    print(
        f"{'split':<8}{'notes':<10}{'images':>8}{'Dice':>10}{'IoU':>10}{'pooled Dice':>14}{'pooled IoU':>12}"
    )
    for notes, row in rows:
        scores = [100 * row[key] for key in ("dice", "iou", "pooled_dice", "pooled_iou")]
        print(f"{args.split:<8}{notes:<10}{row['n']:>8}" + "".join(
            f"{score:>{width}.2f}" for score, width in zip(scores, (10, 10, 14, 12), strict=True)))  # fmt: skip
    print(f"Dice and IoU per image, averaged over images (LViT, RecLMIS); pooled: over every pixel of the "
          f"split (torchmetrics). Masks: foreground above half the value range, resized {mask_resize}; "
          f"both-empty images score {empty_score:g}")  # fmt: skip
    if args.json:
        write_metrics_json(metrics, args.json)
    if args.save_predictions:
        print(f"prediction overlays (green TP, red FN, blue FP) in {args.save_predictions}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from reclmis.inference import (
        check_no_overwrite,
        predict,
        prediction_outputs,
        write_comparison,
        write_prediction,
    )
    from reclmis.train import model_from_checkpoint
    from reclmis.train.trainer import resolve_device

    outputs = prediction_outputs(args.out, args.explain, bool(args.compare_text))
    check_no_overwrite(outputs, {"image": Path(args.image), "checkpoint": Path(args.checkpoint)})
    for path in outputs.values():
        check_output_file(path, "--out")
    device = resolve_device(args.device)
    model, _ = model_from_checkpoint(args.checkpoint, device)
    prediction = predict(model, args.image, args.text, device)
    written = write_prediction(prediction, args.out, explain=args.explain)
    if args.compare_text:
        other = predict(model, args.image, args.compare_text, device)
        written.append(
            write_comparison(prediction, other, (args.text, args.compare_text), outputs["compare"])
        )
    for path in written:
        print(path)
    return 0


def _make_synthetic(args: argparse.Namespace) -> int:
    from reclmis.data import make_synthetic

    out = make_synthetic(args.out, size=args.size, n_train=args.n, n_val=args.n_val, n_test=args.n_test,
                         seed=args.seed, overwrite=args.overwrite)  # fmt: skip
    print(f"synthetic dataset in {out} (counterfactual test split in {out / 'counterfactual'})")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from reclmis.profiling import profile_config

    sections = read_recipe(args.config) if args.config else {"model": {}, "train": {}}
    if args.preset or not args.config:
        sections["model"]["preset"] = args.preset or "paper"
    if args.image_size is not None:
        sections["model"]["image_size"] = args.image_size
    config, _ = build_configs(sections, "configuration")
    tokens = config.max_text_len if args.tokens is None else args.tokens
    name = Path(args.config).stem if args.config else sections["model"]["preset"]
    result = profile_config(config, tokens, name)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


def _info(args: argparse.Namespace) -> int:
    from reclmis.info import main as info_main

    return info_main(as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reclmis", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train on an LViT-layout dataset folder")
    train.add_argument(
        "--data", required=True, help="dataset root with Train_Folder, Val_Folder, Test_Folder"
    )
    train.add_argument("--config", help="YAML recipe (configs/*.yaml); the flags below override it")
    train.add_argument(
        "--preset", choices=sorted(PRESETS), help="model preset (default: the recipe's, else tiny)"
    )
    train.add_argument("--image-size", type=int)
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int, help="per process under torchrun")
    train.add_argument("--lr", type=float)
    train.add_argument("--out", help="run folder for checkpoints and logs (default runs/<data>-<time>)")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"))
    train.add_argument("--seed", type=int)
    train.add_argument(
        "--text-encoder",
        help="a pretrained Hugging Face text model: a local directory saved "
        "with save_pretrained, or a hub id (fetched only then); frozen unless "
        "--set model.freeze_text_encoder=false",
    )
    train.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="let --text-encoder run the code it ships (CXR-BERT); review it first",
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    train.add_argument("--workers", type=int, help="DataLoader worker processes")
    train.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"))
    train.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help="torch.compile the model (CUDA graphs on one GPU; the first steps compile, "
                       "minutes on CPU); --set train.compile_mode=... picks another mode")  # fmt: skip
    train.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override any config field, e.g. --set model.use_text=false")  # fmt: skip
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("evaluate", help="Dice and IoU of a checkpoint on a dataset split")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--split", choices=("test", "val", "train"), default="test")
    evaluate.add_argument("--json", help="write {dice, iou, n} (fractions) to this file")
    evaluate.add_argument("--save-predictions", help="folder for predicted masks and error overlays")
    evaluate.add_argument("--per-image-csv", help="write per-image Dice and IoU to this CSV file")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    evaluate.add_argument("--mask-resize", choices=("nearest", "bilinear"),
                          help="how ground-truth masks are resized to the model's input: nearest, or bilinear "
                               "then > 0 as the official loader (default: as the checkpoint was trained)")  # fmt: skip
    evaluate.add_argument("--empty-score", type=float, choices=(1.0, 0.0),
                          help="score of an image whose mask and prediction are both empty: 1 (default) or 0 "
                               "(the official test script)")  # fmt: skip
    evaluate.add_argument("--official-metrics", action="store_true",
                          help="score as the official test script, to compare with published tables: "
                               "both-empty images score 0, masks resized bilinear then > 0 unless "
                               "--mask-resize says otherwise")  # fmt: skip
    evaluate.add_argument("--notes", choices=NOTE_PROBES,
                          help="also score with every note replaced, beside the normal score: 'constant' (the "
                               "split's most frequent note for every image) or 'shuffled' (another image's "
                               "note): how much the model reads its note")  # fmt: skip
    evaluate.set_defaults(handler=_evaluate)

    predict = commands.add_parser("predict", help="segment one image given its note")
    predict.add_argument("--checkpoint", required=True)
    predict.add_argument("--image", required=True)
    predict.add_argument("--text", help="the clinical note")
    predict.add_argument("--out", required=True,
                         help="mask file (.png, .tif, .tiff or .bmp: the suffix names the format); the overlay "
                         "goes beside it as <out>_overlay.png")  # fmt: skip
    predict.add_argument(
        "--explain", action="store_true", help="also write the W_poi heatmap and W_woi word weights"
    )
    predict.add_argument("--compare-text", help="a second note: both segmentations side by side")
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    predict.set_defaults(handler=_predict)

    synthetic = commands.add_parser("make-synthetic", help="write a synthetic language-guided dataset")
    synthetic.add_argument("--out", required=True)
    synthetic.add_argument("--size", type=int, default=64)
    synthetic.add_argument("--n", type=int, default=400, help="training images")
    synthetic.add_argument("--n-val", type=int, default=64)
    synthetic.add_argument("--n-test", type=int, default=100)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--overwrite", action="store_true")
    synthetic.set_defaults(handler=_make_synthetic)

    profile = commands.add_parser("profile", help="parameters and FLOPs (the paper's Table II columns)")
    profile.add_argument("--config", help="YAML recipe (configs/*.yaml) whose model section is profiled")
    profile.add_argument("--preset", choices=sorted(PRESETS),
                         help="model preset (default: the recipe's, else paper)")  # fmt: skip
    profile.add_argument("--image-size", type=int, help="default: the recipe's, else the preset's")
    profile.add_argument("--tokens", type=int, help="note length in tokens (default: max_text_len)")
    profile.add_argument("--json", action="store_true", help="print JSON instead of a table")
    profile.set_defaults(handler=_profile)

    info = commands.add_parser("info", help="torch build, GPU, what reclmis._C holds, Triton mode")
    info.add_argument("--json", action="store_true", help="print JSON instead of a report")
    info.set_defaults(handler=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError, FloatingPointError) as err:  # bad input, files, a diverged run
        print(f"reclmis {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
