"""Load test of ``meswitch serve`` on loopback, against swapping whole FP16 expert models, in one run.

One command: it compresses the bundled family's three experts (2-bit), starts ``meswitch serve``
on a free loopback port as a subprocess, and sends a fixed request list from ``--clients``
concurrent clients (asyncio, ``openai.AsyncOpenAI``): chat and text completions, streamed and
not, addressed to each expert by name and to ``auto`` (the bundled router), every request
generating exactly ``--max-tokens`` tokens (``ignore_eos``, greedy) so both ways produce the
same amount of text. While it runs, ``/metrics`` is read every ``--scrape`` seconds: the store's
host bytes must stay within its budget and the KV cache's used blocks within its size. It
fails (exit 1) on any error or any request lost.

The baseline serves the same requests the way a server without delta serving does: each
expert a whole HF model (transformers ``AutoModelForCausalLM``, read from its FP16 checkpoint,
run in float32 on this CPU), loaded when its turn comes and dropped for the next. Requests
arrive in waves of ``--clients`` (the same concurrency); each wave's requests are grouped by
the expert that answers them (``auto`` resolved by the same router) and each group is
generated as one left-padded batch. Its time to first token is the wave's start to the
group's first generated token.

Printed: a table of output tokens per second and p50 / p99 time to first token (streamed
requests, measured by the client) both ways, and the ratios; ``--json`` writes every figure.

    PYTHONPATH=python python bench/serve/bench_serve.py --json bench/serve/results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import meswitch
from meswitch.family import EXPERTS, family_dir, heldout_dir

#: Where the meswitch this process runs is imported from: the server subprocess imports the same.
PACKAGE_ROOT = Path(meswitch.__file__).resolve().parents[1]

FAMILY = family_dir()
#: Models addressed, in turn: each expert by name and the router.
MODELS = (*EXPERTS, "auto")


@dataclass
class Job:
    """One request of the list."""

    index: int
    model: str
    endpoint: str  # "chat" or "completions"
    stream: bool
    prompt: Any  # chat: a message list; completions: a string
    expert: str = ""  # who answers (auto resolved by the router)


@dataclass
class Outcome:
    """What the client saw of one request."""

    index: int
    model: str = ""
    tokens: int = 0
    ttft: float | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Scrapes:
    """The highest and lowest readings of ``/metrics`` during the run."""

    count: int = 0
    host_bytes_max: float = 0.0
    host_budget: float = 0.0
    kv_used_max: float = 0.0
    kv_total: float = 0.0
    waiting_max: float = 0.0
    running_max: float = 0.0
    violations: list[str] = field(default_factory=list)


def _prompts(seed: int) -> dict[str, list[Any]]:
    """Questions of each domain from the family's held-out sets."""
    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (heldout_dir() / f"{name}.jsonl").read_text().splitlines() if line]

    chat = [[{"role": "user", "content": r["turns"][0]["content"]}] for r in rows("chat") if r["turns"]]
    math = [r["question"] for r in rows("math")]
    code = ["\n".join(r["text"].splitlines()[:6]) + "\n" for r in rows("code")]
    random.Random(seed).shuffle(chat)
    return {"chat": chat, "math": math, "code": code}


def request_list(count: int, seed: int) -> list[Job]:
    """``count`` requests cycling over the models, with a seeded mix of endpoints and streaming."""
    rng = random.Random(seed)
    prompts = _prompts(seed)
    jobs = []
    for index in range(count):
        model = MODELS[index % len(MODELS)]
        domain = model if model != "auto" else ("math", "code", "chat")[(index // len(MODELS)) % 3]
        prompt = prompts[domain][index % len(prompts[domain])]
        if domain == "chat":
            endpoint = "chat"
        elif domain == "math":
            endpoint = rng.choice(("chat", "completions"))
            prompt = [{"role": "user", "content": prompt}] if endpoint == "chat" else prompt + "\n"
        else:
            endpoint = "completions"
        jobs.append(Job(index, model, endpoint, rng.random() < 0.5, prompt))
    return jobs


def resolve_experts(jobs: list[Job]) -> None:
    """Who answers each job: the named expert, or the bundled router's choice for ``auto``."""
    from meswitch.route.router import Router

    router = Router(None, experts=EXPERTS)
    for job in jobs:
        job.expert = job.model if job.model != "auto" else router.route(job.prompt).expert


# -- the server ---------------------------------------------------------------------------------


class ServerProcess:
    """``meswitch serve`` in a subprocess on a free loopback port."""

    def __init__(self, artifacts: dict[str, Path], host_budget: int, kv_cache: int, max_running: int,
                 threads: int, *, base: Path = FAMILY / "base", extra: tuple[str, ...] = ()) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": str(threads), "MESWITCH_NUM_THREADS": str(threads)}
        argv = [sys.executable, "-m", "meswitch.cli", "serve", "--base", str(base),
                "--experts", *map(str, artifacts.values()), "--host", "127.0.0.1", "--port", "0",
                "--host-budget", str(host_budget), "--kv-cache", str(kv_cache), "--max-running", str(max_running),
                *extra]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.url = self._wait_for_url(timeout=600)
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None:
                break
            self.lines.append(line)
            found = re.search(r" at (http://[^\s/]+)/v1", line)
            if line.startswith("serving ") and found:
                return found.group(1)
        self.stop()
        raise RuntimeError("meswitch serve did not start:\n" + "".join(self.lines))

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def peak_rss(self) -> int:
        """The server process's peak resident set size in bytes (VmHWM)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (user + system, all its threads)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def scrape(http: Any, url: str, every: float, scrapes: Scrapes, stop: asyncio.Event) -> None:
    """Read ``/metrics`` until ``stop``; record the extremes and any budget overrun."""
    while not stop.is_set():
        samples = _samples((await http.get(f"{url}/metrics")).text)
        host = samples['meswitch_store_bytes{tier="host"}']
        budget = samples['meswitch_store_budget_bytes{tier="host"}']
        total = samples["meswitch_kv_blocks_total"]
        used = total - samples["meswitch_kv_blocks_free"]
        scrapes.count += 1
        scrapes.host_bytes_max = max(scrapes.host_bytes_max, host)
        scrapes.host_budget = budget
        scrapes.kv_used_max = max(scrapes.kv_used_max, used)
        scrapes.kv_total = total
        scrapes.waiting_max = max(scrapes.waiting_max, samples["meswitch_requests_waiting"])
        scrapes.running_max = max(scrapes.running_max, samples["meswitch_requests_running"])
        if host > budget:
            scrapes.violations.append(f"host bytes {host:.0f} > budget {budget:.0f}")
        if not 0 <= used <= total:
            scrapes.violations.append(f"KV blocks used {used:.0f} of {total:.0f}")
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
        except asyncio.TimeoutError:
            pass


async def one_request(client: Any, job: Job, max_tokens: int) -> Outcome:
    outcome = Outcome(job.index)
    extra = {"ignore_eos": True}
    started = time.perf_counter()
    try:
        if job.endpoint == "chat":
            call = client.chat.completions.create(model=job.model, messages=job.prompt, max_tokens=max_tokens,
                                                  temperature=0, stream=job.stream, extra_body=extra,
                                                  **({"stream_options": {"include_usage": True}} if job.stream else {}))
        else:
            call = client.completions.create(model=job.model, prompt=job.prompt, max_tokens=max_tokens,
                                             temperature=0, stream=job.stream, extra_body=extra,
                                             **({"stream_options": {"include_usage": True}} if job.stream else {}))
        response = await call
        if job.stream:
            async for chunk in response:
                outcome.model = chunk.model
                if chunk.usage is not None:
                    outcome.tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    text = choice.delta.content if job.endpoint == "chat" else choice.text
                    if text and outcome.ttft is None:
                        outcome.ttft = time.perf_counter() - started
        else:
            outcome.model, outcome.tokens = response.model, response.usage.completion_tokens
    except Exception as error:  # noqa: BLE001 - any failure is counted and reported, never hidden
        outcome.error = f"{type(error).__name__}: {error}"
    outcome.seconds = time.perf_counter() - started
    return outcome


async def load_test(url: str, jobs: list[Job], clients: int, max_tokens: int, every: float) -> dict[str, Any]:
    import httpx
    import openai

    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(limits=limits, timeout=600) as http:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", http_client=http, max_retries=0)

        async def worker() -> None:
            while True:
                try:
                    job = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                outcomes.append(await one_request(client, job, max_tokens))

        scrapes, stop = Scrapes(), asyncio.Event()
        scraper = asyncio.ensure_future(scrape(http, url, every, scrapes, stop))
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - started
        stop.set()
        await scraper
        final = _samples((await http.get(f"{url}/metrics")).text)
    return {"outcomes": outcomes, "seconds": seconds, "scrapes": scrapes, "final_metrics": final}


# -- the baseline -------------------------------------------------------------------------------


def baseline(jobs: list[Job], clients: int, max_tokens: int) -> dict[str, Any]:
    """Waves of ``clients`` requests; per wave, each expert's whole HF model in turn, one batch each."""
    import torch
    import transformers
    from meswitch.serve.engine.tokenizer import load_tokenizer
    from meswitch.serve.server.chat import chat_prompt_tokens
    from meswitch.serve.server.protocol import ChatMessage

    transformers.utils.logging.disable_progress_bar()
    tokenizers = {name: load_tokenizer(FAMILY / name) for name in EXPERTS}

    def tokens_of(job: Job) -> list[int]:
        tokenizer = tokenizers[job.expert]
        if job.endpoint == "chat":
            return chat_prompt_tokens(tokenizer, [ChatMessage(**m) for m in job.prompt])
        return tokenizer.encode(job.prompt)

    class FirstToken(transformers.LogitsProcessor):
        """Records when the batch's first token is chosen (after the prefill)."""

        def __init__(self) -> None:
            self.at: float | None = None

        def __call__(self, input_ids, scores):
            if self.at is None:
                self.at = time.perf_counter()
            return scores

    loaded_name, loaded = None, None
    ttfts, loads, load_seconds, generated = [], 0, 0.0, 0
    started = time.perf_counter()
    for wave_start in range(0, len(jobs), clients):
        wave = jobs[wave_start:wave_start + clients]
        arrived = time.perf_counter()
        order = sorted({job.expert for job in wave}, key=lambda name: (name != loaded_name, name))
        for name in order:
            group = [job for job in wave if job.expert == name]
            if name != loaded_name:
                load_start = time.perf_counter()
                loaded = None  # the previous expert leaves memory first: one model resident at a time
                loaded = transformers.AutoModelForCausalLM.from_pretrained(FAMILY / name, dtype=torch.float32).eval()
                load_seconds += time.perf_counter() - load_start
                loaded_name, loads = name, loads + 1
            batch = [tokens_of(job) for job in group]
            width = max(len(t) for t in batch)
            ids = torch.tensor([[0] * (width - len(t)) + t for t in batch])
            mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in batch])
            first = FirstToken()
            with torch.no_grad():
                out = loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                      min_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                                      logits_processor=transformers.LogitsProcessorList([first]))
            generated += (out.shape[1] - width) * len(group)
            ttfts += [first.at - arrived] * sum(job.stream for job in group)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": generated, "ttft": ttfts, "loads": loads, "load_seconds": load_seconds}


# -- the report -----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=192, help="requests in the list (default 192)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens each request generates (default 32)")
    parser.add_argument("--host-budget", default=None,
                        help="the store's host budget in bytes (default: room for two of the three experts, so "
                             "that serving all three evicts)")
    parser.add_argument("--kv-cache", type=int, default=64 << 20, help="KV cache bytes (default 64 MiB)")
    parser.add_argument("--max-running", type=int, default=64, help="sequences per forward (default 64)")
    parser.add_argument("--scrape", type=float, default=0.25, help="seconds between /metrics reads")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and kernel threads of the server and of the baseline (default 1: on a shared "
                             "2-core machine a second thread spins against the clients)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true", help="only the load test")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    import torch
    from meswitch.compress import CompressionSettings, compress
    from meswitch.ops import cpu_kernel_path

    torch.set_num_threads(args.threads)
    jobs = request_list(args.requests, args.seed)
    resolve_experts(jobs)
    with tempfile.TemporaryDirectory() as scratch:
        artifacts = {}
        for name in EXPERTS:
            artifacts[name] = Path(scratch) / f"{name}.meswitch"
            compress(FAMILY / "base", FAMILY / name, artifacts[name], settings=CompressionSettings(bits=2),
                     progress=False)
        sizes = sorted(sum(p.stat().st_size for p in a.rglob("*") if p.is_file()) for a in artifacts.values())
        host_budget = int(args.host_budget) if args.host_budget else sizes[-1] + sizes[-2] + sizes[-1] // 2
        print(f"{len(jobs)} requests, {args.clients} clients, {args.max_tokens} tokens each; host budget "
              f"{host_budget / 2**20:.2f} MiB (experts {', '.join(f'{s / 2**20:.2f}' for s in sizes)} MiB on disk)",
              flush=True)
        server = ServerProcess(artifacts, host_budget, args.kv_cache, args.max_running, args.threads)
        try:
            print(f"server at {server.url}; load test ...", flush=True)
            server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
            run = asyncio.run(load_test(server.url, jobs, args.clients, args.max_tokens, args.scrape))
            server_cpu, client_cpu = server.cpu_seconds() - server_cpu, time.process_time() - client_cpu
        finally:
            status = server.stop()
    outcomes: list[Outcome] = run["outcomes"]
    scrapes: Scrapes = run["scrapes"]
    errors = [o for o in outcomes if o.error]
    by_index = {o.index: o for o in outcomes}
    lost = [job.index for job in jobs if job.index not in by_index]
    wrong = [o.index for o in outcomes if not o.error and (o.tokens != args.max_tokens
                                                          or o.model != jobs[o.index].expert)]
    tokens = sum(o.tokens for o in outcomes if not o.error)
    stream_ttft = [o.ttft for o in outcomes if o.ttft is not None]
    final = run["final_metrics"]
    meswitch = {"seconds": run["seconds"], "tokens": tokens, "tokens_per_s": tokens / run["seconds"],
                "ttft_p50_s": percentile(stream_ttft, 50), "ttft_p99_s": percentile(stream_ttft, 99),
                "latency_p50_s": percentile([o.seconds for o in outcomes], 50),
                "latency_p99_s": percentile([o.seconds for o in outcomes], 99),
                "errors": len(errors), "lost": len(lost), "wrong": len(wrong), "server_exit": status,
                "store": {"host_budget": scrapes.host_budget, "host_bytes_max": scrapes.host_bytes_max,
                          "evictions": final.get("meswitch_store_evictions_total"),
                          "loads": final.get("meswitch_store_loads_total"),
                          "hits": final.get("meswitch_store_hits_total"),
                          "misses": final.get("meswitch_store_misses_total")},
                "kv": {"blocks_total": scrapes.kv_total, "blocks_used_max": scrapes.kv_used_max},
                "queue": {"waiting_max": scrapes.waiting_max, "running_max": scrapes.running_max,
                          "preemptions": final.get("meswitch_preemptions_total")},
                "scrapes": scrapes.count, "violations": scrapes.violations,
                "cpu_seconds": {"server": server_cpu, "clients": client_cpu}}
    results: dict[str, Any] = {
        "machine": {"cpu_kernel_path": cpu_kernel_path(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {
            "host_budget": host_budget},
        "meswitch": meswitch,
        "requests": [asdict(o) for o in sorted(outcomes, key=lambda o: o.index)],
    }
    print(f"CPU kernel path {cpu_kernel_path()}, {os.cpu_count()} CPUs; server and clients share them "
          f"(CPU seconds during the load test: server {server_cpu:.1f}, clients {client_cpu:.1f}, "
          f"over {run['seconds']:.1f} s)")
    rows = [("meswitch serve (one engine, 2-bit deltas)", meswitch["tokens_per_s"], meswitch["ttft_p50_s"],
             meswitch["ttft_p99_s"])]
    if not args.no_baseline:
        print("baseline: whole FP16 HF models swapped per expert ...", flush=True)
        swap = baseline(jobs, args.clients, args.max_tokens)
        swap |= {"tokens_per_s": swap["tokens"] / swap["seconds"], "ttft_p50_s": percentile(swap["ttft"], 50),
                 "ttft_p99_s": percentile(swap["ttft"], 99)}
        results["swap"] = {k: v for k, v in swap.items() if k != "ttft"}
        rows.append((f"swap whole HF models ({swap['loads']} loads, {swap['load_seconds']:.1f} s)",
                     swap["tokens_per_s"], swap["ttft_p50_s"], swap["ttft_p99_s"]))
        results["ratios"] = {"tokens_per_s": meswitch["tokens_per_s"] / swap["tokens_per_s"],
                             "ttft_p50": meswitch["ttft_p50_s"] / swap["ttft_p50_s"],
                             "ttft_p99": meswitch["ttft_p99_s"] / swap["ttft_p99_s"]}
    print("\n| way | output tokens/s | TTFT p50 (s) | TTFT p99 (s) |\n|---|---:|---:|---:|")
    for name, rate, p50, p99 in rows:
        print(f"| {name} | {rate:.1f} | {p50:.3f} | {p99:.3f} |")
    if "ratios" in results:
        ratios = results["ratios"]
        print(f"\nmeswitch / swap: {ratios['tokens_per_s']:.2f}x tokens/s, TTFT p50 {ratios['ttft_p50']:.2f}x, "
              f"p99 {ratios['ttft_p99']:.2f}x (lower TTFT is better)")
    print(f"\n{len(outcomes)} of {len(jobs)} answered, {len(errors)} errors, {len(lost)} lost, {len(wrong)} with the "
          f"wrong expert or length; {scrapes.count} /metrics reads: host bytes <= {scrapes.host_bytes_max / 2**20:.2f}"
          f" MiB of {scrapes.host_budget / 2**20:.2f} MiB budget, KV blocks used <= {scrapes.kv_used_max:.0f} of "
          f"{scrapes.kv_total:.0f}, waiting <= {scrapes.waiting_max:.0f}, running <= {scrapes.running_max:.0f}; "
          f"store evictions {meswitch['store']['evictions']:.0f}, loads {meswitch['store']['loads']:.0f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    failures = [f"{o.index}: {o.error}" for o in errors[:5]] + scrapes.violations[:5]
    if lost:
        failures.append(f"requests lost: {lost[:10]}")
    if wrong:
        failures.append(f"requests with the wrong expert or length: {wrong[:10]}")
    if status != 0:
        failures.append(f"the server exited with {status}:\n{''.join(server.lines[-20:])}")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
