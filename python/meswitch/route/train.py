"""Train a router: C++ features, class-balanced logistic regression (scikit-learn), a held-out split.

Each expert's examples are deduplicated and split by a hash of their text (``sha256 % 1000 <
1000 * heldout_fraction`` goes to the held-out split), so a split never depends on file order
or on a random seed. The classifier is fitted on the training split; the held-out split gives
the reported accuracy and calibrates the threshold: the confidence below which a query goes to
the fallback is the ``1 - keep`` quantile of the confidences of correctly routed held-out
examples, so a fraction ``keep`` of the queries the router gets right still reach their expert
and the low-confidence rest, where its mistakes concentrate, goes to the fallback.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meswitch.route.features import DEFAULT_FEATURIZER, feature_matrix
from meswitch.route.router import query_text

_TEXT_KEYS = ("text", "question", "prompt", "content", "query")


def read_examples(path: str | os.PathLike[str]) -> list[str]:
    """Read one example per line from a ``.jsonl`` or text file.

    A JSON line is a string, a chat message list (routed on its user turns), or an object
    with one of the keys ``text``, ``question``, ``prompt``, ``content``, ``query`` or
    ``messages``. Any other file is plain text, one example per non-blank line.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        A line that is not a usable example, or a file without examples; the message names
        the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    examples: list[str] = []
    with open(path, encoding="utf-8", errors="surrogateescape") as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                examples.append(line.rstrip("\n"))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if isinstance(record, Mapping) and "messages" not in record:
                text = next((record[k] for k in _TEXT_KEYS if isinstance(record.get(k), str)), None)
                if text is None:
                    raise ValueError(f"{path}:{number}: an object needs a string field among "
                                     f"{', '.join(_TEXT_KEYS)} or a 'messages' list")
            else:
                text = query_text(record)
            examples.append(text)
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def _in_heldout(text: str, fraction: float) -> bool:
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < round(fraction * 1000)


def split_examples(examples: Mapping[str, Sequence[str]], heldout_fraction: float) -> tuple[list, list]:
    """Deduplicate each expert's examples and split them into ``(train, heldout)`` lists of ``(text, expert)``."""
    train, heldout = [], []
    for expert, texts in examples.items():
        for text in dict.fromkeys(texts):
            (heldout if _in_heldout(text, heldout_fraction) else train).append((text, expert))
    return train, heldout


def fit_classifier(texts: Sequence[str], targets: Sequence[int], featurizer: Mapping[str, int],
                   regularization: float, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit class-balanced multinomial logistic regression on the C++ features.

    Returns
    -------
    tuple of numpy.ndarray
        ``weight`` of shape ``(classes, 2**hash_bits)`` and ``bias`` of shape ``(classes,)``, float32.
    """
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=regularization, class_weight="balanced", max_iter=500, tol=1e-5)
    model.fit(feature_matrix(texts, featurizer), np.asarray(targets))
    weight, bias = model.coef_, model.intercept_
    if classes == 2:  # scikit-learn keeps one row for two classes: softmax(-z/2, z/2) = sigmoid(z)
        weight, bias = np.vstack([-weight / 2, weight / 2]), np.concatenate([-bias / 2, bias / 2])
    return weight.astype(np.float32), bias.astype(np.float32)


def classification_report(labels: Sequence[str], truth: Sequence[str], predicted: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision and recall, and the confusion matrix (rows: truth, columns: prediction)."""
    index = {label: i for i, label in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(truth, predicted):
        confusion[index[t], index[p]] += 1
    per_class = {}
    for label, i in index.items():
        predicted_i, actual_i = int(confusion[:, i].sum()), int(confusion[i].sum())
        per_class[label] = {
            "precision": float(confusion[i, i] / predicted_i) if predicted_i else None,
            "recall": float(confusion[i, i] / actual_i) if actual_i else None,
            "support": actual_i,
        }
    total = int(confusion.sum())
    return {"accuracy": float(np.trace(confusion) / total) if total else None, "examples": total,
            "per_class": per_class, "confusion": confusion.tolist(), "labels": list(labels)}


def train_router(
    examples: Mapping[str, Sequence[str]],
    out: str | os.PathLike[str],
    *,
    fallback: str,
    featurizer: Mapping[str, int] = DEFAULT_FEATURIZER,
    heldout_fraction: float = 0.1,
    keep: float = 0.99,
    regularization: float = 10.0,
    force: bool = False,
    sources: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Train a router on examples per expert and write it to ``out``.

    Parameters
    ----------
    examples
        ``{expert name: [example text, ...]}``, at least two experts.
    out
        The router directory to write (atomically; an existing router only with ``force``).
    fallback
        The expert that takes what the router cannot place (below its threshold, or a query
        with no features): the expert that serves general requests best, usually the chat
        expert. ``"base"`` sends them to the base model, which is not instruction-tuned.
    featurizer
        Featurizer parameters (:data:`meswitch.route.features.DEFAULT_FEATURIZER`).
    heldout_fraction
        Share of each expert's examples held out for the reported metrics and the threshold.
    keep
        Share of correctly routed held-out examples that must stay above the threshold.
    regularization
        Inverse L2 strength ``C`` of the logistic regression.
    force
        Replace an existing router at ``out``.
    sources
        ``{expert name: file}``, recorded in the training summary.

    Returns
    -------
    dict
        The training summary and held-out metrics, as stored in ``router.json``.
    """
    from meswitch import _core

    if len(examples) < 2:
        raise ValueError("a router needs examples of at least two experts")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout fraction must be in (0, 1), not {heldout_fraction}")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], not {keep}")
    labels = sorted(examples)
    bad = [name for name in [*labels, fallback] if not name or any(c.isspace() or c in "/\\=" for c in name)]
    if bad:
        raise ValueError(f"not usable as an expert name: {', '.join(map(repr, bad))}")
    _core.check_router_output(str(out), force)  # before any work; the writer checks again
    started = time.perf_counter()
    train, heldout = split_examples(examples, heldout_fraction)
    for label in labels:
        if not any(e == label for _, e in train) or not any(e == label for _, e in heldout):
            raise ValueError(f"expert '{label}' has too few distinct examples for a training and a held-out split")
    index = {label: i for i, label in enumerate(labels)}
    weight, bias = fit_classifier([t for t, _ in train], [index[e] for _, e in train], featurizer,
                                  regularization, len(labels))
    fitted = time.perf_counter() - started

    # Held-out predictions with the float32 weights as stored.
    probabilities = _softmax(feature_matrix([t for t, _ in heldout], featurizer) @ weight.T + bias)
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    correct = predicted == np.array([index[e] for _, e in heldout])
    threshold = float(np.quantile(confidence[correct], 1 - keep)) if correct.any() and keep < 1 else 0.0
    threshold = float(np.nextafter(np.float32(threshold), np.float32(0)))  # the quantile itself stays above
    routed = confidence >= threshold
    report = classification_report(labels, [e for _, e in heldout], [labels[p] for p in predicted])
    metrics = {
        "heldout_split": {
            **report,
            "fallback_rate": float(1 - routed.mean()),
            "errors": int((~correct).sum()),
            "errors_sent_to_fallback": int((~correct & ~routed).sum()),
        }
    }
    training = {
        "classifier": "multinomial logistic regression, class-balanced, L2",
        "regularization_C": regularization,
        "examples": {label: sum(1 for _, e in train if e == label) for label in labels},
        "heldout_examples": {label: sum(1 for _, e in heldout if e == label) for label in labels},
        "heldout_fraction": heldout_fraction,
        "threshold_rule": f"{1 - keep:g} quantile of the confidence of correct held-out predictions",
        "sources": dict(sources or {}),
        "seconds": round(fitted, 1),
    }
    _core.write_router(str(out), labels, weight, bias, threshold, fallback, dict(featurizer),
                       json.dumps(training), json.dumps(metrics), force)
    return {"training": training, "metrics": metrics, "threshold": threshold, "labels": labels}


def _softmax(logits: Any) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    logits = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


__all__ = ["classification_report", "fit_classifier", "read_examples", "split_examples", "train_router"]
