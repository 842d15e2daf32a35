"""Many experts over a realistic base through ``meswitch serve``, against the same models held
resident as whole HF models, in one run.

The benchmark writes its own models: a Llama-shaped base (default hidden 2048, MLP 5632, 16
layers, 32 query and 4 key/value heads, a 32,000-word vocabulary: about 0.84 B parameters) with
random weights in bf16, and three experts, each the base plus a small random dense delta on every
linear of the decoder, as real HF checkpoints (``config.json``, safetensors, a word-level
``tokenizer.json``) in a temporary directory. The experts are compressed at 2 bits + 1 % salient
(round to nearest: random weights have no calibration text).

For 1, 2 and 4 requests per model (4, 8 and 16 in flight over the base and the three experts),
every request streamed, greedy, ``--max-tokens`` new tokens each (``ignore_eos``), all sent at
once through the official ``openai`` client:

- ``meswitch serve`` over the base and the three compressed experts (one engine, one forward per
  step for every model's sequences);
- with ``--dense-experts``, the same server over the experts compressed with every input channel
  kept in 16 bit (the same runner with dense deltas);
- the four models resident as HF models (transformers, the same process as the benchmark), in
  float32 and in bf16: each model's requests one batch (``generate``), the models one after
  another. The faster of the two dtypes is the baseline.

Printed per level: output tokens per second, p50 time to first token and p50 time between tokens
(the decode step as a client sees it), and the ratios; the server's peak RSS against the four
models' bf16 weights; the decode step at one request per model against the time to read its
weight bytes (the base once and every expert's artifact) at the read bandwidth measured in the
same run. ``--json`` writes every figure.

    PYTHONPATH=python python bench/serve_scale/bench_serve_scale.py --json bench/serve_scale/results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from bench_serve import ServerProcess, percentile  # the server as a subprocess on loopback

EXPERT_NAMES = ("alpha", "beta", "gamma")
MODELS = ("base", *EXPERT_NAMES)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Shape:
    """A Llama decoder's sizes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's name and shape, as a LlamaForCausalLM stores them."""
        kv = self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        for layer in range(self.layers):
            prefix = f"model.layers.{layer}."
            shapes |= {prefix + "input_layernorm.weight": (self.hidden,),
                       prefix + "post_attention_layernorm.weight": (self.hidden,),
                       prefix + "self_attn.q_proj.weight": (self.hidden, self.hidden),
                       prefix + "self_attn.k_proj.weight": (kv, self.hidden),
                       prefix + "self_attn.v_proj.weight": (kv, self.hidden),
                       prefix + "self_attn.o_proj.weight": (self.hidden, self.hidden),
                       prefix + "mlp.gate_proj.weight": (self.intermediate, self.hidden),
                       prefix + "mlp.up_proj.weight": (self.intermediate, self.hidden),
                       prefix + "mlp.down_proj.weight": (self.hidden, self.intermediate)}
        return shapes | {"model.norm.weight": (self.hidden,), "lm_head.weight": (self.vocab, self.hidden)}

    def parameters(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.tensors().values())

    def config(self) -> dict[str, Any]:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
                "vocab_size": self.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
                "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16", "attention_bias": False,
                "mlp_bias": False}


# -- the models ---------------------------------------------------------------------------------------


def write_tokenizer(directory: Path, vocab: int) -> None:
    """A word-level tokenizer of ``vocab`` words (``w3`` ... and three special tokens), saved as HF files."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(directory)


def write_family(root: Path, shape: Shape, delta_std: float, seed: int) -> dict[str, Path]:
    """The base and the experts as HF model directories under ``root``: name -> directory."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    base = {}
    for name, size in shape.tensors().items():
        if len(size) == 1:
            base[name] = torch.ones(size, dtype=torch.bfloat16)
        else:
            base[name] = (torch.randn(size, generator=generator) * 0.02).to(torch.bfloat16)
    directories = {}
    for model in MODELS:
        directory = directories[model] = root / model
        directory.mkdir(parents=True)
        tensors = base
        if model != "base":  # the base plus a small dense delta on every linear of the decoder
            tensors = {name: (value.float() + torch.randn(value.shape, generator=generator) * delta_std)
                       .to(torch.bfloat16) if name.removesuffix(".weight").endswith(LINEARS) else value
                       for name, value in base.items()}
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(shape.config(), indent=2))
        write_tokenizer(directory, shape.vocab)
        print(f"  wrote {model} ({sum(p.stat().st_size for p in directory.iterdir()) / 1e9:.2f} GB)", flush=True)
    return directories


def compress_experts(directories: dict[str, Path], root: Path, salient: float) -> dict[str, Path]:
    """Each expert compressed at 2 bits with ``salient`` of its input channels in 16 bit."""
    from meswitch.compress import CompressionSettings, compress

    artifacts = {}
    for name in EXPERT_NAMES:
        artifacts[name] = root / f"{name}.meswitch"
        started = time.perf_counter()
        compress(directories["base"], directories[name], artifacts[name], progress=False,
                 settings=CompressionSettings(bits=2, salient=salient, method="rtn"))
        print(f"  compressed {name} at 2 bits + {salient:.0%} salient in {time.perf_counter() - started:.0f} s "
              f"({directory_bytes(artifacts[name]) / 1e6:.0f} MB)", flush=True)
    return artifacts


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prompts(count: int, length: int, vocab: int, seed: int) -> list[str]:
    """``count`` prompts of ``length`` random words each."""
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(3, vocab, size=length)) for _ in range(count)]


def read_bandwidth(threads: int) -> float:
    """Bytes per second a reduction over a 1 GiB float32 tensor reads (best of five)."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best


# -- meswitch serve ---------------------------------------------------------------------------------


@dataclass
class Stream:
    """What a client saw of one streamed request."""

    model: str
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] | None = None
    error: str | None = None
    answered_by: str = ""


async def streamed(client: Any, model: str, prompt: str, max_tokens: int) -> Stream:
    outcome, stamps = Stream(model), []
    started = time.perf_counter()
    try:
        response = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                   stream=True, stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True})
        async for chunk in response:
            outcome.answered_by = chunk.model
            if chunk.usage is not None:
                outcome.tokens = chunk.usage.completion_tokens
            if any(choice.text for choice in chunk.choices):
                stamps.append(time.perf_counter())
    except Exception as error:  # noqa: BLE001 - every failure is reported, never hidden
        outcome.error = f"{type(error).__name__}: {error}"
    if stamps:
        outcome.ttft = stamps[0] - started
        outcome.gaps = list(np.diff(stamps))
    return outcome


async def one_level(url: str, per_model: int, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """``per_model`` requests for each model, all at once; tokens/s over the wall time of the wave."""
    import httpx
    import openai

    async with httpx.AsyncClient(timeout=3600) as http:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", http_client=http, max_retries=0)
        jobs = [(model, texts[(i * len(MODELS) + m) % len(texts)]) for i in range(per_model)
                for m, model in enumerate(MODELS)]
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(streamed(client, model, text, max_tokens) for model, text in jobs))
        seconds = time.perf_counter() - started
    failures = [f"{o.model}: {o.error or f'{o.tokens} tokens from {o.answered_by}'}" for o in outcomes
                if o.error or o.tokens != max_tokens or o.answered_by != o.model]
    gaps = [gap for o in outcomes for gap in (o.gaps or [])]
    tokens = sum(o.tokens for o in outcomes)
    return {"per_model": per_model, "in_flight": len(jobs), "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "ttft_p50_s": percentile([o.ttft for o in outcomes if o.ttft], 50),
            "step_p50_s": statistics.median(gaps) if gaps else float("nan"), "failures": failures}


def serve_levels(base: Path, artifacts: dict[str, Path], levels: list[int], texts: list[str], args: Any,
                 label: str) -> dict[str, Any]:
    """Start ``meswitch serve``, warm every model up with one request, then run each level."""
    budget = 2 * sum(directory_bytes(path) for path in artifacts.values())
    print(f"{label}: starting meswitch serve ...", flush=True)
    server = ServerProcess(artifacts, budget, args.kv_cache, 4 * max(levels), args.threads, base=base)
    results: dict[str, Any] = {"levels": []}
    try:
        warm = asyncio.run(one_level(server.url, 1, texts, 2))
        if warm["failures"]:
            raise RuntimeError(f"{label}: warm-up failed: {warm['failures'][:3]}")
        for per_model in levels:
            level = asyncio.run(one_level(server.url, per_model, texts, args.max_tokens))
            results["levels"].append(level)
            print(f"  {label}, {per_model} per model: {level['tokens_per_s']:.2f} tokens/s, TTFT p50 "
                  f"{level['ttft_p50_s']:.2f} s, step p50 {level['step_p50_s']:.3f} s"
                  + (f", FAILED {level['failures'][:3]}" if level["failures"] else ""), flush=True)
        results["peak_rss_bytes"] = server.peak_rss()
    finally:
        results["exit"] = server.stop()
    return results


# -- the baseline: four resident HF models -------------------------------------------------------------


def hf_levels(directories: dict[str, Path], levels: list[int], texts: list[str], max_tokens: int,
              dtype: Any) -> list[dict[str, Any]]:
    """The four models resident in ``dtype``; per level each model's requests one ``generate`` batch."""
    import torch

    transformers.utils.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directories["base"])
    models = {name: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
              for name, path in directories.items()}
    results = []
    with torch.no_grad():
        for name, model in models.items():  # warm-up
            model.generate(**tokenizer([texts[0]], return_tensors="pt"), max_new_tokens=2, do_sample=False)
        for per_model in levels:
            ttfts, tokens = [], 0
            started = time.perf_counter()
            for m, (name, model) in enumerate(models.items()):
                batch = [texts[(i * len(MODELS) + m) % len(texts)] for i in range(per_model)]
                inputs = tokenizer(batch, return_tensors="pt")  # every prompt has the same length: no padding
                first = FirstToken()
                out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                     logits_processor=transformers.LogitsProcessorList([first]))
                tokens += (out.shape[1] - inputs["input_ids"].shape[1]) * per_model
                ttfts += [first.at - started] * per_model
            seconds = time.perf_counter() - started
            results.append({"per_model": per_model, "seconds": seconds, "tokens": tokens,
                            "tokens_per_s": tokens / seconds, "ttft_p50_s": percentile(ttfts, 50)})
            print(f"  HF {str(dtype).removeprefix('torch.')}, {per_model} per model: "
                  f"{tokens / seconds:.2f} tokens/s", flush=True)
    return results


class FirstToken(transformers.LogitsProcessor):
    """A logits processor that records when a batch's first new token is chosen."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


# -- the report -------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--delta-std", type=float, default=0.002, help="the experts' random deltas (weights: 0.02)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4], help="requests per model")
    parser.add_argument("--max-tokens", type=int, default=16, help="new tokens per request (default 16)")
    parser.add_argument("--prompt-words", type=int, default=24, help="prompt length in tokens (default 24)")
    parser.add_argument("--kv-cache", type=int, default=256 << 20, help="the server's KV cache bytes")
    parser.add_argument("--threads", type=int, default=2, help="threads of the server and of the baseline")
    parser.add_argument("--dense-experts", action="store_true",
                        help="also serve the experts with every input channel in 16 bit (dense deltas)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the resident HF models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    import torch
    from meswitch.ops import cpu_kernel_path

    shape = Shape(args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab)
    texts = prompts(4 * len(MODELS), args.prompt_words, args.vocab, args.seed)
    bandwidth = read_bandwidth(args.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, CPU kernel path {cpu_kernel_path()}, "
          f"{args.threads} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s; base of "
          f"{shape.parameters() / 1e9:.2f} B parameters", flush=True)
    results: dict[str, Any] = {"machine": {"cpu_kernel_path": cpu_kernel_path(), "cpus": os.cpu_count(),
                                           "processor": platform.processor() or platform.machine(),
                                           "read_bandwidth": bandwidth},
                               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "parameters": shape.parameters()}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="meswitch-serve-scale-") as scratch:
        root = Path(scratch)
        print("writing the models ...", flush=True)
        directories = write_family(root / "models", shape, args.delta_std, args.seed)
        artifacts = compress_experts(directories, root / "artifacts", 0.01)
        weight_bytes = {"base": (directories["base"] / "model.safetensors").stat().st_size,
                        "experts": {name: directory_bytes(path) for name, path in artifacts.items()}}
        results["bytes"] = weight_bytes
        runs = {"meswitch": serve_levels(directories["base"], artifacts, args.levels, texts, args,
                                         "meswitch, 2-bit experts")}
        if args.dense_experts:
            dense = compress_experts(directories, root / "dense", 1.0)
            runs["meswitch dense experts"] = serve_levels(directories["base"], dense, args.levels, texts, args,
                                                          "meswitch, dense experts")
        if not args.no_baseline:
            torch.set_num_threads(args.threads)
            for dtype in (torch.float32, torch.bfloat16):
                runs[f"HF {str(dtype).removeprefix('torch.')}"] = {
                    "levels": hf_levels(directories, args.levels, texts, args.max_tokens, dtype)}
    results["runs"] = runs
    for name, run in runs.items():
        for level in run["levels"]:
            failures += [f"{name}, {level['per_model']} per model: {f}" for f in level.get("failures", [])]
        if run.get("exit", 0) != 0:
            failures.append(f"{name}: the server exited with {run['exit']}")

    print("\n| requests per model | way | tokens/s | TTFT p50 (s) | step p50 (s) |\n|---:|---|---:|---:|---:|")
    for i, per_model in enumerate(args.levels):
        for name, run in runs.items():
            level = run["levels"][i]
            print(f"| {per_model} | {name} | {level['tokens_per_s']:.2f} | {level['ttft_p50_s']:.2f} | "
                  f"{level.get('step_p50_s', float('nan')):.3f} |")
    whole_bf16 = len(MODELS) * weight_bytes["base"]
    step_bytes = weight_bytes["base"] + sum(weight_bytes["experts"].values())
    ours = runs["meswitch"]
    summary: dict[str, Any] = {
        "rss_over_four_bf16_models": ours["peak_rss_bytes"] / whole_bf16,
        "decode_step_over_weight_read_time": ours["levels"][0]["step_p50_s"] / (step_bytes / bandwidth)}
    if not args.no_baseline:
        baselines = [run for name, run in runs.items() if name.startswith("HF ")]
        summary["speedup_over_best_resident"] = {
            str(per_model): ours["levels"][i]["tokens_per_s"] / max(b["levels"][i]["tokens_per_s"] for b in baselines)
            for i, per_model in enumerate(args.levels)}
    results["summary"] = summary
    print(f"\nserver peak RSS {ours['peak_rss_bytes'] / 1e9:.2f} GB = {summary['rss_over_four_bf16_models']:.2f}x the "
          f"four models' bf16 weights ({whole_bf16 / 1e9:.2f} GB; goal <= 0.5x)")
    print(f"decode step at {args.levels[0]} per model: {ours['levels'][0]['step_p50_s']:.3f} s against "
          f"{step_bytes / bandwidth:.3f} s to read its {step_bytes / 1e9:.2f} GB of weights = "
          f"{summary['decode_step_over_weight_read_time']:.2f}x (goal <= 2x)")
    for per_model, ratio in summary.get("speedup_over_best_resident", {}).items():
        goal = {"2": ">= 2x", "4": ">= 1.2x"}.get(per_model, "")
        print(f"{per_model} per model: {ratio:.2f}x the best resident HF baseline's tokens/s"
              + (f" (goal {goal})" if goal else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
