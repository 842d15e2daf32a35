"""Turn bench_cpu_gemm --json runs (and optional PyTorch dense runs) into a table and a PNG.

    python bench/cpu_gemm/plot.py t1d2.json t2d2.json t1d1.json t2d1.json \
        --torch torch1.json torch2.json -o docs/img/cpu_gemm.png > table.md

Each C++ JSON file is one run (thread count, activation digits); each --torch file the
dense bf16 ``F.linear`` times of bench_torch_dense.py at one thread count. The baseline
of every row is the faster dense bf16 GEMM of the two (the C++ run's own loop or
PyTorch's at the same thread count; for 8 tokens over 4 experts, four 2-token GEMMs).
Prints a markdown table; the left panel plots the delta kernel's time relative to that
baseline, the right panel its bandwidth as a share of the run's measured read bandwidth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def label(row: dict) -> str:
    if row["kind"] == "multi":
        return f"{row['shape']} 8 tok / 4 experts"
    return f"{row['shape']} {row['bits']}-bit T={row['tokens']}"


def run_name(run: dict) -> str:
    threads = f"{run['threads']} thread{'s' if run['threads'] > 1 else ''}"
    digits = f", {run['activation_digits']} digit{'s' if run['activation_digits'] > 1 else ''}" \
        if run["path"] in ("avx512vnni", "avx2int") else ""
    return f"{threads}, {run['path']}{digits}"


def torch_dense_ms(torch_runs: dict[int, dict], threads: int, row: dict) -> float:
    """PyTorch's time for the same work as `row`, or inf when not measured."""
    run = torch_runs.get(threads)
    if run is None:
        return float("inf")
    times = {(r["shape"], r["tokens"]): r["dense_ms"] for r in run["rows"]}
    if row["kind"] == "multi":
        return 4 * times.get((row["shape"], 2), float("inf"))
    return times.get((row["shape"], row["tokens"]), float("inf"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by bench_cpu_gemm --json")
    parser.add_argument("--torch", nargs="*", type=Path, default=[], help="JSON files of bench_torch_dense.py")
    parser.add_argument("-o", "--output", type=Path, default=Path("cpu_gemm.png"))
    args = parser.parse_args()

    runs = [json.loads(path.read_text()) for path in args.runs]
    torch_runs = {run["threads"]: run for run in (json.loads(path.read_text()) for path in args.torch)}
    labels = [label(row) for row in runs[0]["rows"]]
    positions = np.arange(len(labels))
    width = 0.8 / len(runs)
    figure, (ratio_axis, bandwidth_axis) = plt.subplots(1, 2, figsize=(16, 6.5))
    print("| case | run | delta ms | own dense ms | torch dense ms | delta / best dense | delta GB/s | % of read BW |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for i, run in enumerate(runs):
        by_label = {label(row): row for row in run["rows"]}
        ratio, share = [], []
        for name in labels:
            row = by_label.get(name)
            if row is None:
                ratio.append(np.nan)
                share.append(np.nan)
                continue
            torch_ms = torch_dense_ms(torch_runs, run["threads"], row)
            best = min(row["dense_ms"], torch_ms)
            ratio.append(row["delta_ms"] / best)
            share.append(100 * row["delta_gbs"] / run["read_gbs"])
            torch_text = f"{torch_ms:.3f}" if np.isfinite(torch_ms) else "-"
            print(f"| {name} | {run_name(run)} | {row['delta_ms']:.3f} | {row['dense_ms']:.3f} | {torch_text} | "
                  f"**{ratio[-1]:.3f}x** | {row['delta_gbs']:.1f} | {share[-1]:.0f} % |")
        offset = (i - (len(runs) - 1) / 2) * width
        ratio_axis.bar(positions + offset, ratio, width, label=run_name(run))
        bandwidth_axis.bar(positions + offset, share, width,
                           label=f"{run_name(run)}, read BW {run['read_gbs']:.1f} GB/s")
    ratio_axis.axhline(1.0, color="black", linewidth=0.8)
    ratio_axis.axhline(0.2, color="tab:red", linestyle="--", linewidth=0.8, label="goal batch 1: 0.2x")
    ratio_axis.axhline(0.3, color="tab:purple", linestyle=":", linewidth=0.8, label="goal multi-expert: 0.3x")
    ratio_axis.set_ylabel("delta time / best dense bf16 time (lower is better)")
    ratio_axis.set_title("Fused delta GEMM vs the faster dense bf16 GEMM (own loop or PyTorch)")
    bandwidth_axis.axhline(70, color="tab:red", linestyle="--", linewidth=0.8, label="goal: 70 %")
    bandwidth_axis.set_ylabel("delta kernel GB/s, % of measured read bandwidth")
    bandwidth_axis.set_title("Achieved bandwidth of the delta kernel")
    for axis in (ratio_axis, bandwidth_axis):
        axis.set_xticks(positions)
        axis.set_xticklabels(labels, fontsize=7, rotation=60, ha="right")
        axis.legend(fontsize=7)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=110)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
