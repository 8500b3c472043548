"""PNG charts from a results JSON (run_all.py or one suite): speed-up of the fused path per op and shape, and
peak memory against batch size for the max-similarity op.

    python benchmarks/plot.py benchmarks/results/run_all_h200.json     # writes <name>_speedup.png, _memory.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FUSED = {"triton", "extension", "fused"}


def _label(row: dict) -> str:
    shape = row.get("shape", {})
    keys = [k for k in ("name", "B", "batch", "Nq", "Nk", "N", "L", "T", "C") if k in shape]
    mode = f" {row['mode']}" if "mode" in row else ""
    return f"{row['op']}{mode} {row.get('dtype', '')} " + " ".join(f"{k}={shape[k]}" for k in keys)


def speedup_chart(rows: list[dict], out: Path) -> Path | None:
    picked = [
        (f"{_label(r)} [{r['pass']}]", value)
        for r in rows
        if r.get("impl") in FUSED and "error" not in r
        for key, value in r.items()
        if key in ("speedup_vs_reference", "speedup_vs_numpy_loop", "speedup_vs_reference_fp32")
    ]
    if not picked:
        return None
    labels, values = zip(*picked, strict=True)
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(labels) + 1.2))
    ax.barh(range(len(values)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed-up of the fused path over the reference (log scale)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def memory_chart(rows: list[dict], out: Path) -> Path | None:
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("op") == "max_similarity" and r.get("pass") == "fwd+bwd" and r.get("peak_mem_mib"):
            series.setdefault(f"{r['impl']} {r.get('dtype', '')}", []).append(
                (r["shape"]["B"], r["peak_mem_mib"])
            )
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in sorted(series.items()):
        batch, mem = zip(*sorted(points), strict=True)
        ax.plot(batch, mem, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B (B x B pairs)")
    ax.set_ylabel("peak extra memory, forward+backward (MiB)")
    ax.set_title("max_similarity: memory against batch size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    rows = json.loads(args.results.read_text())["rows"]
    stem = args.results.with_suffix("")
    for path in (
        speedup_chart(rows, Path(f"{stem}_speedup.png")),
        memory_chart(rows, Path(f"{stem}_memory.png")),
    ):
        print(path if path is not None else "(no rows for this chart)")


if __name__ == "__main__":
    main()
