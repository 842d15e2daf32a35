"""PyTorch's GEMMs of the cases of a bench_dense_gemm run, and the table with the goals.

    MESWITCH_NUM_THREADS=2 build/bench/bench/cpu_gemm/bench_dense_gemm --json dense.json
    MESWITCH_NUM_THREADS=2 python bench/cpu_gemm/bench_dense_report.py dense.json [--json report.json]

For every shape and token count of the C++ run: ``x @ W.T`` in float32 (float32 weights)
and in bf16 (bf16 weights and activations) through torch at the run's thread count, with
the same rotation through weight copies (>= 192 MiB) and the same timing: the fastest of
at least 10 calls and 0.3 s (on a busy shared machine the fastest call is the one that ran
alone). The baseline of a row is the faster of the two. Prints a markdown table (ours
against the baseline, share of the read bandwidth and of the roofline the C++ run
measured) and whether each goal is met.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_torch_dense import ROTATE_BYTES, median_ms  # same directory: run as a script

READ_BANDWIDTH_GOAL = 0.80  # 1 token: share of the measured read bandwidth
ROOFLINE_GOAL = 0.70  # 8 and 16 tokens: share of the roofline
TORCH_FLOAT32_GOAL = 3.0  # 8 and 16 tokens: times faster than torch's float32 GEMM


def torch_baselines(rows: int, cols: int, token_counts: list[int]) -> dict[int, dict[str, float]]:
    """``{tokens: {"float32": ms, "bfloat16": ms}}`` of ``x @ W.T`` for one shape."""
    generator = torch.Generator().manual_seed(0)
    found: dict[int, dict[str, float]] = {tokens: {} for tokens in token_counts}
    for dtype in (torch.float32, torch.bfloat16):
        bytes_per_copy = rows * cols * (4 if dtype == torch.float32 else 2)
        copies = max(2, ROTATE_BYTES // bytes_per_copy + 1)
        weights = [(torch.randn(rows, cols, generator=generator) * 0.02).to(dtype) for _ in range(copies)]
        for tokens in token_counts:
            x = torch.randn(tokens, cols, generator=generator).to(dtype)
            with torch.no_grad():
                ms = median_ms(lambda i: x @ weights[i].T, copies, min_seconds=0.3, min_calls=10,
                               fastest=True)
            found[tokens][str(dtype).removeprefix("torch.")] = ms
        del weights
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense", type=Path, help="bench_dense_gemm --json output")
    parser.add_argument("--json", type=Path, help="write the merged results here")
    args = parser.parse_args()
    run = json.loads(args.dense.read_text())
    torch.set_num_threads(run["threads"])
    shapes: dict[tuple[int, int], list[int]] = {}
    for row in run["rows"]:
        shapes.setdefault((row["rows"], row["cols"]), [])
        if row["tokens"] not in shapes[(row["rows"], row["cols"])]:
            shapes[(row["rows"], row["cols"])].append(row["tokens"])
    baselines = {shape: torch_baselines(*shape, tokens) for shape, tokens in shapes.items()}

    print(f"CPU: {run['cpu']}; path {run['path']}; {run['threads']} thread(s); torch {torch.__version__}; "
          f"read bandwidth {run['read_gbs']:.1f} GB/s; {run['fma_per_s'] / 1e9:.2f} G vector FMAs/s "
          f"({run['lanes']} lanes)\n")
    print("| shape (out x in) | weight | tokens | ms | torch f32 ms | torch bf16 ms | vs faster torch | vs torch f32 "
          "| GB/s | % of read BW | % of roofline |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    goals = []
    for row in run["rows"]:
        torch_ms = baselines[(row["rows"], row["cols"])][row["tokens"]]
        row["torch_float32_ms"], row["torch_bfloat16_ms"] = torch_ms["float32"], torch_ms["bfloat16"]
        baseline = min(torch_ms.values())
        bandwidth_share = row["gbs"] / run["read_gbs"]
        roofline_share = row["roofline_ms"] / row["ms"]
        print(f"| {row['shape']} | {row['dtype']} | {row['tokens']} | {row['ms']:.3f} | {torch_ms['float32']:.3f} | "
              f"{torch_ms['bfloat16']:.3f} | {baseline / row['ms']:.1f}x | {torch_ms['float32'] / row['ms']:.1f}x | "
              f"{row['gbs']:.1f} | {100 * bandwidth_share:.0f} % | {100 * roofline_share:.0f} % |")
        case = f"{row['shape']} {row['dtype']} {row['tokens']} token(s)"
        if row["tokens"] == 1:
            goals.append((case, "read bandwidth", bandwidth_share, READ_BANDWIDTH_GOAL))
        if row["tokens"] in (8, 16):
            goals.append((case, "roofline", roofline_share, ROOFLINE_GOAL))
            goals.append((case, "x torch float32", torch_ms["float32"] / row["ms"], TORCH_FLOAT32_GOAL))
    print("\nGoals: 1 token >= 80 % of the read bandwidth; 8 and 16 tokens >= 70 % of the roofline and "
          ">= 3x torch's float32 GEMM.\n")
    missed = [goal for goal in goals if goal[2] < goal[3]]
    met = len(goals) - len(missed)
    print(f"{met} of {len(goals)} goals met." + (" Missed:" if missed else ""))
    for case, what, value, goal in missed:
        shown = f"{value:.2f}x (goal {goal:.0f}x)" if what.startswith("x ") else \
            f"{100 * value:.0f} % of the {what} (goal {100 * goal:.0f} %)"
        print(f"- {case}: {shown}")
    if args.json:
        args.json.write_text(json.dumps({**run, "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
