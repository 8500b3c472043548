"""benchmarks/gpu_session.sh end to end in its CPU mode (GPU stages skipped, saying why), a stage cut at its
cap with the session going on, and the plumbing of benchmarks/gpu_session.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_session  # noqa: E402


def _session(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    environ = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "WORK": str(tmp_path / "work"), **env}
    command = ["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), *args]
    result = subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
    return result, out


def test_cpu_mode_runs_every_stage_or_says_why_not(tmp_path: Path) -> None:
    result, out = _session(tmp_path, "--cpu")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("gpu_tests", "train", "inference"):
        assert f"{stage}: skipped (CPU mode: needs a CUDA device)" in result.stdout
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.parts) <= 3 for p in files), files  # 2 folders deep at most
    assert {"gpu_session.json", "gpu_session.md", "logs/install.log", "logs/ops.log"} <= {
        str(p) for p in files
    }
    report = json.loads((out / "gpu_session.json").read_text())
    assert report["passed"]
    status = {s["stage"]: s["status"] for s in report["stages"]}
    assert status == {
        "install": "passed",
        "gpu_tests": "skipped",
        "ops": "passed",
        "train": "skipped",
        "inference": "skipped",
    }
    assert report["reclmis_info"]["extension"]["cpu_kernel"]
    assert report["environment"]["command"] == "bash benchmarks/gpu_session.sh --cpu"
    rows = [row for row in report["rows"] if row["stage"] == "ops"]
    assert {row["op"] for row in rows} == {"weighted_mask"} and all(row["median_ms"] > 0 for row in rows)
    table = (out / "gpu_session.md").read_text()
    assert "| gpu_tests | skipped | 0 |" in table and table.count("| weighted_mask |") == len(rows)
    assert "reclmis._C     CPU kernel" in (out / "logs" / "install.log").read_text()


def test_a_stage_cut_at_its_cap_is_recorded_and_the_session_goes_on(tmp_path: Path) -> None:
    result, out = _session(tmp_path, "--cpu", "ops", "install", CAP_OPS="1")
    assert result.returncode == 1, result.stdout[-3000:]
    assert "ops: timed_out" in result.stdout and "install: passed" in result.stdout
    report = json.loads((out / "gpu_session.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["ops"]["status"] == "timed_out" and stages["ops"]["cap_s"] == 1
    assert stages["ops"]["note"] == "cut at its cap of 1 s"
    assert stages["install"]["status"] == "passed" and not report["passed"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA device")
def test_the_gpu_mode_without_a_gpu_fails_every_stage_saying_why(tmp_path: Path) -> None:
    result, out = _session(tmp_path, "install", "ops")
    assert result.returncode == 1
    report = json.loads((out / "gpu_session.json").read_text())
    assert [(s["stage"], s["status"]) for s in report["stages"]] == [("install", "failed"), ("ops", "failed")]
    assert all(s["note"] == "torch sees no CUDA device (the CPU mode is --cpu)" for s in report["stages"])


def test_an_unknown_stage_is_refused(tmp_path: Path) -> None:
    result, _ = _session(tmp_path, "benchmarks")
    assert result.returncode == 2
    assert "unknown stage benchmarks (stages: install gpu_tests ops train inference)" in result.stderr


def _info(**extension) -> dict:
    return {
        "torch": "2.11.0+cu130",
        "torch_cuda": "13.0",
        "gpus": [{"name": "NVIDIA H200", "arch": "sm_90", "memory_gib": 139.8}],
        "extension": {
            "loaded": True,
            "cpu_kernel": True,
            "cuda_kernel": True,
            "cuda_archs": ["sm_90"],
            "ptx": [],
        }
        | extension,
    }


def test_extension_problems() -> None:
    assert gpu_session.extension_problem(_info()) is None
    assert "fell back to the CPU kernel" in gpu_session.extension_problem(
        _info(cuda_kernel=False, cuda_archs=[])
    )
    assert gpu_session.extension_problem(_info(cuda_archs=["sm_86"])) == (
        "reclmis._C holds code for ['sm_86'], none for this sm_90 GPU"
    )
    assert "does not load" in gpu_session.extension_problem(_info(loaded=False, error="No module"))
    assert gpu_session.extension_problem({**_info(), "gpus": []}) == "no CUDA device visible to torch"


def test_rows_of_a_stage_cut_short_come_from_its_suite_files(tmp_path: Path) -> None:
    for suite in ("a", "b"):
        (tmp_path / f"ops.{suite}.json").write_text(json.dumps({"rows": [{"op": suite}]}))
    assert [row["op"] for row in gpu_session.stage_rows(tmp_path, "ops")] == ["a", "b"]
    (tmp_path / "ops.json").write_text(json.dumps({"rows": [{"op": "a"}, {"op": "b"}, {"op": "c"}]}))
    assert [row["op"] for row in gpu_session.stage_rows(tmp_path, "ops")] == ["a", "b", "c"]
    assert gpu_session.stage_rows(tmp_path, "train") == []


def test_merge_joins_the_reports_of_two_calls(tmp_path: Path) -> None:
    env = {"device": "cuda", "device_name": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
           "git_commit": "abc", "command": "bash benchmarks/gpu_session.sh"}  # fmt: skip
    calls = []
    for i, stage in enumerate(("ops", "train")):
        payload = {"environment": env, "reclmis_info": None, "passed": i == 0,
                   "stages": [{"stage": stage, "status": "passed", "seconds": 1, "cap_s": 2, "note": ""}],
                   "rows": [{"op": stage, "impl": "x", "stage": stage}]}  # fmt: skip
        calls.append(tmp_path / f"call{i}.json")
        calls[-1].write_text(json.dumps(payload))
    assert gpu_session.merge(tmp_path / "merged.json", calls) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert [s["stage"] for s in merged["stages"]] == ["ops", "train"] and len(merged["rows"]) == 2
    assert not merged["passed"] and len(merged["calls"]) == 2
    assert "| train | passed | 1 | 2 |" in (tmp_path / "merged.md").read_text()


@pytest.mark.parametrize("has_git", [True, False])
def test_environment_names_the_commit_without_git(tmp_path: Path, monkeypatch, has_git: bool) -> None:
    """A copy of the tree without .git (as sent to a GPU node) records RECLMIS_COMMIT instead."""
    import importlib.util

    copy = tmp_path / "benchmarks" / "common.py"
    copy.parent.mkdir()
    copy.write_text((ROOT / "benchmarks" / "common.py").read_text())
    if has_git:
        subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
        subprocess.run(["git", "-C", str(tmp_path), "add", "."], check=True)
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit",
                        "-q", "-m", "x"], check=True)  # fmt: skip
    spec = importlib.util.spec_from_file_location("common_copy", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("RECLMIS_COMMIT", "0123abcd")
    env = module.environment("cpu")
    if has_git:
        assert env["git_commit"] != "0123abcd" and len(env["git_commit"]) == 40 and env["git_dirty"] is False
    else:
        assert env["git_commit"] == "0123abcd" and env["git_commit_from"] == "RECLMIS_COMMIT"
