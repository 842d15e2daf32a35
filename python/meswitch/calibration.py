"""Activation statistics for activation-aware salient channels and step sizes.

A forward pre-hook on every ``nn.Linear`` of the expert accumulates the second
moment ``E[x_i^2]`` of each input channel over the calibration tokens. That is
the weight the paper's error ``sum_tokens ||x_i * (D - Q(D))[:, i]||^2`` puts on
column ``i``, so it is all the C++ quantizer needs (one float per column).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def read_calibration_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts from a ``.jsonl`` file (field ``text``, or ``question`` + ``answer``) or a plain text file
    (blank-line separated)."""
    from meswitch.inputs import read_jsonl_records, read_text, string_field

    path = Path(path)
    raw = read_text(path)
    texts: list[str] = []
    if path.suffix == ".jsonl":
        for number, record in read_jsonl_records(path, raw):
            if "text" in record:
                texts.append(string_field(record, "text", path, number))
            elif "question" in record and "answer" in record:
                texts.append(f"{string_field(record, 'question', path, number)}\n"
                             f"{string_field(record, 'answer', path, number)}")
            else:
                raise ValueError(f"{path}:{number}: missing field 'text' (or 'question' and 'answer')")
    else:
        texts = [block.strip() for block in raw.split("\n\n") if block.strip()]
    if not texts:
        raise ValueError(f"{path}: no calibration text found")
    return texts[:limit] if limit else texts


def collect_channel_second_moments(model, tokenizer, texts: Sequence[str], max_length: int = 256,
                                   max_tokens: int = 16384) -> dict[str, np.ndarray]:
    """``{weight name: E[x^2] per input channel (float32)}`` for every ``nn.Linear`` of ``model``.

    Parameters
    ----------
    model
        A transformers causal LM (evaluated in float32 on CPU).
    tokenizer
        Its tokenizer.
    texts
        Calibration texts; tokenised one by one, truncated to ``max_length``.
    max_tokens
        Stop after this many tokens.
    """
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook_for(name: str):
        def hook(_module, inputs):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            squared = (x * x).sum(dim=0, dtype=torch.float64)
            sums[name] = squared if name not in sums else sums[name] + squared
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(hook_for(module_name + ".weight")))
    seen = 0
    try:
        model.eval()
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
                if ids.shape[1] == 0:
                    continue
                model(input_ids=ids)
                seen += ids.shape[1]
                if seen >= max_tokens:
                    break
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).numpy().astype(np.float32) for name in sums}
