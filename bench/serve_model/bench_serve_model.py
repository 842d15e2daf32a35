"""Decode throughput of one mixed batch: the multi-expert model against one HF model per expert.

One batch of 16 sequences, 4 for each of the base and the three bundled experts, is
prefilled and then decoded greedily for ``--steps`` tokens each, three ways, in this run:

* ``meswitch``: ``MultiExpertModel``, the base once plus each expert's compressed delta
  (2-bit, 1 % salient), every sequence in one forward per step (base GEMM once, deltas
  by the fused kernel per expert segment, paged KV cache);
* ``swap``: each expert a separate HF model in float32, loaded from its FP16 checkpoint
  on disk when its turn comes (each model decodes its 4 sequences for all steps, batched,
  then is dropped), which is what a server without delta serving does when the experts
  do not fit together;
* ``resident``: all four HF models loaded up front, each step running each model's batch.

It prints decode tokens per second and the ratios, the bytes each way holds resident
(the multi-expert model's base as it holds it, 16-bit matrices; the HF models' float32
weights as run here; the FP16 size of the checkpoints beside it), and the
process's CPU kernel path. ``--json`` writes the figures.

    python bench/serve_model/bench_serve_model.py --steps 32 --json bench/serve_model/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers
from meswitch.family import family_dir
from meswitch.ops import cpu_kernel_path
from meswitch.serve import MultiExpertModel, SequenceInput
from meswitch.serve.engine.generate import expert_tokenizer
from meswitch.serve.server.bundled import bundled_artifacts

EXPERTS = (None, "chat", "math", "code")
PROMPTS = {
    None: "The river runs past the old mill and the",
    "chat": "<|user|>what do you like to do on weekends?<|end|>\n<|assistant|>",
    "math": "Tara has 12 shells and finds 9 more. How many shells does Tara have?\n",
    "code": "def read_config(path):\n",
}


def _directory(expert: str | None) -> Path:
    return family_dir() / (expert or "base")


def _prompts(model: MultiExpertModel, per_expert: int) -> dict[tuple[str | None, int], list[int]]:
    return {(expert, i): expert_tokenizer(model, expert).encode(PROMPTS[expert] + " " * i)
            for expert in EXPERTS for i in range(per_expert)}


def run_meswitch(model: MultiExpertModel, prompts, steps: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for the whole batch in one forward per step."""
    started = time.perf_counter()
    outputs = model.forward([SequenceInput(key, key[0], tokens) for key, tokens in prompts.items()], last_only=True)
    following = {key: int(rows[-1].argmax()) for key, rows in zip(prompts, outputs)}
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        outputs = model.forward([SequenceInput(key, key[0], [token]) for key, token in following.items()],
                                last_only=True)
        following = {key: int(rows[-1].argmax()) for key, rows in zip(following, outputs)}
    decode = time.perf_counter() - started
    for key in prompts:
        model.free(key)
    return prefill, decode


def _hf_model(expert: str | None):
    return transformers.AutoModelForCausalLM.from_pretrained(_directory(expert), dtype=torch.float32).eval()


def _hf_batch_decode(model, batch: list[list[int]], steps: int) -> None:
    """Left-padded batch: prefill, then ``steps`` greedy tokens with the HF KV cache."""
    width = max(len(tokens) for tokens in batch)
    ids = torch.tensor([[0] * (width - len(t)) + t for t in batch])
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in batch])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        past, following = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones(len(batch), 1, dtype=mask.dtype)], dim=1)
            out = model(input_ids=following, attention_mask=mask, past_key_values=past, use_cache=True)
            past, following = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)


def _by_expert(prompts) -> dict[str | None, list[list[int]]]:
    groups: dict[str | None, list[list[int]]] = {}
    for (expert, _), tokens in prompts.items():
        groups.setdefault(expert, []).append(tokens)
    return groups


def run_swap(prompts, steps: int) -> tuple[float, float]:
    """(load seconds, total seconds): each expert's model read from disk in its turn."""
    started, loading = time.perf_counter(), 0.0
    for expert, batch in _by_expert(prompts).items():
        load_start = time.perf_counter()
        model = _hf_model(expert)
        loading += time.perf_counter() - load_start
        _hf_batch_decode(model, batch, steps)
        del model
    return loading, time.perf_counter() - started


def run_resident(models, prompts, steps: int) -> float:
    """Seconds for every model's batch, prefill and decode, all models held."""
    started = time.perf_counter()
    for expert, batch in _by_expert(prompts).items():
        _hf_batch_decode(models[expert], batch, steps)
    return time.perf_counter() - started


def _parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per sequence")
    parser.add_argument("--per-expert", type=int, default=4, help="sequences per expert and for the base")
    parser.add_argument("--threads", type=int, default=1, help="torch and kernel threads")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MESWITCH_NUM_THREADS", str(args.threads))
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as scratch:
        base, compressed = bundled_artifacts(Path(scratch), report=lambda line: None)  # 2-bit, as `meswitch serve`
        artifacts = {path.name.removesuffix(".meswitch"): path for path in compressed}
        model = MultiExpertModel(base, artifacts, kv_cache_bytes=64 << 20)
        prompts = _prompts(model, args.per_expert)
        run_meswitch(model, prompts, 2)  # warm-up: experts prepared, kernels' pools started
        prefill, decode = run_meswitch(model, prompts, args.steps)
        artifact_bytes = sum(p.stat().st_size for a in artifacts.values() for p in a.glob("*.safetensors"))
        base_bytes = sum(tensor.numel() * tensor.element_size() for tensor in model.base.values())
        meswitch_bytes = base_bytes + artifact_bytes  # the base as held (16-bit matrices) + packed deltas

        _hf_model(None)  # warm the page cache and import paths for every way alike
        loading, swap_seconds = run_swap(prompts, args.steps)
        models = {expert: _hf_model(expert) for expert in EXPERTS}
        run_resident(models, {k: v for k, v in list(prompts.items())[:1]}, 1)  # warm-up
        resident_seconds = run_resident(models, prompts, args.steps)
        resident_bytes = sum(_parameter_bytes(m) for m in models.values())

    sequences = len(prompts)
    tokens = sequences * args.steps
    fp16_checkpoints = sum((_directory(e) / f).stat().st_size for e in EXPERTS
                           for f in os.listdir(_directory(e)) if f.endswith(".safetensors"))
    results = {
        "cpu_kernel_path": cpu_kernel_path(), "machine": platform.processor() or platform.machine(),
        "threads": args.threads, "sequences": sequences, "decode_steps": args.steps,
        "meswitch": {"prefill_s": prefill, "decode_s": decode, "decode_tokens_per_s": tokens / decode,
                     "resident_bytes": meswitch_bytes},
        "swap": {"load_s": loading, "total_s": swap_seconds, "tokens_per_s": tokens / swap_seconds},
        "resident": {"total_s": resident_seconds, "tokens_per_s": tokens / resident_seconds,
                     "resident_bytes": resident_bytes},
        "fp16_checkpoint_bytes": fp16_checkpoints,
    }
    # The HF ways include their prefill; so does this ratio's meswitch side.
    meswitch_total = tokens / (prefill + decode)
    print(f"CPU kernel path: {results['cpu_kernel_path']}, {args.threads} thread(s); {sequences} sequences "
          f"({args.per_expert} per expert and base), {args.steps} decode steps each")
    print(f"meswitch   decode {tokens / decode:8.1f} tok/s   prefill+decode {meswitch_total:8.1f} tok/s   "
          f"resident {meswitch_bytes / 2**20:6.1f} MiB")
    print(f"swap       prefill+decode {tokens / swap_seconds:8.1f} tok/s ({loading:.2f} s of {swap_seconds:.2f} s "
          f"loading)   meswitch is {meswitch_total / (tokens / swap_seconds):.2f}x")
    print(f"resident   prefill+decode {tokens / resident_seconds:8.1f} tok/s   resident {resident_bytes / 2**20:6.1f} MiB"
          f"   meswitch is {meswitch_total / (tokens / resident_seconds):.2f}x, "
          f"{resident_bytes / meswitch_bytes:.2f}x less memory")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
