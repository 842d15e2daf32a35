"""Router latency: 300-character queries, C++ direct (bench_router) and through Python.

Queries are cut from the held-out sets (GSM8K test, HumanEval, chitchat first turns, the
instruction set): each is its source text repeated to at least 300 characters and cut at 300.
Everything runs on one core (``taskset`` to the first CPU this process may use).

    PYTHONPATH=python python bench/router/bench_router.py --cpp build/bench/bench/router/bench_router
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from meswitch.family.train import REPO_ROOT
from meswitch.route import Router, default_router_dir
from meswitch.route.evaluate import heldout_sets


def queries_300(count: int) -> list[str]:
    texts = [t for examples in heldout_sets(REPO_ROOT).values() for t, _ in examples if t.strip()]
    out = []
    for i in range(count):
        text = texts[(i * 7919) % len(texts)]
        out.append((text * (300 // max(1, len(text)) + 1))[:300])
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router", type=Path, default=default_router_dir())
    parser.add_argument("--cpp", type=Path, help="the bench_router executable")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    print(f"cpu: {cpu_name()} (core {core}); python {platform.python_version()}; router {args.router}")
    queries = queries_300(args.queries)
    results = []
    if args.cpp:
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as stream:
            stream.writelines(json.dumps(q) + "\n" for q in queries)
        command = ["taskset", "-c", str(core), str(args.cpp), str(args.router), stream.name, str(args.rounds)]
        results.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
        os.unlink(stream.name)

    router = Router(args.router)
    for query in queries:
        router.route(query)
    micros = []
    started = time.perf_counter()
    for _ in range(max(1, args.rounds // 4)):
        for query in queries:
            begin = time.perf_counter()
            router.route(query)
            micros.append((time.perf_counter() - begin) * 1e6)
    seconds = time.perf_counter() - started
    micros.sort()
    results.append({"path": "Python meswitch.Router.route", "queries": len(micros), "mean_bytes": 300,
                    "p50_us": round(statistics.median(micros), 2), "p99_us": round(micros[int(0.99 * (len(micros) - 1))], 2),
                    "queries_per_second": round(len(micros) / seconds)})
    batch_started = time.perf_counter()
    router.route_batch(queries)
    batch = time.perf_counter() - batch_started
    results.append({"path": "Python meswitch.Router.route_batch", "queries": len(queries),
                    "queries_per_second": round(len(queries) / batch)})
    for result in results:
        result.pop("sink", None)
        print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
