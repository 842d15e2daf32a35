"""The base GEMM on the CPU: float32 activations times a 16-bit weight, the ways torch offers.

For a weight of ``--rows`` x ``--cols`` in bfloat16 and float16 and 1, 8 and 16 tokens, it
times (best of ``--repeats``) and checks against a float64 product:

* ``base_matmul``: ``meswitch.serve.engine.base_matmul`` (the weight widened a cache-sized slab of
  rows at a time, float32 GEMMs);
* ``round_x``: ``(x.to(w.dtype) @ w.T).float()``, the activations rounded to 16 bit;
* ``widen_all``: ``x @ w.float().T``, the whole weight widened per call;
* ``float32``: ``x @ w32.T`` with a resident float32 copy, the memory-hungry bound.

Error: max |y - y64| / max |y64| (y64: x and the 16-bit weight in float64). It prints one
line per case and ``--json`` writes them.

    python bench/base_gemm/bench_base_gemm.py --json bench/base_gemm/results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import timeit
from pathlib import Path

import torch
from meswitch.serve.engine.base_matmul import base_matmul


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5632)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    weight32 = torch.randn(args.rows, args.cols, generator=generator) * 0.02
    results = []
    for dtype in (torch.bfloat16, torch.float16):
        weight = weight32.to(dtype)
        for tokens in args.tokens:
            x = torch.randn(tokens, args.cols, generator=generator)
            exact = x.double() @ weight.double().T
            ways = {
                "base_matmul": lambda: base_matmul(x, weight),
                "round_x": lambda: (x.to(weight.dtype) @ weight.T).float(),
                "widen_all": lambda: x @ weight.float().T,
                "float32": lambda: x @ weight32.T,
            }
            for way, function in ways.items():
                reference = exact if way != "float32" else x.double() @ weight32.double().T
                error = float((function().double() - reference).abs().max() / reference.abs().max())
                seconds = min(timeit.repeat(function, repeat=args.repeats, number=1))  # after the warm-up above
                row = {"dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "way": way,
                       "ms": round(seconds * 1e3, 3), "weight_gb_per_s": round(weight.numel() * 2 / seconds / 1e9, 2),
                       "relative_error": float(f"{error:.2e}")}
                results.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        meta = {"rows": args.rows, "cols": args.cols, "threads": args.threads, "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.processor()}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
