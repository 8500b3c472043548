"""The plumbing of benchmarks/gpu_session.sh: the node's CUDA architecture, the check of the extension, the
stage records and the report merged from the stages' results files.

    python3 benchmarks/gpu_session.py arch                      # "9.0": TORCH_CUDA_ARCH_LIST for this GPU
    python3 benchmarks/gpu_session.py check-extension [--save F] # exit 1 unless reclmis._C runs on the GPU
    python3 benchmarks/gpu_session.py record WORK STAGE STATUS SECONDS CAP [NOTE]
    python3 benchmarks/gpu_session.py report WORK OUT           # OUT/gpu_session.json and .md
    python3 benchmarks/gpu_session.py merge OUT.json A.json B.json ...   # the reports of several calls

A stage's results file is WORK/results/<stage>.json (rows as the benchmarks write them); a suite file
``<stage>.<suite>.json`` (benchmarks/run_all.py writes one per suite as it finishes) is read only when the
stage's own file is missing, i.e. when the stage was cut short.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REPORT = "gpu_session"
SAVED = "reclmis_info.json"  # WORK/: the environment and reclmis info, saved by the install stage
# torch is imported by the commands that need it: `record` runs after every stage and stays quick.


def _import_benchmarks() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def arch() -> int:
    """Print the compute capability of GPU 0 as TORCH_CUDA_ARCH_LIST spells it."""
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 1
    major, minor = torch.cuda.get_device_capability(0)
    print(f"{major}.{minor}")
    return 0


def extension_problem(info: dict[str, Any]) -> str | None:
    """Why reclmis._C cannot run weighted_mask on the visible GPUs (None when it can)."""
    from reclmis.info import runs_on

    ext = info["extension"]
    if not ext["loaded"]:
        return f"reclmis._C does not load: {ext['error']}"
    if not info["torch_cuda"]:
        return f"torch {info['torch']} is a CPU-only build"
    if not ext["cuda_kernel"]:
        return "reclmis._C was built without its CUDA kernel (the build fell back to the CPU kernel)"
    for gpu in info["gpus"]:
        if not runs_on(gpu["arch"], ext["cuda_archs"], ext["ptx"]):
            return (
                f"reclmis._C holds code for {ext['cuda_archs'] + ext['ptx']}, none for this {gpu['arch']} GPU"
            )
    return None if info["gpus"] else "no CUDA device visible to torch"


def check_extension(save: Path | None, cpu: bool) -> int:
    """Print ``reclmis info``; exit 1 unless reclmis._C runs weighted_mask on the visible GPUs (``cpu``: unless
    it loads with its CPU kernel). ``save``: the report as JSON, for the session's results."""
    from reclmis.info import collect, format_report

    info = collect()
    print(format_report(info))
    if save is not None:
        _import_benchmarks()
        from benchmarks.common import environment

        env = environment("cuda" if info["gpus"] else "cpu")
        save.write_text(json.dumps({"environment": env, "reclmis_info": info}, indent=2) + "\n")
    ext = info["extension"]
    if cpu:
        problem = None if ext["loaded"] and ext["cpu_kernel"] else "reclmis._C does not load its CPU kernel"
    else:
        problem = extension_problem(info)
    if problem is not None:
        print(f"gpu_session: {problem}", file=sys.stderr)
        return 1
    return 0


def record(work: Path, stage: str, status: str, seconds: int, cap: int, note: str = "") -> int:
    """Add (or replace) a stage's record in WORK/stages.json (written whole, then renamed)."""
    path = work / "stages.json"
    stages = read_stages(work)
    stages = [s for s in stages if s["stage"] != stage]
    stages.append({"stage": stage, "status": status, "seconds": seconds, "cap_s": cap, "note": note})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"stages": stages}, indent=2) + "\n")
    tmp.replace(path)
    return 0


def read_stages(work: Path) -> list[dict[str, Any]]:
    path = work / "stages.json"
    return json.loads(path.read_text())["stages"] if path.exists() else []


def stage_rows(results: Path, stage: str) -> list[dict[str, Any]]:
    """The rows a stage left: its results file, else the per-suite files of a run cut short."""
    files = [results / f"{stage}.json"]
    if not files[0].exists():
        files = sorted(results.glob(f"{stage}.*.json"))
    rows = []
    for path in files:
        rows += [{**row, "stage": stage} for row in json.loads(path.read_text())["rows"]]
    return rows


def _stage_table(stages: list[dict[str, Any]]) -> list[str]:
    lines = ["| stage | status | seconds | cap (s) | note |", "|---|---|---|---|---|"]
    for s in stages:
        lines.append(f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['cap_s']} | {s['note']} |")
    return lines


def write_report(payload: dict[str, Any], out: Path) -> Path:
    """``out`` (a .json path): the payload, and the markdown beside it."""
    _import_benchmarks()
    from benchmarks.common import markdown, write_results

    path = write_results(REPORT, payload, out)
    text = "\n".join(["# GPU session", "", *_stage_table(payload["stages"]), "", markdown(payload)])
    path.with_suffix(".md").write_text(text)
    return path


def report(work: Path, out: Path) -> int:
    """OUT/gpu_session.json and .md from the stage records and results in WORK. The environment is the one
    the install stage saved with reclmis info (else taken now); its command is the session's."""
    _import_benchmarks()
    from benchmarks.common import environment

    saved = work / SAVED
    if saved.exists():
        env, info = (json.loads(saved.read_text())[key] for key in ("environment", "reclmis_info"))
    else:
        import torch

        env, info = environment("cuda" if torch.cuda.is_available() else "cpu"), None
    env["command"] = os.environ.get("GPU_SESSION_COMMAND", env["command"])
    stages = read_stages(work)
    payload = {
        "environment": env,
        "reclmis_info": info,
        "passed": all(s["status"] in ("passed", "skipped") for s in stages),
        "stages": stages,
        "rows": [row for s in stages for row in stage_rows(work / "results", s["stage"])],
    }
    print(write_report(payload, out / f"{REPORT}.json"))
    return 0


def merge(out: Path, reports: list[Path]) -> int:
    """One report from several calls' reports: the stages and rows of each, the first one's environment."""
    payloads = [json.loads(path.read_text()) for path in reports]
    merged = {
        "environment": payloads[0]["environment"],
        "calls": [
            {"report": str(path), "environment": p["environment"]}
            for path, p in zip(reports, payloads, strict=True)
        ],
        "reclmis_info": payloads[0]["reclmis_info"],
        "passed": all(p["passed"] for p in payloads),
        "stages": [s for p in payloads for s in p["stages"]],
        "rows": [row for p in payloads for row in p["rows"]],
    }
    print(write_report(merged, out))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("arch")
    check = commands.add_parser("check-extension")
    check.add_argument("--save", type=Path, help="reclmis info as JSON")
    check.add_argument("--cpu", action="store_true", help="the CPU kernel is enough (CPU mode)")
    rec = commands.add_parser("record")
    rec.add_argument("work", type=Path)
    rec.add_argument("stage")
    rec.add_argument("status", choices=("passed", "failed", "timed_out", "skipped"))
    rec.add_argument("seconds", type=int)
    rec.add_argument("cap", type=int)
    rec.add_argument("note", nargs="?", default="")
    rep = commands.add_parser("report")
    rep.add_argument("work", type=Path)
    rep.add_argument("out", type=Path)
    mer = commands.add_parser("merge")
    mer.add_argument("out", type=Path)
    mer.add_argument("reports", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "arch":
        return arch()
    if args.command == "check-extension":
        return check_extension(args.save, args.cpu)
    if args.command == "record":
        return record(args.work, args.stage, args.status, args.seconds, args.cap, args.note)
    if args.command == "report":
        return report(args.work, args.out)
    return merge(args.out, args.reports)


if __name__ == "__main__":
    sys.exit(main())
