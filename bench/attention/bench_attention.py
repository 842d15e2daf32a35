"""One layer of paged attention: the batched path against the per-sequence loop it replaced.

Mistral-7B's attention shape (32 query heads over 8 key/value heads of 128 channels), a
bfloat16 paged cache of 16-token blocks, and two steps an engine runs:

* ``decode``: ``--sequences`` sequences with random cached lengths in ``[100, 600)``, one new
  token each (one width class: one ``scaled_dot_product_attention`` call);
* ``mixed``: the same decodes and one ``--chunk``-token prefill chunk (two width classes).

It times (best of ``--repeats``) :func:`meswitch.serve.engine.attention.paged_attention` with its
layout built once (as a forward builds it once for every layer; the build is timed apart)
and :func:`~meswitch.serve.engine.attention.reference_paged_attention`, and checks they agree.

    python bench/attention/bench_attention.py --json bench/attention/results.json
"""

from __future__ import annotations

import argparse
import json
import timeit
from pathlib import Path

import torch
from meswitch.serve.engine.attention import AttentionBatch, paged_attention, reference_paged_attention
from meswitch.serve.engine.kv_cache import PagedKVCache

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _best_ms(function, repeats: int) -> float:
    function()  # warm-up
    return min(timeit.repeat(function, repeat=repeats, number=1)) * 1e3


def run(scenario: str, sequences: int, chunk: int, repeats: int, generator: torch.Generator) -> dict:
    cache = PagedKVCache(1, KV_HEADS, HEAD_DIM, budget_bytes=2 << 30, block_size=16, dtype=torch.bfloat16)
    names: list[object] = list(range(sequences))
    for name in names:
        length = int(torch.randint(100, 600, (1,), generator=generator))
        cache.reserve({name: length})
        slots = cache.slots(name, 0, length)
        shape = (length, KV_HEADS, HEAD_DIM)
        cache.write(0, slots, torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
    counts = [1] * sequences
    if scenario == "mixed":
        names.append("prefill")
        counts.append(chunk)
    starts = [cache.length(name) for name in names]
    cache.reserve(dict(zip(names, counts)))
    queries = torch.randn(sum(counts), HEADS, HEAD_DIM, generator=generator)
    every_slot = [cache.slots(name, 0, start + count) for name, start, count in zip(names, starts, counts)]
    batch = AttentionBatch.build(cache, names, starts, counts)
    difference = (paged_attention(queries, cache, 0, batch)
                  - reference_paged_attention(queries, cache, 0, every_slot, starts, counts)).abs().max()
    return {"scenario": scenario, "sequences": len(names), "new_tokens": sum(counts),
            "width_classes": len(batch.classes),
            "batched_ms": round(_best_ms(lambda: paged_attention(queries, cache, 0, batch), repeats), 2),
            "layout_build_ms": round(_best_ms(lambda: AttentionBatch.build(cache, names, starts, counts), repeats), 2),
            "reference_ms": round(_best_ms(lambda: reference_paged_attention(queries, cache, 0, every_slot, starts,
                                                                             counts), repeats), 2),
            "max_abs_difference": float(f"{float(difference):.2e}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk of the mixed step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    results = [run(scenario, args.sequences, args.chunk, args.repeats, generator) for scenario in ("decode", "mixed")]
    for row in results:
        print(json.dumps(row), flush=True)
    if args.json:
        meta = {"threads": args.threads, "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
