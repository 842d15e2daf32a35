"""Dense bf16 GEMM/GEMV through PyTorch (oneDNN) for the shapes of bench_cpu_gemm.

    MESWITCH_NUM_THREADS=1 python bench/cpu_gemm/bench_torch_dense.py --json torch1.json

The strongest dense baseline this machine has at several tokens: ``torch.nn.functional.linear``
on bf16 weights and activations. Same shapes, token counts and cache-defeating rotation
through weight copies (>= 192 MiB) as bench_cpu_gemm; median seconds per call. plot.py
and docs/benchmarks.md set the delta kernel against the faster of this and the C++
run's own dense loop.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROTATE_BYTES = 192 << 20
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


def median_ms(call, copies: int, min_seconds: float = 0.4, min_calls: int = 20, fastest: bool = False) -> float:
    """Median milliseconds per call (the fastest call with ``fastest``) over ``copies`` rotating weights."""
    for i in range(copies):
        call(i)
    samples, start, i = [], time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds or len(samples) < min_calls:
        t0 = time.perf_counter()
        call(i % copies)
        samples.append(time.perf_counter() - t0)
        i += 1
    samples.sort()
    return 1e3 * (samples[0] if fastest else samples[len(samples) // 2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="first shape only")
    args = parser.parse_args()
    threads = int(os.environ.get("MESWITCH_NUM_THREADS") or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows_out = []
    print(f"torch {torch.__version__}, {threads} thread(s), bf16 F.linear")
    print("| shape (out x in) | tokens | dense bf16 ms |\n|---|---:|---:|")
    for rows, cols in SHAPES[:1] if args.quick else SHAPES:
        copies = max(2, ROTATE_BYTES // (rows * cols * 2) + 1)
        weights = [(torch.randn(rows, cols) * 0.02).to(torch.bfloat16) for _ in range(copies)]
        for tokens in (1, 2, 4, 16):
            x = torch.randn(tokens, cols).to(torch.bfloat16)
            with torch.no_grad():
                ms = median_ms(lambda i: torch.nn.functional.linear(x, weights[i]), copies)
            rows_out.append({"shape": f"{rows}x{cols}", "tokens": tokens, "dense_ms": ms})
            print(f"| {rows}x{cols} | {tokens} | {ms:.3f} |")
        del weights
    if args.json:
        args.json.write_text(json.dumps({"threads": threads, "torch": torch.__version__, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
