"""One request, start to end: tokenize with the expert's own tokenizer, prefill, decode, detokenize."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch

from meswitch.serve.engine.model_runner import MultiExpertModel, SequenceInput
from meswitch.serve.engine.tokenizer import SharedTokenizer, load_tokenizer


def expert_tokenizer(model: MultiExpertModel, expert: str | None) -> SharedTokenizer:
    """The tokenizer of ``expert`` (its artifact's ``expert/`` directory) or of the base (``None``)."""
    if expert is None:
        return load_tokenizer(str(model.base_dir))
    directory = Path(model.expert_weights(expert).artifact.path) / "expert"
    return load_tokenizer(str(directory))


def generate(model: MultiExpertModel, expert: str | None, prompt: str, max_tokens: int = 64, *,
             temperature: float = 0.0, seed: int | None = None, stop_at_eos: bool = True,
             stop_token_ids: Collection[int] | None = None) -> str:
    """The text ``expert`` (``None``: the base) continues ``prompt`` with.

    Parameters
    ----------
    model
        The multi-expert model.
    expert
        The expert's name in the model's expert source, or ``None`` for the base.
    prompt
        Text, tokenized with that expert's own tokenizer.
    max_tokens
        At most this many new tokens.
    temperature
        0 decodes greedily; above 0 samples from ``softmax(logits / temperature)``.
    seed
        Seed of the sampler (only with ``temperature > 0``).
    stop_at_eos
        Stop at a stop token (not included in the text).
    stop_token_ids
        The stop tokens; ``None``: the expert's own (its EOS and its chat template's end
        of turn, :attr:`~meswitch.serve.engine.tokenizer.SharedTokenizer.stop_token_ids`).

    Returns
    -------
    The new text only (the prompt is not repeated).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    tokenizer = expert_tokenizer(model, expert)
    stops = frozenset(tokenizer.stop_token_ids if stop_token_ids is None else stop_token_ids) if stop_at_eos else ()
    tokens = tokenizer.encode(prompt)
    if not tokens:
        raise ValueError("the prompt encodes to no tokens")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sequence, new = object(), []  # an id no other caller can share
    try:
        step = tokens
        for _ in range(max_tokens):
            logits = model.forward([SequenceInput(sequence, expert, step)], last_only=True)[0][-1]
            if temperature == 0:
                token = int(torch.argmax(logits))
            else:
                probabilities = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probabilities.cpu(), 1, generator=generator))  # the host RNG on any device
            if token in stops:
                break
            new.append(token)
            step = [token]
    finally:
        model.free(sequence)
    return tokenizer.decode(new)
