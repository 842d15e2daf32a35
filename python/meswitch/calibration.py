"""Activation statistics for activation-aware salient channels, step sizes and GPTQ.

A forward pre-hook on every ``nn.Linear`` of the expert accumulates, over the
calibration tokens, either the second moment ``E[x_i^2]`` of each input channel (the
weight the paper's error ``sum_tokens ||x_i * (D - Q(D))[:, i]||^2`` puts on column
``i``: all the round-to-nearest quantizer needs) or the whole second-moment matrix
``H = E[x x^T]`` of the input, which the error-compensating quantizer
(``include/meswitch/gptq.hpp``) needs; its diagonal is ``E[x_i^2]``.
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


def token_sequences(tokenizer, texts: Sequence[str], max_length: int, what: str) -> list:
    """Each text as a 1-D ``torch`` id tensor: BOS (else EOS) then at most ``max_length - 1`` tokens.

    Texts shorter than two tokens are dropped; none left is a ValueError naming ``what``.
    """
    import torch

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sequences = [torch.tensor([start] + tokenizer(t, add_special_tokens=False)["input_ids"][: max_length - 1])
                 for t in texts]
    sequences = [s for s in sequences if len(s) >= 2]
    if not sequences:
        raise ValueError(f"{what}: every calibration text is empty after tokenization")
    return sequences


def _run_calibration(model, tokenizer, texts: Sequence[str], max_length: int, max_tokens: int, hook_for) -> None:
    """Run ``model`` on ``texts`` with ``hook_for(weight name)`` as a pre-hook on every ``nn.Linear``."""
    import torch

    handles = []
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


def collect_input_hessians(model, tokenizer, texts: Sequence[str], max_length: int = 256,
                           max_tokens: int = 16384) -> dict[str, np.ndarray]:
    """``{weight name: E[x x^T] of its input (float32 [cols, cols])}`` for every ``nn.Linear`` of ``model``.

    Linears that read the same input tensor (the attention projections, the gate and up
    projections) share one accumulator and one returned array, so a layer holds one
    matrix per distinct input. Accumulation is in float64.

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
    owner: dict[str, str] = {}  # weight -> the weight whose accumulator it shares
    last: dict[str, object] = {"input": None, "name": None}

    def hook_for(name: str):
        def hook(_module, inputs):
            if last["input"] is inputs[0]:  # the same tensor as the linear just before: share
                owner.setdefault(name, owner[last["name"]])
                return
            owner.setdefault(name, name)
            last["input"], last["name"] = inputs[0], name
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            product = x.T @ x
            key = owner[name]
            sums[key] = product if key not in sums else sums[key] + product
            counts[key] = counts.get(key, 0) + x.shape[0]
        return hook

    _run_calibration(model, tokenizer, texts, max_length, max_tokens, hook_for)
    arrays = {key: (sums[key] / counts[key]).numpy().astype(np.float32) for key in sums}
    return {name: arrays[key] for name, key in owner.items()}


def collect_channel_second_moments(model, tokenizer, texts: Sequence[str], max_length: int = 256,
                                   max_tokens: int = 16384) -> dict[str, np.ndarray]:
    """``{weight name: E[x^2] per input channel (float32)}`` for every ``nn.Linear`` of ``model``.

    The parameters are those of :func:`collect_input_hessians`; this keeps one float per
    input channel instead of a ``[cols, cols]`` matrix.
    """
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_module, inputs):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            squared = (x * x).sum(dim=0, dtype=torch.float64)
            sums[name] = squared if name not in sums else sums[name] + squared
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    _run_calibration(model, tokenizer, texts, max_length, max_tokens, hook_for)
    return {name: (sums[name] / counts[name]).numpy().astype(np.float32) for name in sums}
