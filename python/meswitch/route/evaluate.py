"""Held-out evaluation of routers on queries as users send them, with fastText and the probe beside.

The sets (question or prompt only, never a reference answer):

* ``gsm8k-test`` (math): every question of GSM8K ``test.jsonl``;
* ``humaneval`` (code): every HumanEval prompt;
* ``chitchat-heldout`` (chat): the first user turn of each held-out family dialogue;
* ``instructions`` (all three): ``data/router/instructions.jsonl``, requests written as
  instructions ("Write a function that ...", "Compute ...", "Recommend ..."), a style the
  training data does not contain.

Accuracy counts the router's most probable expert; ``to expert`` also requires its confidence
to reach the threshold (a query below it goes to the fallback, which is not the expert).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meswitch.route.train import classification_report, read_examples, split_examples

Example = tuple[str, str]  # (query text, expert)


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def heldout_sets(repo_root: str | os.PathLike[str]) -> dict[str, list[Example]]:
    """Return the evaluation sets described in the module docstring."""
    root = Path(repo_root)
    from meswitch.family import heldout_dir

    return {
        "gsm8k-test": [(r["question"], "math") for r in _jsonl(root / "data" / "gsm8k" / "test.jsonl")],
        "humaneval": [(r["prompt"], "code") for r in _jsonl(root / "data" / "humaneval" / "HumanEval.jsonl")],
        "chitchat-heldout": [(r["turns"][0]["content"], "chat") for r in _jsonl(heldout_dir() / "chat.jsonl")],
        "instructions": [(r["text"], r["expert"]) for r in _jsonl(root / "data" / "router" / "instructions.jsonl")],
    }


def evaluate_router(router: Any, sets: Mapping[str, Sequence[Example]]) -> dict[str, Any]:
    """Accuracy, fallback rate, per-class precision/recall and confusion of ``router`` on each set."""
    results: dict[str, Any] = {}
    for name, examples in sets.items():
        started = time.perf_counter()
        routed = [router.route(text) for text, _ in examples]
        seconds = (time.perf_counter() - started) / len(examples)
        truth = [e for _, e in examples]
        report = classification_report(router.labels, truth, [r.label or router.fallback for r in routed])
        report["to_expert"] = sum(r.expert == e for r, e in zip(routed, truth)) / len(examples)
        report["fallback_rate"] = sum(r.fallback for r in routed) / len(examples)
        report["seconds_per_query_python"] = seconds
        results[name] = report
    return results


def evaluate_fasttext(train: Sequence[Example], sets: Mapping[str, Sequence[Example]], labels: Sequence[str],
                      **options: Any) -> dict[str, Any]:
    """Train the ``fasttext`` package on ``train`` and evaluate it on ``sets`` (accuracy and latency)."""
    import fasttext

    settings = {"epoch": 25, "lr": 0.5, "wordNgrams": 2, "minn": 3, "maxn": 5, "dim": 50,
                "bucket": 1 << 18, "thread": 1, "seed": 0, "verbose": 0, **options}
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "train.txt"
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as stream:
            stream.writelines(f"__label__{expert} {' '.join(text.split())}\n" for text, expert in train)
        started = time.perf_counter()
        model = fasttext.train_supervised(str(path), **settings)
        train_seconds = time.perf_counter() - started
    results: dict[str, Any] = {"settings": settings, "train_seconds": train_seconds}
    for name, examples in sets.items():
        started = time.perf_counter()
        predicted = [_fasttext_label(model, text) for text, _ in examples]
        seconds = (time.perf_counter() - started) / len(examples)
        report = classification_report(labels, [e for _, e in examples], predicted)
        report["seconds_per_query_python"] = seconds
        results[name] = report
    return results


def _fasttext_label(model: Any, text: str) -> str:
    # model.predict() of fasttext 0.9.2 fails under NumPy 2 (np.array(copy=False)); its C++
    # binding returns the same (probability, label) pairs without NumPy.
    pairs = model.f.predict(" ".join(text.split()) + "\n", 1, 0.0, "strict")
    return pairs[0][1].removeprefix("__label__")


def evaluate_probe(base: str | os.PathLike[str], train: Sequence[Example], sets: Mapping[str, Sequence[Example]],
                   per_expert: int = 600) -> dict[str, Any]:
    """Fit the hidden-state probe on ``per_expert`` training examples per expert; evaluate on ``sets``."""
    import torch

    from meswitch.route.probe import HiddenStateProbe

    torch.set_num_threads(1)
    chosen: list[Example] = []
    for expert in sorted({e for _, e in train}):
        ranked = sorted((t for t, e in train if e == expert), key=lambda t: hashlib.sha256(t.encode()).digest())
        chosen += [(t, expert) for t in ranked[:per_expert]]
    probe = HiddenStateProbe(base)
    started = time.perf_counter()
    probe.fit([t for t, _ in chosen], [e for _, e in chosen])
    results: dict[str, Any] = {"train_examples": len(chosen), "train_seconds": time.perf_counter() - started,
                               "max_tokens": probe.max_tokens, "torch_threads": 1}
    for name, examples in sets.items():
        predicted, seconds = probe.predict([t for t, _ in examples])
        report = classification_report(probe.labels, [e for _, e in examples], predicted)
        report["seconds_per_query_python"] = seconds
        results[name] = report
    return results


def training_split(train_files: Mapping[str, str | os.PathLike[str]], heldout_fraction: float) -> list[Example]:
    """The training split a router trained on ``train_files`` saw (same deduplication and hash split)."""
    train, _ = split_examples({n: read_examples(p) for n, p in train_files.items()}, heldout_fraction)
    return train


def plot_confusions(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str], title: str) -> None:
    """Write one confusion matrix per set side by side as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.4), squeeze=False)
    for ax, (name, report) in zip(axes[0], results.items()):
        matrix = np.array(report["confusion"])
        labels = report["labels"]
        ax.imshow(matrix, cmap="Blues")
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black", fontsize=9)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("routed to (most probable)")
        ax.set_ylabel("true expert")
        ax.set_title(f"{name}\naccuracy {report['accuracy']:.1%}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def combined(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-class precision and recall over all sets together (summed confusion matrices)."""
    import numpy as np

    first = next(iter(reports.values()))
    labels = first["labels"]
    matrix = sum(np.array(r["confusion"]) for r in reports.values())
    truth = [labels[i] for i in range(len(labels)) for j in range(len(labels)) for _ in range(matrix[i, j])]
    predicted = [labels[j] for i in range(len(labels)) for j in range(len(labels)) for _ in range(matrix[i, j])]
    return classification_report(labels, truth, predicted)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def markdown(results: Mapping[str, Any]) -> str:
    """Markdown tables of one evaluation run (router, and fastText / probe when present)."""
    ours = results["router"]
    others = [name for name in ("fasttext", "probe") if name in results]
    header = "| set | queries | router accuracy | to expert | fallback |" + "".join(
        f" {name} accuracy |" for name in others)
    lines = [header, "|---|---:|---:|---:|---:|" + "---:|" * len(others)]
    for name, report in ours.items():
        lines.append(f"| {name} | {report['examples']} | {_percent(report['accuracy'])} | "
                     f"{_percent(report['to_expert'])} | {_percent(report['fallback_rate'])} |" + "".join(
                         f" {_percent(results[other][name]['accuracy'])} |" for other in others))
    lines += ["", "| all sets, expert | precision | recall | support |" + "".join(
        f" {name} precision | {name} recall |" for name in others),
        "|---|---:|---:|---:|" + "---:|---:|" * len(others)]
    totals = {name: combined({k: v for k, v in results[name].items() if k in ours}) for name in ["router", *others]}
    for label, row in totals["router"]["per_class"].items():
        lines.append(f"| {label} | {_percent(row['precision'])} | {_percent(row['recall'])} | {row['support']} |" + "".join(
            f" {_percent(totals[o]['per_class'][label]['precision'])} | {_percent(totals[o]['per_class'][label]['recall'])} |"
            for o in others))
    lines += ["", "| mean latency per query (Python, one at a time) |" + " router |" + "".join(f" {o} |" for o in others),
              "|---|---:|" + "---:|" * len(others)]
    for name in ours:
        lines.append(f"| {name} | {ours[name]['seconds_per_query_python'] * 1e6:.0f} us |" + "".join(
            f" {results[o][name]['seconds_per_query_python'] * 1e6:.0f} us |" for o in others))
    return "\n".join(lines) + "\n"


__all__ = ["combined", "evaluate_fasttext", "evaluate_probe", "evaluate_router", "heldout_sets", "markdown",
           "plot_confusions", "training_split"]
