"""Held-out evaluation of causal language models on the chat, math and code domains.

Pure Python (torch, transformers, numpy, matplotlib): importable without the compiled
extension, so it can score both plain checkpoints and models assembled in memory,
such as a base model with a decompressed expert delta applied.

Metrics
-------
perplexity
    ``exp`` of the token-weighted mean negative log-likelihood over all held-out texts.
    Every text is preceded by the end-of-text token (documents are separated by it
    during training), which is context only and not scored.
bits_per_byte
    Summed NLL in bits divided by the UTF-8 length of the scored text. Unlike perplexity it
    does not depend on the tokenizer, so it compares models with different vocabularies.
word_perplexity
    ``exp`` of the summed NLL divided by the number of whitespace-separated words of the
    scored text: a perplexity that, like bits per byte, does not depend on the tokenizer.
exact_match (math)
    Greedy decoding from ``question + "\\n"``; the number after the first ``####`` must
    equal the reference answer.
next_token_accuracy (code)
    Fraction of scored positions where the arg-max of the logits is the next token.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

DOMAINS = ("chat", "math", "code")
DEFAULT_MAX_LENGTH = 512
#: Fields every held-out record of a domain needs (math is also scored by exact match).
HELDOUT_FIELDS = {"chat": ("text",), "math": ("text", "question", "final"), "code": ("text",)}
_ANSWER_RE = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def default_heldout_dir() -> Path:
    """Return the packaged held-out directory (``meswitch/family/heldout``)."""
    return Path(__file__).resolve().parent / "family" / "heldout"


def load_heldout(domain: str, heldout_dir: str | Path | None = None, max_examples: int | None = None) -> list[dict]:
    """Read the held-out records of one domain.

    Parameters
    ----------
    domain
        ``"chat"``, ``"math"`` or ``"code"``.
    heldout_dir
        Directory with ``<domain>.jsonl``; the packaged one by default.
    max_examples
        Keep only the first ``max_examples`` records. For math the limit applies per
        source (generated / GSM8K) so both stay represented.
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be a positive whole number, got {max_examples}")
    path = Path(heldout_dir or default_heldout_dir()) / f"{domain}.jsonl"
    records = _read_records(path, HELDOUT_FIELDS.get(domain, ("text",)))
    if max_examples is not None:
        if domain == "math":
            kept: list[dict] = []
            counts: dict[str, int] = {}
            for record in records:
                source = record.get("source", "")
                if counts.get(source, 0) < max_examples:
                    kept.append(record)
                    counts[source] = counts.get(source, 0) + 1
            records = kept
        else:
            records = records[:max_examples]
    return records


def _read_records(path: Path, fields: Sequence[str]) -> list[dict]:
    """The records of a ``.jsonl`` file, each checked for ``fields``; errors name file, line and field."""
    from meswitch.inputs import read_jsonl_records, string_field

    records = []
    for number, record in read_jsonl_records(path):
        for field in fields:
            if field not in record:
                raise ValueError(f"{path}:{number}: missing field '{field}'")
        string_field(record, "text", path, number)
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _context_token_id(tokenizer) -> int:
    token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("tokenizer has neither a BOS nor an EOS token to start a text with")
    return int(token_id)


def _encode(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    start = _context_token_id(tokenizer)
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [([start] + ids)[:max_length] for ids in encoded]


def token_statistics(
    model, tokenizer, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 16
) -> dict[str, float]:
    """Score ``texts`` with teacher forcing.

    Parameters
    ----------
    model
        A causal LM returning ``.logits`` of shape ``(batch, length, vocab)``.
    tokenizer
        Its tokenizer.
    texts
        Texts to score; each is truncated to ``max_length`` tokens including the
        leading context token.
    max_length
        Maximum sequence length fed to the model.
    batch_size
        Texts per forward pass (right padding, which a causal model never attends to).

    Returns
    -------
    dict
        ``nll`` (summed, nats), ``tokens`` (scored), ``correct`` (top-1 hits),
        ``bytes`` (UTF-8 length of the scored part of the texts) and ``words``
        (whitespace-separated words of the scored part).
    """
    import torch

    sequences = _encode(tokenizer, texts, max_length)
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    total_nll = 0.0
    total_tokens = 0
    total_correct = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for first in range(0, len(order), batch_size):
            chunk = [sequences[i] for i in order[first : first + batch_size]]
            chunk = [s for s in chunk if len(s) >= 2]
            if not chunk:
                continue
            width = max(len(s) for s in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = ids[:, 1:]
            valid = mask[:, 1:].bool()
            picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            total_nll += float(-(picked[valid].double()).sum())
            total_tokens += int(valid.sum())
            total_correct += int(((logits[:, :-1].argmax(-1) == targets) & valid).sum())
    model.train(was_training)
    # Count the bytes and words of what was scored: long texts are truncated to max_length tokens.
    scored = [tokenizer.decode(s[1:]) for s in sequences if len(s) >= 2]
    n_bytes = sum(len(text.encode("utf-8")) for text in scored)
    n_words = sum(len(text.split()) for text in scored)
    return {"nll": total_nll, "tokens": total_tokens, "correct": total_correct, "bytes": n_bytes, "words": n_words}


def perplexity(model, tokenizer, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 16) -> float:
    """Token-weighted perplexity of ``model`` on ``texts``: ``exp(sum NLL / scored tokens)``."""
    stats = token_statistics(model, tokenizer, texts, max_length=max_length, batch_size=batch_size)
    return math.exp(stats["nll"] / stats["tokens"])


def next_token_accuracy(
    model, tokenizer, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 16
) -> float:
    """Top-1 next-token accuracy of ``model`` on ``texts`` over the same positions :func:`perplexity` scores."""
    stats = token_statistics(model, tokenizer, texts, max_length=max_length, batch_size=batch_size)
    return stats["correct"] / stats["tokens"]


def parse_final_answer(text: str) -> float | None:
    """Return the number after the first ``####`` in ``text`` (commas ignored), or ``None``."""
    match = _ANSWER_RE.search(text)
    if match is None:
        return None
    try:
        return float(match.group(1).replace(",", ""))
    except ValueError:
        return None


def is_exact_match(generated: str, reference: float | int | str) -> bool:
    """Whether the final answer parsed from ``generated`` equals ``reference`` exactly."""
    predicted = parse_final_answer(generated)
    if predicted is None:
        return False
    if isinstance(reference, str):
        parsed = parse_final_answer(reference)
        if parsed is None:
            parsed = float(reference.replace(",", ""))
        reference = parsed
    return predicted == float(reference)


def generate_greedy(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 160, batch_size: int = 25
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without special tokens."""
    import torch

    device = next(model.parameters()).device
    start = _context_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [[start] + ids for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for first in range(0, len(encoded), batch_size):
            chunk = encoded[first : first + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
            )
            for row in out[:, width:].tolist():
                outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return outputs


def exact_match(model, tokenizer, problems: Sequence[Mapping[str, Any]], max_new_tokens: int = 160) -> dict[str, Any]:
    """Greedy exact-match accuracy on math problems with ``question`` and ``final`` fields.

    Returns
    -------
    dict
        ``exact_match`` overall, ``exact_match_<source>`` per source, ``n_problems``
        and ``samples`` (the first generations, for inspection).
    """
    generations = generate_greedy(model, tokenizer, [p["question"] + "\n" for p in problems], max_new_tokens)
    hits: dict[str, list[bool]] = {}
    for problem, generated in zip(problems, generations):
        hits.setdefault(problem.get("source", "all"), []).append(is_exact_match(generated, problem["final"]))
    flat = [h for values in hits.values() for h in values]
    result: dict[str, Any] = {"exact_match": sum(flat) / max(1, len(flat)), "n_problems": len(flat)}
    for source, values in sorted(hits.items()):
        result[f"exact_match_{source}"] = sum(values) / len(values)
    result["samples"] = [
        {"question": p["question"], "generated": g, "final": p["final"]} for p, g in list(zip(problems, generations))[:3]
    ]
    return result


def load_model(model_dir: str | Path, device: str = "cpu"):
    """Load a checkpoint directory with ``AutoModelForCausalLM``/``AutoTokenizer``, computing in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Shipped weights are float16; scoring in float32 keeps CPU kernels exact and fast.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.eval()
    return model, tokenizer


def evaluate(
    model_dir: str | Path | None = None,
    domains: Iterable[str] = DOMAINS,
    heldout_dir: str | Path | None = None,
    max_examples: int | None = None,
    device: str = "cpu",
    *,
    model=None,
    tokenizer=None,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_new_tokens: int = 160,
) -> dict[str, Any]:
    """Evaluate one model on the held-out data of ``domains``.

    Parameters
    ----------
    model_dir
        Checkpoint directory; ignored when ``model`` and ``tokenizer`` are given.
    domains
        Any of ``"chat"``, ``"math"``, ``"code"``.
    heldout_dir
        Held-out directory; the packaged one by default.
    max_examples
        Limit per domain (per source for math), for quick runs.
    device
        Torch device used when loading ``model_dir``.
    model, tokenizer
        An already constructed causal LM and its tokenizer (for example a base
        model with a decompressed expert applied in memory).
    max_length
        Maximum tokens per scored text.
    max_new_tokens
        Generation budget for math exact match.

    Returns
    -------
    dict
        ``{"model": ..., "parameters": ..., "vocab_size": ..., "<domain>": {...}}``
        with ``perplexity``, ``bits_per_byte``, ``word_perplexity``, ``tokens`` and ``n_texts`` per
        domain, plus ``exact_match*`` for math and ``next_token_accuracy`` for code.
    """
    if model is None or tokenizer is None:
        if model_dir is None:
            raise ValueError("pass either model_dir or both model= and tokenizer=")
        model, tokenizer = load_model(model_dir, device)
    result: dict[str, Any] = {
        "model": str(model_dir) if model_dir is not None else type(model).__name__,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
    }
    for domain in domains:
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
        records = load_heldout(domain, heldout_dir, max_examples)
        texts = [r["text"] for r in records]
        stats = token_statistics(model, tokenizer, texts, max_length=max_length)
        entry: dict[str, Any] = {
            "perplexity": math.exp(stats["nll"] / stats["tokens"]),
            "bits_per_byte": stats["nll"] / math.log(2) / stats["bytes"],
            "word_perplexity": math.exp(stats["nll"] / max(1, stats["words"])),
            "tokens": stats["tokens"],
            "n_texts": len(texts),
        }
        if domain == "code":
            entry["next_token_accuracy"] = stats["correct"] / stats["tokens"]
        if domain == "math":
            entry.update(exact_match(model, tokenizer, records, max_new_tokens=max_new_tokens))
        result[domain] = entry
    return result


# --------------------------------------------------------------------------- reports

_COLUMNS = (
    ("chat", "perplexity", "chat ppl", "{:.2f}"),
    ("chat", "bits_per_byte", "chat bpb", "{:.3f}"),
    ("chat", "word_perplexity", "chat word ppl", "{:.1f}"),
    ("math", "perplexity", "math ppl", "{:.2f}"),
    ("math", "exact_match_generated", "math EM (generated)", "{:.1%}"),
    ("math", "exact_match_gsm8k", "math EM (GSM8K)", "{:.1%}"),
    ("code", "perplexity", "code ppl", "{:.2f}"),
    ("code", "next_token_accuracy", "code next-token acc", "{:.1%}"),
)


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Render results as a markdown table, one row per model; missing metrics show as ``-``."""
    columns = [c for c in _COLUMNS if any(c[1] in r.get(c[0], {}) for r in results.values())]
    lines = [
        "| model | " + " | ".join(c[2] for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, result in results.items():
        cells = []
        for domain, key, _, fmt in columns:
            value = result.get(domain, {}).get(key)
            cells.append("-" if value is None else fmt.format(value).replace("%", " %"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(results: Mapping[str, Mapping[str, Any]], plot_path: str | Path) -> None:
    """Bar plot: per-domain perplexity (log scale) and the two accuracy metrics, grouped by model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    panels = [
        ("held-out perplexity (lower is better)", [(d, "perplexity", d) for d in DOMAINS], True),
        (
            "accuracy (higher is better)",
            [
                ("math", "exact_match_generated", "math EM\n(generated)"),
                ("math", "exact_match_gsm8k", "math EM\n(GSM8K)"),
                ("code", "next_token_accuracy", "code next-token"),
            ],
            False,
        ),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(names))
    for ax, (title, metrics, log) in zip(axes, panels):
        metrics = [m for m in metrics if any(m[1] in results[n].get(m[0], {}) for n in names)]
        x = np.arange(len(metrics))
        for i, name in enumerate(names):
            values = [results[name].get(d, {}).get(k, np.nan) for d, k, _ in metrics]
            ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name)
        ax.set_xticks(x, [m[2] for m in metrics])
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot_path, dpi=120)
    plt.close(fig)


def write_report(
    results: Mapping[str, Mapping[str, Any]],
    json_path: str | Path | None = None,
    markdown_path: str | Path | None = None,
    plot_path: str | Path | None = None,
) -> str:
    """Write evaluation results as JSON, a markdown table and a PNG bar plot.

    Parameters
    ----------
    results
        ``{model name: evaluate(...) result}``.
    json_path, markdown_path, plot_path
        Output files; any of them may be ``None`` to skip it.

    Returns
    -------
    str
        The markdown table.
    """
    table = markdown_table(results)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if markdown_path is not None:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(table, encoding="utf-8")
    if plot_path is not None:
        plot_results(results, plot_path)
    return table


# --------------------------------------------------------------------------- command line


def _check_eval_inputs(args: argparse.Namespace) -> None:
    """Read what ``eval`` will use before any model loads, so a bad input fails in a second."""
    from meswitch.arguments import UsageError
    from meswitch.inputs import read_model_config

    for domain in args.domains:
        load_heldout(domain, args.heldout, args.max_examples)
    for model_dir in args.model_dirs:
        if (Path(model_dir) / "manifest.json").is_file():
            if args.base is None:
                raise UsageError(f"{model_dir} is a compressed expert; pass --base BASE_DIR")
        elif not Path(model_dir).is_dir():
            raise UsageError(f"{model_dir}: not a model directory or NAME.meswitch artifact")
        else:
            read_model_config(model_dir)
    if args.base is not None:
        read_model_config(args.base)


def _run_eval(args: argparse.Namespace) -> int:
    _check_eval_inputs(args)
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    results: dict[str, dict[str, Any]] = {}
    for model_dir in args.model_dirs:
        name = Path(model_dir).name
        if name in results:
            name = str(model_dir)
        model = tokenizer = None
        if (Path(model_dir) / "manifest.json").is_file():  # a compressed expert: base + dequantized delta
            from meswitch.artifact import load_compressed_model

            model, tokenizer = load_compressed_model(args.base, model_dir)
            model = model.to(args.device)
        results[name] = evaluate(
            model_dir,
            domains=args.domains,
            heldout_dir=args.heldout,
            max_examples=args.max_examples,
            device=args.device,
            model=model,
            tokenizer=tokenizer,
        )
        results[name]["model"] = str(model_dir)
    print(write_report(results, args.json, args.markdown, args.plot), end="")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an argparse ``subparsers`` object.

    Returns
    -------
    argparse.ArgumentParser
        The subcommand parser; its ``func`` default takes the parsed namespace.
    """
    parser = subparsers.add_parser(
        "eval",
        help="held-out perplexity, math exact match and code next-token accuracy",
        description="Evaluate checkpoint directories on the held-out chat, math and code data.",
    )
    from meswitch.arguments import existing_dir, positive_int

    parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR", type=existing_dir,
                        help="Hugging Face checkpoint directories or NAME.meswitch artifacts (with --base)")
    parser.add_argument("--base", type=existing_dir, default=None, help="base model directory for .meswitch artifacts")
    parser.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS))
    parser.add_argument("--max-examples", type=positive_int, default=None,
                        help="limit per domain (per source for math), a positive whole number")
    parser.add_argument("--heldout", type=existing_dir, default=None, help="held-out directory (default: packaged)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write results as JSON")
    parser.add_argument("--markdown", type=Path, default=None, help="write the markdown table")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG bar plot")
    parser.set_defaults(func=_run_eval)
    return parser


__all__ = [
    "DOMAINS",
    "default_heldout_dir",
    "evaluate",
    "exact_match",
    "generate_greedy",
    "is_exact_match",
    "load_heldout",
    "load_model",
    "markdown_table",
    "next_token_accuracy",
    "parse_final_answer",
    "perplexity",
    "plot_results",
    "register_cli",
    "token_statistics",
    "write_report",
]
