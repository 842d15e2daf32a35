"""Causal grouped-query attention of each sequence's new tokens over its paged keys and values."""

from __future__ import annotations

import math

import torch

from meswitch.serve.kv_cache import PagedKVCache


def paged_attention(queries: torch.Tensor, cache: PagedKVCache, layer: int, slots: list[torch.Tensor],
                    starts: list[int], counts: list[int], *, window: int | None = None) -> torch.Tensor:
    """Attention output ``[tokens, heads, head_dim]`` of a flattened batch.

    Parameters
    ----------
    queries
        ``[tokens, heads, head_dim]``, already rotated: sequence ``s`` owns ``counts[s]``
        consecutive rows, its tokens at positions ``starts[s] ...``.
    cache, layer
        The cache holding every sequence's keys and values of this layer, the new ones included.
    slots
        Per sequence, the cache slots of its positions ``0 .. starts[s] + counts[s] - 1``.
    window
        Attention window in tokens (``None``: whole sequence): a query at position ``p``
        sees keys at ``p - window < j <= p``, as transformers' sliding-window mask.
    """
    heads = queries.shape[1]
    output = torch.empty_like(queries)
    scale = 1.0 / math.sqrt(queries.shape[-1])
    row = 0
    for sequence_slots, start, count in zip(slots, starts, counts):
        keys, values = cache.read(layer, sequence_slots)
        groups = heads // keys.shape[1]  # query heads sharing one key/value head
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
        q = queries[row:row + count]
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
        query_positions = torch.arange(start, start + count, device=queries.device)[:, None]
        key_positions = torch.arange(keys.shape[0], device=queries.device)[None, :]
        allowed = key_positions <= query_positions  # causal within the new tokens
        if window is not None:
            allowed &= key_positions > query_positions - window
        scores = scores.masked_fill(~allowed, float("-inf"))
        output[row:row + count] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), values)
        row += count
    return output
