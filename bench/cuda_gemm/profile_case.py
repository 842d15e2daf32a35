"""One case of the CUDA delta GEMM, launched a few times outside any graph, for a profiler.

    ncu --clock-control none --kernel-name regex:delta_gemm --launch-skip 2 --launch-count 1 \
        python3 bench/cuda_gemm/profile_case.py --rows 4096 --cols 4096 --bits 2 --batch 1

device_check.sh runs it under Nsight Compute with PROFILE=1, so that the stall reasons,
occupancy and bytes of one decode-sized launch come back beside the benchmark's times.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from bench_cuda_gemm import random_delta
from meswitch import cuda


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--salient-fraction", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--experts", type=int, default=1)
    parser.add_argument("--launches", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    k = max(1, int(args.cols * args.salient_fraction)) if args.salient_fraction > 0 else 0
    deltas = [cuda.to_device(random_delta(args.rows, args.cols, args.bits, args.group_size, k, rng))
              for _ in range(args.experts)]
    per_expert = [args.batch // args.experts + (1 if e < args.batch % args.experts else 0) for e in range(args.experts)]
    table = cuda.segments_from_starts(np.concatenate([[0], np.cumsum(per_expert)]).astype(np.int64))
    x = torch.randn(args.batch, args.cols, device="cuda", dtype=torch.float16)
    out = torch.zeros(args.batch, args.rows, device="cuda", dtype=torch.float32)
    for _ in range(args.launches):
        cuda.multi_delta_matmul(x, deltas, table, out)
    torch.cuda.synchronize()
    print(f"{args.launches} launches of [{args.rows}, {args.cols}] {args.bits}-bit, {args.batch} tokens over "
          f"{args.experts} experts, k = {k}")


if __name__ == "__main__":
    main()
