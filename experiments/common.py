"""What the accuracy studies share about results: their folder, the environment record, and the gathering
of results files written by runs made side by side."""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import environment, write_results

RESULTS_DIR = Path(__file__).parent / "results"

__all__ = ["RESULTS_DIR", "environment", "gather_rows", "write_study"]


def write_study(name: str, payload: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write a study's ``payload`` to ``out`` (default experiments/results/<name>.json), atomically."""
    return write_results(name, payload, out, results_dir=RESULTS_DIR)


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
