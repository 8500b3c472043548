"""The benchmark runner works end to end on CPU (a smoke test: it asserts nothing about speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_quick_on_cpu_writes_json_and_markdown(tmp_path) -> None:
    out = tmp_path / "cpu.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run_all.py"),
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(out),
        ],
        check=True,
        timeout=600,
    )
    payload = json.loads(out.read_text())
    assert {"device", "torch", "git_commit", "command"} <= set(payload["environment"])
    ops = {row["op"] for row in payload["rows"]}
    assert {"conditioned_attention", "max_similarity", "weighted_mask", "model_training"} <= ops
    assert not [row for row in payload["rows"] if row.get("impl") == "suite"], "a suite failed"
    # each suite's own file, written as it finished: together they hold every row
    suites = ["conditioned_attention", "max_similarity", "weighted_mask", "model"]
    per_suite = [json.loads((tmp_path / f"cpu.{suite}.json").read_text()) for suite in suites]
    assert [p["suite"] for p in per_suite] == suites
    key = [(row["op"], row["impl"], row["pass"]) for row in payload["rows"]]
    assert [(row["op"], row["impl"], row["pass"]) for p in per_suite for row in p["rows"]] == key
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| ") >= len(payload["rows"])
    plots = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plot.py"), str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    assert Path(plots.stdout.splitlines()[0]).is_file()  # the speed-up chart (weighted masking on CPU)
