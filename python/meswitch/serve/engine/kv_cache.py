"""A paged KV cache: fixed-size blocks of key/value slots shared by all sequences.

Layout, per layer::

    keys[layer], values[layer] : dtype [num_blocks, block_size, kv_heads, head_dim]

``dtype`` is the model's weight dtype (float16 or bfloat16 for a 16-bit checkpoint): keys
and values are rounded to it once, when written, which halves the cache against float32.

A sequence owns a block table (block ids in token order); token ``t`` lives in block
``table[t // block_size]`` at offset ``t % block_size``. Sequences grow a block at a time
and give their blocks back when they end, so sequences of any length join and leave
without moving anyone else's keys, and the pool's size is a byte budget fixed up front.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence

import torch

from meswitch.serve.engine.base_weights import DTYPE_NAMES


class KVCacheFull(RuntimeError):
    """The block pool has too few free blocks for a request."""


class PagedKVCache:
    """Key/value blocks for every layer, with a free list and a block table per sequence.

    Parameters
    ----------
    num_layers, kv_heads, head_dim
        The decoder's shape.
    budget_bytes
        Bytes for keys and values of all layers; the pool holds as many whole blocks as fit.
    block_size
        Tokens per block.
    device
        Where the blocks live (``"cpu"``, ``"cuda"``); block tables stay on the host.
    dtype
        The element type of the stored keys and values (``torch.float16``, ``torch.bfloat16``
        or ``torch.float32``); :attr:`block_bytes` counts its real size.

    Raises
    ------
    ValueError
        The budget holds no block at all (the message says how many bytes one needs).
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, *, budget_bytes: int,
                 block_size: int = 16, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        accepted = [getattr(torch, name) for name in DTYPE_NAMES]
        if dtype not in accepted:
            raise ValueError(f"KV cache dtype must be one of {', '.join(map(str, accepted))}, got {dtype}")
        self.block_size = block_size
        self.dtype = dtype
        self.block_bytes = 2 * num_layers * block_size * kv_heads * head_dim * dtype.itemsize  # K and V
        self.num_blocks = int(budget_bytes) // self.block_bytes
        if self.num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget_bytes} bytes holds no block: one block of "
                             f"{block_size} tokens takes {self.block_bytes} bytes over {num_layers} layers")
        shape = (self.num_blocks, block_size, kv_heads, head_dim)
        self.device = torch.device(device)
        self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self._free: deque[int] = deque(range(self.num_blocks))
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def __contains__(self, sequence: Hashable) -> bool:
        return sequence in self._tables

    def length(self, sequence: Hashable) -> int:
        """Tokens cached for ``sequence`` (0 for one not seen yet)."""
        return self._lengths.get(sequence, 0)

    def block_table(self, sequence: Hashable) -> list[int]:
        return list(self._tables.get(sequence, ()))

    def blocks_needed(self, sequence: Hashable, new_tokens: int) -> int:
        """New blocks ``sequence`` takes to grow by ``new_tokens``."""
        have = len(self._tables.get(sequence, ()))
        return max(0, -(-(self.length(sequence) + new_tokens) // self.block_size) - have)

    def reserve(self, growth: dict[Hashable, int]) -> None:
        """Grow each sequence by its number of tokens, all or none.

        Raises
        ------
        KVCacheFull
            The free blocks do not cover the whole request; nothing is allocated then.
        """
        needed = {sequence: self.blocks_needed(sequence, tokens) for sequence, tokens in growth.items()}
        total = sum(needed.values())
        if total > len(self._free):
            raise KVCacheFull(f"KV cache exhausted: this step needs {total} more blocks of {self.block_size} tokens, "
                              f"{len(self._free)} of {self.num_blocks} are free ({self.block_bytes} bytes a block); "
                              f"free finished sequences or raise the budget")
        for sequence, tokens in growth.items():
            table = self._tables.setdefault(sequence, [])
            table.extend(self._free.popleft() for _ in range(needed[sequence]))
            self._lengths[sequence] = self.length(sequence) + tokens

    def slots(self, sequence: Hashable, start: int, stop: int) -> torch.Tensor:
        """int64 flat slot ids (``block * block_size + offset``) of tokens ``[start, stop)``, on the cache's device."""
        positions = torch.arange(start, stop, dtype=torch.int64)
        table = torch.tensor(self._tables[sequence], dtype=torch.int64)
        slots = table[positions // self.block_size] * self.block_size + positions % self.block_size
        return slots.to(self.device)

    def slot_table(self, sequences: Sequence[Hashable], length: int) -> torch.Tensor:
        """int64 ``[len(sequences), length]`` on the cache's device: row ``s`` the slots of
        ``sequences[s]``'s tokens ``0 .. length - 1``.

        Past a sequence's own blocks the slots point at block 0: the caller masks them out
        (they let sequences of different lengths share one rectangular gather).
        """
        blocks = -(-length // self.block_size)
        table = torch.zeros((len(sequences), blocks), dtype=torch.int64)
        for row, sequence in enumerate(sequences):
            own = self._tables[sequence][:blocks]
            table[row, :len(own)] = torch.tensor(own, dtype=torch.int64)
        positions = torch.arange(length, dtype=torch.int64)
        slots = table[:, positions // self.block_size] * self.block_size + positions % self.block_size
        return slots.to(self.device)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` ``[tokens, kv_heads, head_dim]`` at ``slots`` (rounded to the cache's dtype)."""
        self.keys[layer].view(-1, *keys.shape[1:])[slots] = keys.to(self.dtype)
        self.values[layer].view(-1, *values.shape[1:])[slots] = values.to(self.dtype)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[*slots.shape, kv_heads, head_dim]`` at ``slots`` (any shape), in the cache's dtype."""
        shape = self.keys[layer].shape[2:]
        return self.keys[layer].view(-1, *shape)[slots], self.values[layer].view(-1, *shape)[slots]

    def free(self, sequence: Hashable) -> None:
        """Return ``sequence``'s blocks to the pool (a no-op for an unknown sequence)."""
        self._free.extend(self._tables.pop(sequence, ()))
        self._lengths.pop(sequence, None)
