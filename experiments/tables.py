"""The study tables of the README and docs/, generated from the results files in experiments/results/.

A page holds each table between two markers, ``<!-- table: NAME -->`` and ``<!-- /table -->``; this script
rewrites what lies between them from the results files, so a page cannot drift from its data
(experiments/tests/test_tables.py checks that the committed pages equal what the script writes).

    python experiments/tables.py            # rewrite the tables of every page
    python experiments/tables.py --check    # exit 1 and name the tables that differ
    python experiments/tables.py --print monuseg

Scores are in %, rounded from the fractions in the files: one decimal for the demo's 100 test images,
two for MoNuSeg's 14 (mean ± sample standard deviation over seeds).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
PAGES = (
    "README.md",
    "docs/differences.md",
    "docs/experiments/note_following.md",
    "docs/experiments/monuseg.md",
)
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)

# Published figures, not results of this project: LViT's MoNuSeg table (Li et al., IEEE TMI 2023).
LVIT_MONUSEG = {"LViT-T": (80.36, 67.31), "U-Net": (76.45, 62.86)}


@cache
def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def _row(name: str, variant: str) -> dict[str, Any]:
    rows = [row for row in load(name)["rows"] if row["variant"] == variant]
    if len(rows) != 1:
        raise ValueError(f"{name}: expected one row of variant {variant!r}, found {len(rows)}")
    return rows[0]


def _pct(fraction: float | None, digits: int = 1) -> str:
    return "" if fraction is None else f"{100 * fraction:.{digits}f}"


def _dice(row: dict[str, Any], key: str, digits: int = 1) -> str:
    return _pct(row[key]["dice"], digits) if key in row else ""


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def _commit(environment: dict[str, Any] | None) -> str:
    commit = (environment or {}).get("git_commit") or ""
    return commit[:7] + (" (dirty)" if (environment or {}).get("git_dirty") else "")


def first_epoch_above(dice_per_epoch: Sequence[float] | None, threshold: float = 0.70) -> str:
    """The first epoch (counted from 1) whose validation Dice exceeds ``threshold``, or "none"."""
    if dice_per_epoch is None:
        return ""
    return next((str(i + 1) for i, dice in enumerate(dice_per_epoch) if dice > threshold), "none")


# ---------------------------------------------------------------------------------------------------------
# Note following (configs/synthetic_tiny.yaml on generated data)

DEMO_SEEDS = (0, 1, 2, 3)
DEMO_SWITCHES = (  # variant of experiments/note_following.py -> row label
    ("reclmis", "RecLMIS, the recipe (`augment: full`, same-note pairs no negatives)"),
    ("photometric", "photometric augmentation only (`train.augment=photometric`)"),
    ("official_aug", "the official augmentation: flips and turns leave the note (`train.augment=official`)"),
    (
        "same_note_negatives",
        "same-note pairs as negatives, the official L_CCL (`ccl_exclude_same_notes=false`)",
    ),
    ("gate", "the note gate in CI (`interaction_gate=true`)"),
    ("official_ci", "the official CI module, no residual sums (`interaction_injection=official`)"),
    ("official_causal", "the official causal mask in the reconstructors (`recon_causal=true`)"),
)
# variant -> row label: how the note enters the decoder, at the recipe with 24-token notes
DEMO_INJECTIONS = (
    ("residual", "CI's residual injection (`interaction_injection=residual`, the recipe's)"),
    ("gated", "the gated injection (`interaction_injection=gated`, the model's default)"),
    ("gated_fast", "the gated injection, its gate opening 50x faster (`injection_gate_speed=50`)"),
    ("zero_init", "the zero-initialised injection (`interaction_injection=zero_init`)"),
    ("gated_official_weights", "the gated injection at the official auxiliary weights"),
    ("zero_init_official_weights", "the zero-initialised injection at the official auxiliary weights"),
    ("gated_minilm", "the gated injection with the frozen pretrained all-MiniLM-L6-v2"),
)
NOTE_FOLLOWING_FILES = (
    "note_following_cpu.json",
    "note_following_injection_cpu.json",
    *(f"note_following_seed{seed}_cpu.json" for seed in DEMO_SEEDS),
    *(f"note_following_photometric_seed{seed}_cpu.json" for seed in (1, 2, 3)),
    "note_following_ablations_cpu.json",
)


def _seed_file(seed: int) -> str:
    return f"note_following_seed{seed}_cpu.json"


def _official_weights(seed: int) -> dict[str, Any]:
    """The official auxiliary weights' run of a seed: the `official_weights` rerun where there is one (it
    holds the validation Dice per epoch), else the `reclmis` row trained when they were the recipe's."""
    name = _seed_file(seed)
    variants = {row["variant"] for row in load(name)["rows"]}
    return _row(name, "official_weights" if "official_weights" in variants else "reclmis")


def _pair(row: dict[str, Any]) -> str:
    return f"{_dice(row, 'test')} / {_dice(row, 'counterfactual')}"


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def demo_seeds() -> str:
    rows = []
    for seed in DEMO_SEEDS:
        hundredth = _row(_seed_file(seed), "aux_hundredth")
        tenth = _row(_seed_file(seed), "aux_tenth")
        official = _official_weights(seed)
        rows.append((
            str(seed), _pair(hundredth), _dice(hundredth, "test_shuffled_notes"),
            first_epoch_above(hundredth["val_dice_per_epoch"]), _pair(tenth), _pair(official),
            _dice(official, "test_shuffled_notes"), first_epoch_above(official["val_dice_per_epoch"]),
        ))  # fmt: skip
    runs = {
        "hundredth": [_row(_seed_file(seed), "aux_hundredth") for seed in DEMO_SEEDS],
        "tenth": [_row(_seed_file(seed), "aux_tenth") for seed in DEMO_SEEDS],
        "official": [_official_weights(seed) for seed in DEMO_SEEDS],
    }
    mean = {
        name: {key: {"dice": _mean(r[key]["dice"] for r in group)} for key in ("test", "counterfactual")}
        | {"test_shuffled_notes": {"dice": _mean(r["test_shuffled_notes"]["dice"] for r in group)}}
        for name, group in runs.items()
    }
    rows.append((
        "mean of seeds 0-3", _pair(mean["hundredth"]), _dice(mean["hundredth"], "test_shuffled_notes"), "",
        _pair(mean["tenth"]), _pair(mean["official"]), _dice(mean["official"], "test_shuffled_notes"), "",
    ))  # fmt: skip
    demo, demo_before = load("make_demo_cpu.json"), load("make_demo_official_weights_cpu.json")
    rows.append((
        "`make demo` (seed 0, two threads)", _pair(demo), _dice(demo, "test_shuffled_notes"),
        first_epoch_above(demo["val_dice_per_epoch"]), "", _pair(demo_before),
        _dice(demo_before, "test_shuffled_notes"), first_epoch_above(demo_before["val_dice_per_epoch"]),
    ))  # fmt: skip
    header = (
        "seed", "auxiliary losses at a hundredth (the recipe): test / counterfactual Dice", "shuffled notes",
        "first epoch above 70", "at a tenth", "at the official weights", "shuffled notes",
        "first epoch above 70",
    )  # fmt: skip
    return _table(header, rows)


def _switch_rows(name: str, variants: Sequence[tuple[str, str]]) -> list[tuple[str, ...]]:
    rows = []
    for variant, label in variants:
        row = _row(name, variant)
        rows.append((
            label, _dice(row, "test"), _dice(row, "counterfactual"), _dice(row, "test_shuffled_notes"),
            _dice(row, "test_constant_notes"), f"{row['train_minutes']:.1f} min",
        ))  # fmt: skip
    return rows


SWITCH_HEADER = ("model", "test Dice", "counterfactual Dice", "test, shuffled notes",
                 "test, one constant note", "training")  # fmt: skip


def demo_switches() -> str:
    rows = _switch_rows("note_following_cpu.json", DEMO_SWITCHES)
    no_text = _switch_rows(
        _seed_file(0), [("no_text", "text branch off (`use_text=false`, Table III row e)")]
    )
    return _table(SWITCH_HEADER, rows + no_text)


def demo_switches_official_weights() -> str:
    return _table(SWITCH_HEADER, _switch_rows(_seed_file(0), DEMO_SWITCHES))


def demo_injection() -> str:
    return _table(SWITCH_HEADER, _switch_rows("note_following_injection_cpu.json", DEMO_INJECTIONS))


def demo_ablations() -> str:
    labels = (
        ("reclmis", "the official reconstructors and L_seg"),
        ("linear_dice_seg", "L_seg = 5 (Dice + BCE), linear Dice denominator"),
        ("no_memory", "reconstructors without the memory stack (`recon_memory_layers=0`)"),
    )
    return _table(SWITCH_HEADER, _switch_rows("note_following_ablations_cpu.json", labels))


def _each_run(files: Sequence[str]) -> Iterator[tuple[str, dict, dict, dict]]:
    """(file, payload, row, the environment of the run that made the row) of every row of ``files``."""
    for name in files:
        payload = load(name)
        for row in payload["rows"]:
            yield name, payload, row, row.get("environment", payload.get("environment"))


def demo_runs() -> str:
    rows = []
    for name, payload, row, environment in _each_run(NOTE_FOLLOWING_FILES):
        rows.append((
            f"`{name}`", f"`{row['variant']}`", str(payload.get("seed", "")),
            _dice(row, "test"), _dice(row, "counterfactual"), _dice(row, "test_shuffled_notes"),
            _dice(row, "test_constant_notes"), str(row["best_epoch"]), f"{row['train_minutes']:.1f}",
            str(environment.get("torch_threads", "")), _commit(environment),
        ))  # fmt: skip
    header = ("file", "variant", "seed", "test", "counterfactual", "shuffled", "constant", "best epoch",
              "minutes", "threads", "commit")  # fmt: skip
    return _table(header, rows)


def _gradient_rows(name: str) -> list[tuple[str, ...]]:
    rows = []
    for row in load(name)["rows"]:
        ratio = {key: value["auxiliary_over_segmentation"] for key, value in row["weighted"].items()}
        rows.append((
            str(row["seed"]), f"{ratio['official']:.1f}x", f"{ratio['auxiliary_tenth']:.2f}x",
            f"{ratio['auxiliary_hundredth']:.2f}x",
        ))  # fmt: skip
    return rows


GRADIENT_HEADER = ("seed", "official weights", "at a tenth", "at a hundredth")


def text_gradients_demo() -> str:
    return _table(GRADIENT_HEADER, _gradient_rows("text_gradients_demo_cpu.json"))


def text_gradients_monuseg() -> str:
    return _table(GRADIENT_HEADER, _gradient_rows("text_gradients_monuseg_cpu.json"))


def readme_demo() -> str:
    seeds = [_row(_seed_file(seed), "aux_hundredth") for seed in DEMO_SEEDS]
    mean = {key: {"dice": _mean(r[key]["dice"] for r in seeds)}
            for key in ("test", "counterfactual", "test_shuffled_notes")}  # fmt: skip
    demo = load("make_demo_cpu.json")
    official_ci = _row("note_following_cpu.json", "official_ci")
    no_text = _row(_seed_file(0), "no_text")
    gated, minilm = (_row("note_following_injection_cpu.json", v) for v in ("gated", "gated_minilm"))
    rows = [
        ("`make demo` (the recipe, seed 0)", _dice(demo, "test"), _dice(demo, "counterfactual"),
         _dice(demo, "test_shuffled_notes")),
        ("the recipe with 18-token notes, mean of seeds 0-3", _dice(mean, "test"),
         _dice(mean, "counterfactual"), _dice(mean, "test_shuffled_notes")),
        ("the default gated injection, tower from scratch, seed 0", _dice(gated, "test"),
         _dice(gated, "counterfactual"), _dice(gated, "test_shuffled_notes")),
        ("the gated injection, frozen pretrained MiniLM, seed 0", _dice(minilm, "test"),
         _dice(minilm, "counterfactual"), _dice(minilm, "test_shuffled_notes")),
        ("CI as the official code builds it (`interaction_injection=official`), seed 0",
         _dice(official_ci, "test"), _dice(official_ci, "counterfactual"),
         _dice(official_ci, "test_shuffled_notes")),
        ("text branch off (`use_text=false`), seed 0", _dice(no_text, "test"),
         _dice(no_text, "counterfactual"), ""),
    ]  # fmt: skip
    return _table(("demo (64x64, 100 test images)", "test Dice", "counterfactual Dice",
                   "test, shuffled notes"), rows)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# MoNuSeg (configs/monuseg_cpu.yaml)

MONUSEG_VARIANTS = (  # variant of experiments/monuseg_cpu.py -> row label
    ("reclmis", "RecLMIS, the model and recipe"),
    ("no_text", "text branch off (`use_text=false`, Table III row e)"),
    ("no_ccl", "without L_CCL (`use_ccl=false`, Table III)"),
    ("no_recon", "without CVR and CLR (`use_cvr=false use_clr=false`, Table III)"),
    ("no_aux", "CI alone: without L_CCL, CVR and CLR (`use_ccl=false use_cvr=false use_clr=false`)"),
    ("aux_tenth", "the three auxiliary losses at a tenth (`loss_weights: {v2t: 0.1, t2v: 0.1, ccl: 0.02}`)"),
    ("aux_hundredth", "at a hundredth (`loss_weights: {v2t: 0.01, t2v: 0.01, ccl: 0.002}`, the demo's)"),
    ("norm", "CI's two attention outputs layer-normalised (`interaction_norm=true`)"),
    ("gate", "CI's visual tokens scaled by a gate read from the note (`interaction_gate=true`)"),
    ("same_note_negatives", "the official contrastive loss: same-note pairs as negatives "
                            "(`ccl_exclude_same_notes=false`)"),
    ("official_aug", "the official augmentation: flips and turns leave the note (`train.augment=official`)"),
    ("photometric", "without flips and rotations (`train.augment=photometric`)"),
)  # fmt: skip
# (file, variant, label): the model before its current reconstructors, loss and augmentation
MONUSEG_EARLIER = (
    ("monuseg_cpu_945545f.json", "reclmis", "RecLMIS before the official reconstructors, loss and "
                                            "note-consistent augmentation"),
    ("monuseg_cpu_945545f.json", "no_text", "text branch off, then"),
    ("monuseg_cpu_photometric.json", "reclmis_photometric", "RecLMIS then, without flips and rotations "
                                                            "(`augment=photometric`)"),
)  # fmt: skip
MONUSEG_FILES = ("monuseg_cpu.json", "monuseg_cpu_945545f.json", "monuseg_cpu_photometric.json")


def _spread(stats: dict[str, float] | None, seeds: int) -> str:
    if stats is None:
        return ""
    if seeds == 1:
        return _pct(stats["mean"], 2)
    return f"{_pct(stats['mean'], 2)} ± {_pct(stats['std'], 2)}"


def _minutes(rows: Sequence[dict[str, Any]]) -> str:
    low, high = min(r["train_minutes"] for r in rows), max(r["train_minutes"] for r in rows)
    return f"{low:.1f} min" if low == high else f"{low:.1f}-{high:.1f} min"


def _monuseg_row(name: str, variant: str, label: str) -> tuple[str, ...]:
    payload = load(name)
    runs = [row for row in payload["rows"] if row["variant"] == variant]
    summary = payload["summary"][variant]
    if "test" not in summary:  # the earliest files summarise the test split only
        summary = {"test": summary}
    seeds = len(runs)

    def stat(key: str, metric: str = "dice") -> str:
        return _spread(summary.get(key, {}).get(metric), seeds)

    return (
        label, ", ".join(str(r["seed"]) for r in runs), stat("test"), stat("test", "iou"), stat("test_last"),
        stat("test_shuffled_notes"), stat("test_constant_notes"), _minutes(runs),
    )  # fmt: skip


MONUSEG_HEADER = ("MoNuSeg test split", "seeds", "Dice (best.pt)", "IoU", "Dice (last.pt)",
                  "Dice, shuffled notes", "Dice, one constant note", "training per run")  # fmt: skip


def monuseg() -> str:
    rows = [_monuseg_row("monuseg_cpu.json", variant, label) for variant, label in MONUSEG_VARIANTS]
    rows += [_monuseg_row(*earlier[:2], earlier[2]) for earlier in MONUSEG_EARLIER]
    rows += [(f"{model}, from LViT's table", "", f"{dice:.2f}", f"{iou:.2f}", "", "", "", "")
             for model, (dice, iou) in LVIT_MONUSEG.items()]  # fmt: skip
    return _table(MONUSEG_HEADER, rows)


def monuseg_runs() -> str:
    rows = []
    for name, _, row, environment in _each_run(MONUSEG_FILES):
        rows.append((
            f"`{name}`", f"`{row['variant']}`", str(row["seed"]), _dice(row, "test", 2),
            _pct(row["test"]["iou"], 2), _dice(row, "test_last", 2), _dice(row, "test_shuffled_notes", 2),
            _dice(row, "test_constant_notes", 2), str(row["best_epoch"]), f"{row['train_minutes']:.1f}",
            "yes" if row.get("resumed") else "", str(environment.get("torch_threads", "")),
            _commit(environment),
        ))  # fmt: skip
    header = ("file", "variant", "seed", "Dice", "IoU", "Dice (last.pt)", "shuffled", "constant",
              "best epoch", "minutes", "resumed", "threads", "commit")  # fmt: skip
    return _table(header, rows)


def monuseg_diagnosis() -> str:
    rows = []
    for row in load("monuseg_diagnosis_cpu.json")["rows"]:
        ratio = row.get("ratio_mha_to_V")
        rows.append((
            f"`{row['run']}`", f"{row['train_dice_last10']:.3f}", "" if ratio is None else f"{ratio:.1f}x",
            _commit(row.get("environment")),
        ))  # fmt: skip
    header = ("run", "training Dice, last 10 epochs", "RMS of MHA(V, E') / RMS of V", "commit")
    return _table(header, rows)


def mask_resize() -> str:
    rows = [
        (row["split"], str(row["images"]), str(row["foreground_nearest"]), str(row["foreground_bilinear"]),
         f"{100 * row['growth']:.1f}%", _pct(row["dice_nearest_vs_bilinear"]))
        for row in load("mask_resize_monuseg.json")["rows"]
    ]  # fmt: skip
    header = ("MoNuSeg split", "images", "foreground pixels, nearest", "bilinear then > 0", "growth",
              "Dice of the nearest masks against the bilinear ones")  # fmt: skip
    return _table(header, rows)


def readme_monuseg() -> str:
    payload = load("monuseg_cpu.json")
    rows = []
    for variant, label in (
        ("reclmis", "RecLMIS (`configs/monuseg_cpu.yaml`)"),
        ("no_text", "text branch off (`use_text=false`)"),
        ("aux_hundredth", "auxiliary losses at a hundredth"),
    ):
        summary = payload["summary"][variant]
        rows.append((label, _spread(summary["test"]["dice"], 3), _spread(summary["test"]["iou"], 3),
                     _spread(summary.get("test_shuffled_notes", {}).get("dice"), 3)))  # fmt: skip
    dice, iou = LVIT_MONUSEG["LViT-T"]
    rows.append(("LViT-T, from LViT's table", f"{dice:.2f}", f"{iou:.2f}", ""))
    return _table(("MoNuSeg test split (seeds 0, 1, 2)", "Dice", "IoU", "Dice, shuffled notes"), rows)


TABLES: dict[str, Callable[[], str]] = {
    "demo_seeds": demo_seeds,
    "demo_switches": demo_switches,
    "demo_switches_official_weights": demo_switches_official_weights,
    "demo_ablations": demo_ablations,
    "demo_injection": demo_injection,
    "demo_runs": demo_runs,
    "text_gradients_demo": text_gradients_demo,
    "text_gradients_monuseg": text_gradients_monuseg,
    "readme_demo": readme_demo,
    "monuseg": monuseg,
    "monuseg_runs": monuseg_runs,
    "monuseg_diagnosis": monuseg_diagnosis,
    "mask_resize": mask_resize,
    "readme_monuseg": readme_monuseg,
}


def render(text: str, origin: str = "page") -> str:
    """``text`` with every marked table regenerated."""

    def table(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise ValueError(f"{origin}: unknown table {name!r}; known: {sorted(TABLES)}")
        return match.group(1) + TABLES[name]() + match.group(4)

    return BLOCK.sub(table, text)


def stale(root: Path = ROOT) -> list[str]:
    """The pages (of PAGES) whose tables differ from what the results files give."""
    return [page for page in PAGES if render((root / page).read_text(), page) != (root / page).read_text()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page is stale")
    parser.add_argument("--print", choices=sorted(TABLES), metavar="TABLE", help="print one table")
    args = parser.parse_args(argv)
    if args.print:
        print(TABLES[args.print](), end="")
        return 0
    if args.check:
        pages = stale()
        for page in pages:
            print(f"{page}: tables differ from experiments/results (run python experiments/tables.py)")
        return 1 if pages else 0
    for page in PAGES:
        path = ROOT / page
        text = path.read_text()
        new = render(text, page)
        if new != text:
            path.write_text(new)
            print(f"rewrote the tables of {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
