"""Draw bench_cpu_gemm --json results as a PNG.

    python bench/cpu_gemm/plot.py t1.json t2.json -o docs/img/cpu_gemm.png

Each JSON file is one run (one thread count); the left panel shows the delta kernel's
time relative to the dense bf16 baseline of the same run, the right panel its achieved
bandwidth as a share of the run's measured read bandwidth.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by bench_cpu_gemm --json")
    parser.add_argument("-o", "--output", type=Path, default=Path("cpu_gemm.png"))
    args = parser.parse_args()

    runs = [json.loads(path.read_text()) for path in args.runs]
    labels = [label(row) for row in runs[0]["rows"]]
    positions = np.arange(len(labels))
    width = 0.8 / len(runs)
    figure, (ratio_axis, bandwidth_axis) = plt.subplots(1, 2, figsize=(16, 6.5))
    for i, run in enumerate(runs):
        by_label = {label(row): row for row in run["rows"]}
        rows = [by_label.get(name) for name in labels]
        ratio = [row["delta_ms"] / row["dense_ms"] if row else np.nan for row in rows]
        share = [100 * row["delta_gbs"] / run["read_gbs"] if row else np.nan for row in rows]
        name = f"{run['threads']} thread{'s' if run['threads'] > 1 else ''} ({run['path']})"
        ratio_axis.bar(positions + (i - (len(runs) - 1) / 2) * width, ratio, width, label=name)
        bandwidth_axis.bar(positions + (i - (len(runs) - 1) / 2) * width, share, width,
                           label=f"{name}, read BW {run['read_gbs']:.1f} GB/s")
    ratio_axis.axhline(1.0, color="black", linewidth=0.8)
    ratio_axis.axhline(0.2, color="tab:red", linestyle="--", linewidth=0.8, label="goal batch 1: 0.2x")
    ratio_axis.axhline(0.3, color="tab:purple", linestyle=":", linewidth=0.8, label="goal multi-expert: 0.3x")
    ratio_axis.set_ylabel("delta time / dense bf16 time (lower is better)")
    ratio_axis.set_title("Fused delta GEMM vs dense bf16 GEMM, same shape")
    bandwidth_axis.axhline(70, color="tab:red", linestyle="--", linewidth=0.8, label="goal: 70 %")
    bandwidth_axis.set_ylabel("delta kernel GB/s, % of measured read bandwidth")
    bandwidth_axis.set_title("Achieved bandwidth of the delta kernel")
    for axis in (ratio_axis, bandwidth_axis):
        axis.set_xticks(positions)
        axis.set_xticklabels(labels, fontsize=7, rotation=60, ha="right")
        axis.legend(fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
