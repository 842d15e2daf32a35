"""The second router: a linear probe on the base model's mean-pooled hidden states.

A server has the base model loaded anyway, so one forward of the prompt through it yields
features for free in memory (not in time): the last layer's hidden states averaged over the
prompt's tokens, then a class-balanced logistic regression. This module exists to compare
with the n-gram router (``docs/results.md``); the product routes with the n-gram router.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np


class HiddenStateProbe:
    """Mean-pooled last hidden state of a causal LM + logistic regression.

    Parameters
    ----------
    model_dir
        A Hugging Face checkpoint directory (the base model).
    max_tokens
        Prompts are cut to this many tokens before the forward.
    """

    def __init__(self, model_dir: str | os.PathLike[str], max_tokens: int = 256) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        self.max_tokens = max_tokens
        self.labels: list[str] = []
        self.classifier: Any = None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return one mean-pooled hidden state per text, shape ``(texts, hidden)``."""
        import torch

        rows = []
        with torch.inference_mode():
            for text in texts:
                ids = self.tokenizer(text or " ", return_tensors="pt").input_ids[:, : self.max_tokens]
                hidden = self.model.model(input_ids=ids).last_hidden_state
                rows.append(hidden[0].mean(dim=0).numpy())
        return np.stack(rows)

    def fit(self, texts: Sequence[str], experts: Sequence[str]) -> HiddenStateProbe:
        """Fit the probe on example texts and their experts."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.labels = sorted(set(experts))
        self.classifier = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
        self.classifier.fit(self.embed(texts), [self.labels.index(e) for e in experts])
        return self

    def predict(self, texts: Sequence[str]) -> tuple[list[str], float]:
        """Return the predicted experts and the mean seconds per query (forward + classifier, one at a time)."""
        predicted, started = [], time.perf_counter()
        for text in texts:
            predicted.append(self.labels[int(self.classifier.predict(self.embed([text]))[0])])
        return predicted, (time.perf_counter() - started) / max(1, len(texts))


__all__ = ["HiddenStateProbe"]
