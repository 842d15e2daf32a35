"""How a request samples: its parameters, and the sampler turning one row of logits into a token.

Every request samples with its own ``torch.Generator``: a seeded request draws the same
tokens whatever else shares its batches, because no other request touches its generator
and each token takes exactly one draw (greedy ones take none). The filters follow the
usual order: temperature scales the logits, top-k keeps the ``k`` largest, top-p then
keeps the smallest set of the most likely tokens whose probabilities reach ``p``.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

#: Stop strings a request may give at most (the OpenAI API's limit).
MAX_STOP_STRINGS = 4
#: Seeds ``torch.Generator.manual_seed`` takes.
_SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """What one request generates and how it picks each token.

    Parameters
    ----------
    max_tokens
        At most this many new tokens (>= 1).
    temperature
        ``>= 0``; 0 decodes greedily (the most likely token, no randomness).
    top_p
        In ``(0, 1]``: sample among the most likely tokens whose probabilities sum to at
        least ``top_p`` (1: all).
    top_k
        ``>= 0``: sample among the ``top_k`` most likely tokens (0: all).
    seed
        Seed of the request's own generator: the same seed gives the same tokens.
        ``None`` draws a fresh one.
    stop
        At most four non-empty strings; generation ends before the first one to appear,
        which is not part of the text. A single string is taken as one stop string.
    ignore_eos
        Keep generating past the expert's stop tokens (its EOS and its chat template's end of turn).

    Raises
    ------
    ValueError
        A field out of range; the message starts with the field's name, e.g.
        ``"top_p: must be in (0, 1], got 0"``.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k: must be an integer >= 0 (0: off), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1]):
            raise ValueError(f"seed: must be an integer in [-2**63, 2**64), got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        try:
            stop = tuple(stop)
        except TypeError:
            raise ValueError(f"stop: must be a string or a sequence of strings, got {self.stop!r}") from None
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        for item in stop:
            if not isinstance(item, str) or not item:
                raise ValueError(f"stop: every stop string must be a non-empty string, got {item!r}")
        object.__setattr__(self, "stop", stop)
        if not isinstance(self.ignore_eos, bool):  # a ValueError naming the field, as for every field
            raise ValueError(f"ignore_eos: must be true or false, got {self.ignore_eos!r}")  # noqa: TRY004

    @property
    def greedy(self) -> bool:
        """Whether the request takes the most likely token every time (temperature 0)."""
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        """A new generator for one request (``None`` when greedy: it never draws)."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator().manual_seed(seed)


def filtered_probabilities(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                           top_k: int = 0) -> torch.Tensor:
    """The distribution a request samples from: ``softmax(logits / temperature)`` cut by top-k and top-p.

    Parameters
    ----------
    logits
        float32 ``[vocab]``.
    temperature
        ``> 0``.
    top_p, top_k
        As in :class:`SamplingParams`. Top-k keeps every token tied with the ``k``-th
        largest logit; top-p keeps a token when the tokens more likely than it hold less
        than ``top_p`` (so the most likely token always stays).

    Returns
    -------
    float32 ``[vocab]`` probabilities summing to 1, zero outside the kept tokens.
    """
    scaled = logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probabilities = torch.softmax(scaled, dim=-1)
    if top_p < 1:
        ordered, order = torch.sort(probabilities, descending=True)
        before = torch.cumsum(ordered, dim=-1) - ordered  # mass of the more likely tokens
        ordered = ordered.masked_fill(before >= top_p, 0.0)
        probabilities = torch.zeros_like(probabilities).scatter_(-1, order, ordered)
        probabilities /= probabilities.sum()
    return probabilities


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token for one sequence from its last position's ``logits`` ``[vocab]``.

    Greedy requests take ``argmax``; the others draw once from :func:`filtered_probabilities`
    with ``generator``.
    """
    if params.greedy:
        return int(torch.argmax(logits))
    probabilities = filtered_probabilities(logits, params.temperature, params.top_p, params.top_k)
    return int(torch.multinomial(probabilities, 1, generator=generator))
