"""The CUDA delta GEMM against cuBLAS, on a GPU: one mixed batch through one launch per linear.

For each weight shape [out, in] (4096x4096, 4096x14336, 14336x4096), bit width, batch size
(1..32 tokens) and number of experts in the batch (1..8, tokens split evenly), three things are
timed in the same run, on the same random activations:

- ``ours``: meswitch.cuda.multi_delta_matmul, every expert's packed delta in the tile layout,
  one launch for the batch (the segment table is built once, as a forward does for all linears);
- ``f16 loop``: the same deltas stored dense in float16, one cuBLAS GEMM per expert over its
  tokens (torch.addmm): what serving each expert's f16 delta would cost;
- ``base``: the base weight's f16 GEMM over all tokens (one cuBLAS call): the work the delta
  rides along with.

Printed per row: microseconds of each, ``loop/ours`` (goal: >= 4 at batch <= 16), ``ours/base``
(the delta's cost relative to the base GEMM), and the bytes ``ours`` moves (packed deltas,
parameters, salient values, activations, outputs read and written) per second against the
device's peak: the copy bandwidth measured here (a device-to-device copy, read + write) and the
nominal figure given with --peak-gbs (goal: >= 70 % at batch 1).

Timing: each variant is captured in a CUDA graph over enough distinct copies of the weights that
one replay touches more than twice the L2 cache (so weights stream from DRAM, as in serving, not
from L2), replayed after warm-up; the time of one call is the replay time divided by the copies.
Results go to stdout and, with --json, to a file. Needs torch with CUDA and a meswitch built with
CUDA (``./dev.sh cuda-develop``); bench/cuda_gemm/device_check.sh runs it on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from meswitch import cuda

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # [out, in]
BATCHES = [1, 2, 4, 8, 16, 32]
EXPERTS = [1, 2, 4, 8]


def random_delta(rows: int, cols: int, bits: int, group: int, k: int, rng: np.random.Generator) -> dict:
    """A delta in the canonical layout with random codes (any word is valid codes when cols * bits % 32 == 0)."""
    groups = -(-cols // group)
    return {
        "qweight": rng.integers(0, 2**32, size=(rows, cols * bits // 32), dtype=np.uint32),
        "scales": rng.uniform(0.001, 0.01, size=(rows, groups)).astype(np.float16),
        "zeros": rng.integers(0, 1 << bits, size=(rows, groups), dtype=np.uint8),
        "salient_idx": np.sort(rng.choice(cols, size=k, replace=False)).astype(np.int32),
        "salient": rng.uniform(-0.02, 0.02, size=(rows, k)).astype(np.float16),
        "bits": bits, "group_size": group, "cols": cols,
    }


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the reachable peak)."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    stop.record()
    stop.synchronize()
    return 2 * source.numel() * 10 / (start.elapsed_time(stop) * 1e-3)


def graph_time(calls: list, replays: int) -> float:
    """Seconds per call: the calls captured in one CUDA graph, replayed `replays` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up outside the capture (cuBLAS picks its kernels here)
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) * 1e-3 / (replays * len(calls))


class WeightPool:
    """Distinct weights of one shape and width on the device, enough that a graph replay over them
    streams more than twice the L2 cache: `distinct` random deltas (repacked on the host once),
    cloned on the device as often as needed, with their dense f16 forms and f16 base weights."""

    def __init__(self, rows: int, cols: int, bits: int, group: int, k: int, l2_bytes: int,
                 rng: np.random.Generator, distinct: int = 8) -> None:
        self.rows, self.cols, self.l2_bytes, self.distinct = rows, cols, l2_bytes, distinct
        self.deltas = [cuda.to_device(random_delta(rows, cols, bits, group, k, rng)) for _ in range(distinct)]
        self.dense = [cuda.dequantize(d).half() for d in self.deltas]
        self.delta_bytes = self.deltas[0].nbytes
        self.base = [torch.randn(rows, cols, device="cuda", dtype=torch.float16) * 0.01
                     for _ in range(max(1, math.ceil(2 * l2_bytes / (rows * cols * 2))))]

    def _grow(self, items: list, count: int, clone) -> list:
        while len(items) < count:  # the first `distinct` are the random originals, the rest their clones
            items.append(clone(items[len(items) % self.distinct]))
        return items[:count]

    def delta_sets(self, experts: int) -> list[list[cuda.DeviceDelta]]:
        copies = max(1, math.ceil(2 * self.l2_bytes / (experts * self.delta_bytes)))
        flat = self._grow(self.deltas, experts * copies, lambda d: cuda.DeviceDelta(
            d.codes.clone(), d.params.clone(), d.salient_idx.clone(), d.salient.clone(), d.rows, d.cols, d.bits,
            d.group_size, d.name))
        return [flat[i * experts:(i + 1) * experts] for i in range(copies)]

    def dense_sets(self, experts: int) -> list[list[torch.Tensor]]:
        copies = max(1, math.ceil(2 * self.l2_bytes / (experts * self.rows * self.cols * 2)))
        flat = self._grow(self.dense, experts * copies, lambda d: d.clone())
        return [flat[i * experts:(i + 1) * experts] for i in range(copies)]


def run_case(pool: WeightPool, batch: int, experts: int, replays: int) -> dict:
    rows, cols = pool.rows, pool.cols
    per_expert = [batch // experts + (1 if e < batch % experts else 0) for e in range(experts)]
    starts = np.concatenate([[0], np.cumsum(per_expert)]).astype(np.int64)
    table = cuda.segments_from_starts(starts)
    x = torch.randn(batch, cols, device="cuda", dtype=torch.float16)
    out = torch.zeros(batch, rows, device="cuda", dtype=torch.float32)
    out_half = torch.zeros(batch, rows, device="cuda", dtype=torch.float16)

    ours_sets, loop_sets = pool.delta_sets(experts), pool.dense_sets(experts)
    # ours must compute what the dense f16 loop computes: checked once, before timing
    reference = torch.zeros_like(out)
    for e, d in enumerate(pool.dense[:experts]):
        reference[starts[e]:starts[e + 1]] = x[starts[e]:starts[e + 1]].float() @ d.float().T
    cuda.multi_delta_matmul(x, pool.deltas[:experts], table, out)
    error = float((out - reference).abs().max() / reference.abs().max().clamp_min(1e-30))

    def loop_call(weights):
        for e, d in enumerate(weights):
            a, b = int(starts[e]), int(starts[e + 1])
            if b > a:
                torch.addmm(out_half[a:b], x[a:b], d.T, out=out_half[a:b])

    ours = graph_time([lambda s=s: cuda.multi_delta_matmul(x, s, table, out) for s in ours_sets], replays)
    loop = graph_time([lambda w=w: loop_call(w) for w in loop_sets], replays)
    base = graph_time([lambda w=w: torch.matmul(x, w.T, out=out_half) for w in pool.base], replays)
    moved = experts * pool.delta_bytes + x.numel() * 2 + 2 * out.numel() * 4
    return {"rows": rows, "cols": cols, "bits": pool.deltas[0].bits, "batch": batch, "experts": experts,
            "group_size": pool.deltas[0].group_size, "salient": pool.deltas[0].k, "ours_us": ours * 1e6,
            "f16_loop_us": loop * 1e6, "base_us": base * 1e6, "loop_over_ours": loop / ours,
            "ours_over_base": ours / base, "bytes": moved, "gbs": moved / ours / 1e9,
            "relative_error_vs_f16_dense": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--salient-fraction", type=float, default=0.01)
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--experts", type=int, nargs="+", default=EXPERTS)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--peak-gbs", type=float, default=4800.0, help="nominal DRAM bandwidth (H200: 4800 GB/s)")
    parser.add_argument("--json", type=Path, help="write the rows and the summary here")
    args = parser.parse_args()
    if not cuda.is_available() or not torch.cuda.is_available():
        raise SystemExit(f"no CUDA device: {cuda.unavailable_reason() or 'torch sees none'}")

    properties = torch.cuda.get_device_properties(0)
    l2_bytes = int(getattr(properties, "L2_cache_size", 50 << 20))
    copy_gbs = copy_bandwidth() / 1e9
    print(f"device {properties.name}, {properties.multi_processor_count} SMs, L2 {l2_bytes >> 20} MiB; "
          f"copy bandwidth {copy_gbs:.0f} GB/s (read + write), nominal peak {args.peak_gbs:.0f} GB/s")
    header = (f"{'out x in':>12} {'bits':>4} {'batch':>5} {'exp':>3} {'ours us':>8} {'loop us':>8} {'base us':>8} "
              f"{'loop/ours':>9} {'ours/base':>9} {'GB/s':>7} {'%copy':>6} {'%peak':>6} {'err':>8}")
    print(header)
    rng = np.random.default_rng(0)
    rows_out = []
    started = time.time()
    for rows, cols in SHAPES:
        for bits in args.bits:
            pool = WeightPool(rows, cols, bits, args.group_size, max(1, int(cols * args.salient_fraction)), l2_bytes,
                              rng, distinct=max(args.experts))
            for batch in args.batches:
                for experts in args.experts:
                    if experts > batch:
                        continue
                    row = run_case(pool, batch, experts, args.replays)
                    row["percent_of_copy"] = 100 * row["gbs"] / copy_gbs
                    row["percent_of_peak"] = 100 * row["gbs"] / args.peak_gbs
                    rows_out.append(row)
                    print(f"{rows:>5}x{cols:<6} {bits:>4} {batch:>5} {experts:>3} {row['ours_us']:>8.1f} "
                          f"{row['f16_loop_us']:>8.1f} {row['base_us']:>8.1f} {row['loop_over_ours']:>9.2f} "
                          f"{row['ours_over_base']:>9.2f} {row['gbs']:>7.0f} {row['percent_of_copy']:>6.1f} "
                          f"{row['percent_of_peak']:>6.1f} {row['relative_error_vs_f16_dense']:>8.1e}", flush=True)
            del pool
            torch.cuda.empty_cache()
    small = [r for r in rows_out if r["batch"] <= 16]
    single = [r for r in rows_out if r["batch"] == 1]
    summary = {
        "device": properties.name, "copy_gbs": copy_gbs, "peak_gbs": args.peak_gbs, "seconds": time.time() - started,
        "min_loop_over_ours_batch_le_16": min(r["loop_over_ours"] for r in small) if small else None,
        "goal_loop_over_ours": 4.0,
        "min_percent_of_peak_batch_1": min(r["percent_of_peak"] for r in single) if single else None,
        "goal_percent_of_peak_batch_1": 70.0,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows_out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
