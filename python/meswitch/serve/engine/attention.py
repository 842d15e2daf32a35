"""Causal grouped-query attention of a batch's new tokens over their paged keys and values.

The batched path (:func:`paged_attention`) lays each sequence of a forward out as one row of
a padded batch and calls ``torch.nn.functional.scaled_dot_product_attention`` once per layer
for all of them::

    queries  [seqs, kv_heads, groups * width, head_dim]   a row: one sequence's new tokens, padded to width
    keys     [seqs, kv_heads, max_len, head_dim]          gathered through the block tables, one index tensor
    values   [seqs, kv_heads, max_len, head_dim]
    mask     [seqs, 1, groups * width, max_len]           causality, the sliding window and padding

Why padded rows rather than a varlen layout: torch has no varlen attention on the CPU, and
one dense call over a padded batch is what its fused CPU and GPU kernels take. Why the query
heads of one key/value head (``groups`` of them) are folded into the query axis: every
group shares its key/value head, so the keys are gathered once at ``kv_heads`` instead of
being expanded ``groups`` times (as ``enable_gqa`` or ``repeat_interleave`` would do).

Padding costs work: every row is as wide as the widest sequence of its call. A step of the
engine mixes decode tokens (one per sequence) with prefill chunks of up to thousands of
tokens, and one rectangle over both would compute ``seqs * chunk`` query rows where there
are ``seqs - 1 + chunk``. So the sequences are split by width into classes of powers of two
(1, 2, 3-4, 5-8, ...): a class pads its queries by less than 2x, a decode-only step is one
call, and a step that mixes one prefill chunk with decodes is two.

Scores, softmax and the output are float32 (queries are float32; the gathered 16-bit keys
and values are widened after the gather, so only this step's keys are ever float32).
:func:`reference_paged_attention` is the plain per-sequence loop this replaces, kept as the
specification the tests compare against.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from meswitch.serve.engine.kv_cache import PagedKVCache


@dataclass
class _WidthClass:
    """The sequences of one width class, as rows of a padded batch.

    ``query_rows[r, w]`` is the flattened batch row of row ``r``'s ``w``-th new token; past a
    sequence's own tokens it repeats its last one (a real query: no fully masked row, no
    NaN; its output is dropped). ``real`` marks the entries that are the sequence's own.
    """

    query_rows: torch.Tensor  # int64 [rows, width]
    real: torch.Tensor  # bool [rows, width]
    query_positions: torch.Tensor  # int64 [rows, width]
    key_slots: torch.Tensor  # int64 [rows, max_len]
    key_valid: torch.Tensor  # bool [rows, max_len]
    masks: dict[tuple[int | None, int], torch.Tensor] = field(default_factory=dict)  # by (window, groups)

    def mask(self, window: int | None, groups: int) -> torch.Tensor:
        """bool ``[rows, 1, groups * width, max_len]``: which keys each (folded) query sees."""
        if (window, groups) not in self.masks:
            key_positions = torch.arange(self.key_slots.shape[1], device=self.key_slots.device)[None, None, :]
            query_positions = self.query_positions[:, :, None]
            allowed = self.key_valid[:, None, :] & (key_positions <= query_positions)  # causal
            if window is not None:  # transformers' sliding window: p - window < j <= p
                allowed &= key_positions > query_positions - window
            self.masks[window, groups] = allowed.repeat(1, groups, 1)[:, None]  # the folded axis is group-major
        return self.masks[window, groups]


@dataclass
class AttentionBatch:
    """Where every sequence of one forward sits in the padded layout; built once, used by every layer.

    Build it with :meth:`build` after the cache has grown by the forward's tokens.
    """

    classes: list[_WidthClass]

    @classmethod
    def build(cls, cache: PagedKVCache, sequences: Sequence[Hashable], starts: Sequence[int],
              counts: Sequence[int]) -> AttentionBatch:
        """The layout of a flattened batch in which sequence ``s`` owns ``counts[s]`` consecutive rows.

        Parameters
        ----------
        cache
            The cache, already grown to ``starts[s] + counts[s]`` tokens for each sequence.
        sequences, starts, counts
            Per sequence, in the flattened batch's order: its id in the cache, the position
            of its first new token and how many new tokens it has (>= 1).
        """
        device = cache.device
        first_rows = [0]
        for count in counts:
            first_rows.append(first_rows[-1] + count)
        by_class: dict[int, list[int]] = {}
        for s, count in enumerate(counts):
            by_class.setdefault(max(count - 1, 0).bit_length(), []).append(s)
        classes = []
        for members in by_class.values():
            width = max(counts[s] for s in members)
            offsets = torch.arange(width)
            count = torch.tensor([counts[s] for s in members])[:, None]
            own = offsets[None, :].expand(len(members), width)
            clamped = torch.minimum(own, count - 1)  # padding repeats the last new token
            query_rows = torch.tensor([first_rows[s] for s in members])[:, None] + clamped
            query_positions = torch.tensor([starts[s] for s in members])[:, None] + clamped
            lengths = torch.tensor([starts[s] + counts[s] for s in members])
            max_len = int(lengths.max())
            classes.append(_WidthClass(
                query_rows=query_rows.to(device), real=(own < count).to(device),
                query_positions=query_positions.to(device),
                key_slots=cache.slot_table([sequences[s] for s in members], max_len),
                key_valid=(torch.arange(max_len)[None, :] < lengths[:, None]).to(device)))
        return cls(classes)


def paged_attention(queries: torch.Tensor, cache: PagedKVCache, layer: int, batch: AttentionBatch, *,
                    window: int | None = None) -> torch.Tensor:
    """Attention output, float32 ``[tokens, heads, head_dim]``, of a flattened batch: one call per width class.

    Parameters
    ----------
    queries
        float32 ``[tokens, heads, head_dim]``, already rotated, in the flattened order
        :class:`AttentionBatch` was built for.
    cache, layer
        The cache holding every sequence's keys and values of this layer, the new ones included.
    batch
        The forward's layout (:meth:`AttentionBatch.build`).
    window
        Attention window in tokens (``None``: whole sequence): a query at position ``p``
        sees keys at ``p - window < j <= p``, as transformers' sliding-window mask.
    """
    tokens, heads, head_dim = queries.shape
    output = torch.empty(tokens, heads, head_dim, dtype=torch.float32, device=queries.device)
    for width_class in batch.classes:
        rows, width = width_class.query_rows.shape
        keys, values = cache.read(layer, width_class.key_slots)  # [rows, max_len, kv_heads, head_dim]
        kv_heads = keys.shape[2]
        groups = heads // kv_heads
        # [rows, width, kv, groups, d] -> [rows, kv, groups * width, d]: a key/value head's queries together
        folded = (queries[width_class.query_rows].view(rows, width, kv_heads, groups, head_dim)
                  .permute(0, 2, 3, 1, 4).reshape(rows, kv_heads, groups * width, head_dim))
        attended = torch.nn.functional.scaled_dot_product_attention(
            folded.float(), keys.transpose(1, 2).float(), values.transpose(1, 2).float(),
            attn_mask=width_class.mask(window, groups))
        unfolded = (attended.view(rows, kv_heads, groups, width, head_dim).permute(0, 3, 1, 2, 4)
                    .reshape(rows, width, heads, head_dim))
        output[width_class.query_rows[width_class.real]] = unfolded[width_class.real]
    return output


def reference_paged_attention(queries: torch.Tensor, cache: PagedKVCache, layer: int,
                              slots: list[torch.Tensor], starts: list[int], counts: list[int], *,
                              window: int | None = None) -> torch.Tensor:
    """The specification of :func:`paged_attention`: a plain loop over the sequences, float32.

    ``slots[s]`` are the cache slots of sequence ``s``'s positions ``0 .. starts[s] + counts[s] - 1``;
    the other arguments are as in :func:`paged_attention`.
    """
    heads = queries.shape[1]
    output = torch.empty(queries.shape, dtype=torch.float32, device=queries.device)
    scale = 1.0 / math.sqrt(queries.shape[-1])
    row = 0
    for sequence_slots, start, count in zip(slots, starts, counts):
        keys, values = (t.float() for t in cache.read(layer, sequence_slots))
        groups = heads // keys.shape[1]  # query heads sharing one key/value head
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
        q = queries[row:row + count].float()
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
