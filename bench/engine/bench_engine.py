"""Throughput and latency of the engine under many concurrent clients, against two baselines.

``--clients`` asyncio clients (default 64) each submit one greedy request of ``--tokens``
new tokens (``ignore_eos``), a quarter each for the base and the three bundled experts
(2-bit), and stream it with ``aevents()``, as a server's handlers do. Measured in this run:

* ``engine``: the clients through :class:`meswitch.serve.Engine` (continuous batching);
  tokens per second, time to first token and inter-token latency (p50 / p95);
* ``static``: the same requests as one hand-made batch through ``MultiExpertModel.forward``
  (one prefill, then one decode forward per token, no scheduling, no sampling objects, no
  streaming): the engine's ceiling on this model, so ``engine / static`` is what the
  engine's own work costs;
* ``alone``: ``--alone`` of the requests one after another with ``generate`` (no batching).

    python bench/engine/bench_engine.py --clients 64 --tokens 32 --json bench/engine/results.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from meswitch.serve import Engine, MultiExpertModel, SamplingParams, SequenceInput, generate
from meswitch.serve.server.bundled import bundled_artifacts

EXPERTS = (None, "chat", "math", "code")


def prompt(index: int) -> str:
    return f"Request {index} asks about the river and the old mill"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def run_engine(model: MultiExpertModel, clients: int, tokens: int, max_running: int) -> dict[str, float]:
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

    async def client(engine: Engine, index: int) -> tuple[float, list[float]]:
        start = time.monotonic()
        handle = engine.submit(EXPERTS[index % len(EXPERTS)], prompt(index), params)
        times = [event.time async for event in handle.aevents() if event.token_ids]
        return start, times

    async def main(engine: Engine) -> list[tuple[float, list[float]]]:
        return await asyncio.gather(*(client(engine, index) for index in range(clients)))

    with Engine(model, max_running=max_running) as engine:
        for expert in EXPERTS:  # experts prepared, tokenizers loaded: not part of the measure
            engine.submit(expert, "warm up", SamplingParams(max_tokens=2, temperature=0)).result()
        start = time.perf_counter()
        runs = asyncio.run(main(engine))
        seconds = time.perf_counter() - start
        preempted = engine.stats()["preempted_total"]
    ttft = [times[0] - begin for begin, times in runs]
    gaps = [later - earlier for _, times in runs for earlier, later in itertools.pairwise(times)]
    return {"seconds": seconds, "tokens_per_second": clients * tokens / seconds, "preempted": preempted,
            "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
            "itl_p50": percentile(gaps, 0.5), "itl_p95": percentile(gaps, 0.95)}


def run_static(model: MultiExpertModel, clients: int, tokens: int, max_running: int) -> float:
    """Seconds for the same requests in hand-made batches of ``max_running`` through the model."""
    with Engine(model) as engine:
        prompts = [engine.tokenizer(EXPERTS[i % len(EXPERTS)]).encode(prompt(i)) for i in range(clients)]
    start = time.perf_counter()
    for first in range(0, clients, max_running):
        batch = range(first, min(clients, first + max_running))
        feed = {i: prompts[i] for i in batch}
        for _ in range(tokens):
            rows = model.forward([SequenceInput(i, EXPERTS[i % len(EXPERTS)], feed[i]) for i in batch], last_only=True)
            feed = {i: [int(row[-1].argmax())] for i, row in zip(batch, rows)}
        for i in batch:
            model.free(i)
    return time.perf_counter() - start


def run_alone(model: MultiExpertModel, count: int, tokens: int) -> float:
    """Tokens per second of ``count`` requests one after another."""
    start = time.perf_counter()
    for i in range(count):
        generate(model, EXPERTS[i % len(EXPERTS)], prompt(i), max_tokens=tokens, stop_at_eos=False)
    return count * tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--max-running", type=int, default=32, help="the engine's max_running (its default: 32)")
    parser.add_argument("--alone", type=int, default=8, help="requests run one at a time for the baseline")
    parser.add_argument("--threads", type=int, default=1, help="torch and kernel threads")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MESWITCH_NUM_THREADS", str(args.threads))

    with tempfile.TemporaryDirectory() as work:
        base, compressed = bundled_artifacts(Path(work), report=lambda line: None)  # 2-bit, as `meswitch serve`
        artifacts = {path.name.removesuffix(".meswitch"): path for path in compressed}
        model = MultiExpertModel(base, artifacts, kv_cache_bytes=64 << 20)
        engine = run_engine(model, args.clients, args.tokens, args.max_running)
        static = args.clients * args.tokens / run_static(model, args.clients, args.tokens, args.max_running)
        alone = run_alone(model, args.alone, args.tokens)

    print(f"{args.clients} clients x {args.tokens} tokens, max_running {args.max_running}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}")
    print(f"engine  {engine['tokens_per_second']:8.1f} tokens/s   TTFT p50 {engine['ttft_p50'] * 1e3:7.1f} ms "
          f"p95 {engine['ttft_p95'] * 1e3:7.1f} ms   inter-token p50 {engine['itl_p50'] * 1e3:6.1f} ms "
          f"p95 {engine['itl_p95'] * 1e3:6.1f} ms   preempted {engine['preempted']}")
    print(f"static  {static:8.1f} tokens/s   engine / static {engine['tokens_per_second'] / static:.2f}")
    print(f"alone   {alone:8.1f} tokens/s   engine / alone  {engine['tokens_per_second'] / alone:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"clients": args.clients, "tokens": args.tokens, "threads": args.threads,
                                         "max_running": args.max_running, "engine": engine,
                                         "static_tokens_per_second": static, "alone_tokens_per_second": alone},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
