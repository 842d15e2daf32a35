"""``meswitch demo``: compress the bundled experts, show sizes, quality and replies side by side."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from meswitch.family import EXPERTS, family_dir

#: One prompt per expert, in the form that expert was trained on.
PROMPTS = {
    "chat": "<|user|>hi! how was your weekend?<|end|>\n<|assistant|>",
    "math": "Maya has 17 apples. Maya buys 25 more apples. How many apples does Maya have now?\n",
    # With a docstring: after a bare signature the tiny code expert ends the snippet at once.
    "code": 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
}
#: The metric shown per domain (lower is better for both).
METRIC = {"chat": "bits_per_byte", "math": "perplexity", "code": "perplexity"}


def _model_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _reply(model, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return " ".join(text.split())[:160]


def run_demo(family: Path | None = None, workdir: Path | None = None, max_examples: int = 40,
             bits: int = 2, salient: float = 0.01) -> dict[str, Any]:
    """Compress every bundled expert and compare it with its FP16 original.

    Parameters
    ----------
    family
        Family directory with ``base/`` and one directory per expert (default: bundled).
    workdir
        Where the artifacts go (default: ``./meswitch-demo``).
    max_examples
        Held-out examples per domain for the quality table.
    """
    if max_examples < 1:
        raise ValueError(f"max_examples must be a positive whole number, got {max_examples}")
    from meswitch.fused import load_fused_model
    from meswitch.compress import CompressionSettings, compress
    from meswitch.evaluation import evaluate, load_model

    family = family or family_dir()
    workdir = workdir or Path("meswitch-demo")
    workdir.mkdir(parents=True, exist_ok=True)
    base = family / "base"
    calibration_dir = family_dir().parent / "calib"
    # The tiny family's MLP is 688 wide: groups of 64 with a shorter last one (the default).
    settings = CompressionSettings(bits=bits, salient=salient, ragged_groups=True)
    print(f"Compressing {len(EXPERTS)} experts against {base} ({bits}-bit codes, {salient:.0%} salient channels, "
          f"activation-aware)")
    reports = {}
    for domain in EXPERTS:
        calibration = calibration_dir / f"{domain}.jsonl"
        # The work directory is the demo's own: a rerun replaces the artifacts it wrote before
        # (anything else found there is still refused).
        reports[domain] = compress(base, family / domain, workdir / f"{domain}.meswitch", settings=settings,
                                   calibration=calibration if calibration.is_file() else None, domain=domain,
                                   force=True)
        print(f"  {domain:<5} -> {reports[domain].artifact}: {reports[domain].artifact_bytes / 2**20:.2f} MiB, "
              f"{reports[domain].avg_bits:.2f} bits/param, {reports[domain].seconds:.1f} s")

    base_bytes = _model_bytes(base)
    print("\nSize")
    print(f"| model | FP16 bytes | meswitch bytes | ratio |\n|---|---:|---:|---:|")
    print(f"| base | {base_bytes:,} | {base_bytes:,} (kept once) | 1.00x |")
    fp16_total, compressed_total = base_bytes, base_bytes
    for domain in EXPERTS:
        fp16, compressed = _model_bytes(family / domain), reports[domain].artifact_bytes
        fp16_total += fp16
        compressed_total += compressed
        print(f"| {domain} expert | {fp16:,} | {compressed:,} | {fp16 / compressed:.2f}x |")
    print(f"| base + 3 experts | {fp16_total:,} | {compressed_total:,} | {fp16_total / compressed_total:.2f}x |")

    print(f"\nQuality on each expert's held-out domain (first {max_examples} examples; lower is better)")
    print("| expert | metric | base | FP16 expert | meswitch | gap vs FP16 |\n|---|---|---:|---:|---:|---:|")
    quality, replies = {}, {}
    base_model, base_tokenizer = load_model(base)
    for domain in EXPERTS:
        started = time.perf_counter()
        fp16_model, fp16_tokenizer = load_model(family / domain)
        # The compressed expert runs as is: every linear adds its delta from the packed codes.
        compressed_model, compressed_tokenizer = load_fused_model(base, workdir / f"{domain}.meswitch")
        metric = METRIC[domain]
        scores = {}
        for label, model, tokenizer in (("base", base_model, base_tokenizer), ("fp16", fp16_model, fp16_tokenizer),
                                        ("meswitch", compressed_model, compressed_tokenizer)):
            result = evaluate(model=model, tokenizer=tokenizer, domains=[domain], max_examples=max_examples,
                              max_new_tokens=64)
            scores[label] = result[domain][metric]
        quality[domain] = scores
        gap = (scores["meswitch"] - scores["fp16"]) / scores["fp16"]
        print(f"| {domain} | {metric} | {scores['base']:.4f} | {scores['fp16']:.4f} | {scores['meswitch']:.4f} | "
              f"{gap:+.2%} |", flush=True)
        replies[domain] = {"fp16": _reply(fp16_model, fp16_tokenizer, PROMPTS[domain]),
                           "meswitch": _reply(compressed_model, compressed_tokenizer, PROMPTS[domain]),
                           "seconds": time.perf_counter() - started}

    print("\nReplies (greedy), FP16 expert beside its compressed twin (run by the fused CPU kernel)")
    for domain in EXPERTS:
        print(f"\n[{domain}] prompt: {PROMPTS[domain]!r}")
        print(f"  FP16     : {replies[domain]['fp16']}")
        print(f"  meswitch : {replies[domain]['meswitch']}")
    return {"reports": reports, "quality": quality, "replies": replies}
