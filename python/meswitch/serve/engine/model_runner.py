"""One forward over a flattened batch whose sequences belong to different experts.

Why not transformers' own forward: an HF model holds one set of weights, so every token of
a batch runs the same expert, and its batches are rectangular (padded) with a contiguous
cache per sequence. Serving needs per-sequence experts in one pass and ragged batches whose
sequences join and leave (prefill and decode tokens together) over a paged cache. So the
decoder is written out here (Llama, Mistral, Qwen2 share it), and every linear is

    y = x @ W_base^T                 one GEMM for all tokens of the batch
    y[seg_e] += x[seg_e] @ delta_e^T for each expert's segment (fused kernel, packed codes)

(an expert's segment of more than 16 tokens, a prefill, instead multiplies ``W_base + delta_e``
in the base's GEMM: ``base_matmul.Fold``), with the tokens ordered by expert: sequences are sorted once per forward (a sequence has
one expert, so its tokens stay contiguous) and the same order serves every linear.
Attention is batched over all the sequences of the forward through the paged KV cache
(``serve/engine/attention.py``).

Dtypes. The base's matrices and the KV cache are held in the checkpoint's 16-bit dtype
(float16 or bfloat16; ``dtype=`` overrides, and a float32 checkpoint stays float32), which
halves the memory float32 took and is what ``meswitch plan`` counts. Everything else runs in
float32: the residual stream and the activations, the norms, rotary, the attention scores
and softmax, and the delta kernel's accumulation (``multi_delta_matmul`` adds into a float32
``out``). On the CPU float32 activations are the more accurate and, from 8 tokens a forward
on, the cheaper choice: torch has no fast 16-bit GEMM on CPUs without AVX-512 BF16/FP16, so
the base GEMM (``serve/engine/base_matmul.py``, the one place it is done; figures there) widens the
weight a cache-sized slab at a time and multiplies in float32, 1.5-3.4x faster at 8-16
tokens than rounding the activations to 16 bit and without that rounding (bfloat16: 3e-3 of
the output's scale per product); at one token it is 1.4-1.9x slower. Keys and values are
rounded to the 16-bit dtype when the cache stores them, as a 16-bit model's are.

On a CUDA device (``device="cuda"``) the base weights, the KV cache and the activations live
on the GPU (the base GEMM there is cuBLAS's 16-bit GEMM); each linear's deltas of the whole
mixed batch are one launch of the CUDA kernel (``meswitch.cuda``) over a segment table
built once per forward from the sequences' experts, and the experts' deltas come from a
device tier (``store/device_tier.py``) that uploads them from the host tier through pinned
buffers and keeps them within a device byte budget.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meswitch.checkpoint import open_checkpoint
from meswitch.decoder_config import read_decoder_config
from meswitch.ops import add_delta_rows, multi_delta_matmul
from meswitch.serve.engine.attention import AttentionBatch, paged_attention
from meswitch.serve.engine.base_matmul import Fold, base_matmul, folds_apply
from meswitch.serve.engine.base_weights import load_base_weights, resolve_dtype
from meswitch.serve.engine.experts import ExpertSourceAdapter, ExpertWeights
from meswitch.serve.engine.kv_cache import PagedKVCache
from meswitch.serve.engine.rope import inverse_frequencies, rotate
from meswitch.store.device_tier import DeviceTier


@dataclass(frozen=True)
class SequenceInput:
    """The new tokens of one sequence in a forward: its whole prompt (prefill) or one token (decode).

    ``sequence`` identifies it across forwards (its cache blocks); ``expert`` is the expert's
    name, or ``None`` for the base model alone.
    """

    sequence: Hashable
    expert: str | None
    tokens: Sequence[int]


@dataclass
class _Group:
    """The contiguous tokens ``[start, stop)`` of one expert (``weights`` ``None``: the base)."""

    expert: str | None
    weights: ExpertWeights | None
    start: int
    stop: int
    device_deltas: dict[str, Any] | None = None  # on a GPU: the expert's deltas in the device tier


class MultiExpertModel:
    """A base model and its compressed experts, run together over one flattened batch.

    Parameters
    ----------
    base_dir
        The base's HF model directory (``config.json`` and safetensors); its weights are
        loaded once, the matrices in ``dtype``.
    experts
        Where experts come from: a mapping name -> :class:`~meswitch.artifact.ExpertArtifact`
        (or artifact directory), or an expert store (an object with ``acquire(name)`` and
        optionally ``release(name)``).
    kv_cache_bytes
        Byte budget of the paged KV cache (keys and values of all layers, in ``dtype``).
    block_size
        Tokens per KV cache block.
    device
        ``"cpu"`` (the fused CPU kernels) or a CUDA device (the CUDA kernels; needs a build with
        ``MESWITCH_CUDA=ON``).
    device_budget
        On a CUDA device: bytes of GPU memory for the experts' tiled deltas (the device tier).
    delta_activations
        On a CUDA device: the 16-bit type the activations are rounded to for the delta kernel
        (``torch.float16`` or ``torch.bfloat16``).
    dtype
        The dtype of the base's matrices and of the KV cache: ``"auto"`` (the checkpoint's
        own), ``torch.float16``, ``torch.bfloat16`` or ``torch.float32`` (or their names).
        Activations, norms and attention scores are float32 whatever it is.

    Raises
    ------
    ValueError
        The base is not a Llama, Mistral or Qwen2 model (the message names its architecture);
        ``dtype`` is none of the accepted ones, or ``"auto"`` over matrices stored in mixed dtypes.
    NotImplementedError
        Its rotary scaling kind is not implemented.
    """

    def __init__(self, base_dir: str | os.PathLike[str], experts: Any, *, kv_cache_bytes: int = 64 << 20,
                 block_size: int = 16, device: str | torch.device = "cpu", device_budget: int = 8 << 30,
                 delta_activations: torch.dtype = torch.float16, dtype: str | torch.dtype = "auto") -> None:
        self.base_dir = Path(base_dir)
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        # A device tier only on a GPU (and it refuses a build without CUDA before anything loads).
        self.device_tier = DeviceTier(self.device, device_budget) if self.on_gpu else None
        if delta_activations not in (torch.float16, torch.bfloat16):
            raise ValueError(f"delta_activations must be torch.float16 or torch.bfloat16, got {delta_activations}")
        self.delta_activations = delta_activations
        self.config = config = read_decoder_config(base_dir)
        self.inverse_frequencies = inverse_frequencies(config.rope, config.head_dim).to(self.device)
        checkpoint = open_checkpoint(base_dir)
        self.dtype = resolve_dtype(dtype, checkpoint)
        self.base = load_base_weights(checkpoint, self.dtype, self.device)
        self.experts = ExpertSourceAdapter(experts, self.base_dir)
        self.cache = PagedKVCache(config.num_layers, config.num_kv_heads, config.head_dim,
                                  budget_bytes=kv_cache_bytes, block_size=block_size, device=self.device,
                                  dtype=self.dtype)
        self._segment_tables: dict[tuple, Any] = {}  # this forward's, by token ranges
        self._sequence_experts: dict[Hashable, str | None] = {}

    # -- experts -------------------------------------------------------------------------

    def expert_weights(self, name: str, lease: Any = None) -> ExpertWeights:
        """The tensors of expert ``name`` as ``lease`` (held by the caller) hands them out, or
        under a lease taken and let go now (to check that the expert opens, or read its shape).

        The source gathered them when the expert was loaded (a store) or first opened (a
        mapping): nothing is prepared here, so no state is shared between the threads that call.
        """
        if lease is None:
            lease = self.experts.lease([name])
            try:
                return self.expert_weights(name, lease)
            finally:
                lease.release()
        return ExpertWeights(lease.tensors(name), lease[name], self.device)

    def vocab_size(self, expert: str | None) -> int:
        """Rows of the logits of a sequence of ``expert`` (its own, possibly expanded, vocabulary)."""
        if expert is None:
            return self.config.vocab_size
        weights = self.expert_weights(expert)
        return weights.rows(self._head_name, self.config.vocab_size)

    # -- the forward ---------------------------------------------------------------------

    def free(self, sequence: Hashable) -> None:
        """End ``sequence``: its KV blocks return to the pool."""
        self.cache.free(sequence)
        self._sequence_experts.pop(sequence, None)

    @torch.no_grad()
    def forward(self, inputs: Sequence[SequenceInput], *, last_only: bool = False) -> list[torch.Tensor]:
        """Run the new tokens of every sequence, appending their keys and values to the cache.

        Parameters
        ----------
        inputs
            One entry per sequence, in any order; each sequence at most once. A sequence
            seen for the first time starts at position 0; later ones continue where the
            cache ends.
        last_only
            Return only each sequence's last token's logits (what decoding needs).

        Returns
        -------
        Per input, in order, float32 logits ``[tokens (or 1), vocab]`` over that sequence's
        expert's own vocabulary.

        Raises
        ------
        meswitch.serve.KVCacheFull
            Too few free cache blocks for this step (nothing is changed then).
        ValueError
            A sequence listed twice, with no tokens, with another expert than before, a
            token outside its vocabulary, or past the model's positions or attention window.
        """
        # One lease holds every expert of the batch for the whole forward: a store never evicts a held one.
        lease = self.experts.lease(sorted({item.expert for item in inputs if item.expert is not None}))
        on_device: list[str] = []
        try:
            return self._forward(inputs, last_only, on_device, lease)
        finally:
            self._segment_tables.clear()
            for name in on_device:
                self.device_tier.release(name)
            lease.release()

    def _forward(self, inputs: Sequence[SequenceInput], last_only: bool, on_device: list[str],
                 lease: Any) -> list[torch.Tensor]:
        order, groups = self._arrange(inputs, lease)
        if self.on_gpu:  # hold each expert's deltas in the device tier for this forward
            for group in groups:
                if group.weights is not None and group.weights.deltas:
                    # an untied embedding's delta is only looked up (host rows), never multiplied
                    names = [n for n in group.weights.deltas
                             if n != "model.embed_tokens.weight" or n == self._head_name]
                    group.device_deltas = self.device_tier.acquire(group.expert, group.weights.artifact, names)
                    on_device.append(group.expert)
        tokens = torch.tensor([t for i in order for t in inputs[i].tokens], dtype=torch.int64, device=self.device)
        starts = [self.cache.length(inputs[i].sequence) for i in order]
        counts = [len(inputs[i].tokens) for i in order]
        self._check_positions([inputs[i] for i in order], starts, counts)
        self.cache.reserve({inputs[i].sequence: n for i, n in zip(order, counts)})
        for i in order:
            self._sequence_experts[inputs[i].sequence] = inputs[i].expert
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts)]).to(self.device)
        new_slots = torch.cat([self.cache.slots(inputs[i].sequence, s, s + n)
                               for i, s, n in zip(order, starts, counts)])
        attention = AttentionBatch.build(self.cache, [inputs[i].sequence for i in order], starts, counts)

        hidden = self._embed(tokens, groups)
        for layer in range(self.config.num_layers):
            hidden = self._layer(layer, hidden, groups, positions, new_slots, attention)
        hidden = self._rms_norm(hidden, "model.norm.weight", groups)
        offsets = np.cumsum([0, *counts])
        if last_only:
            keep = torch.tensor(offsets[1:] - 1, dtype=torch.int64, device=self.device)
            hidden = hidden[keep]
            groups = self._regroup(groups, [1] * len(counts), counts)
            offsets = np.arange(len(counts) + 1)
        parts = self._logits(hidden, groups)
        result: list[torch.Tensor] = [torch.empty(0)] * len(inputs)
        group = 0
        for rank, i in enumerate(order):  # sorted order: each group's sequences are consecutive
            row = int(offsets[rank])
            while row >= groups[group].stop:
                group += 1
            begin = row - groups[group].start
            result[i] = parts[group][begin:begin + int(offsets[rank + 1] - offsets[rank])]
        return result

    def _arrange(self, inputs: Sequence[SequenceInput], lease: Any) -> tuple[list[int], list[_Group]]:
        """The inputs' order sorted by expert (the base first) and each expert's token range."""
        seen: set[Hashable] = set()
        for item in inputs:
            if item.sequence in seen:
                raise ValueError(f"sequence {item.sequence!r} appears twice in one forward")
            seen.add(item.sequence)
            if len(item.tokens) == 0:
                raise ValueError(f"sequence {item.sequence!r} has no new tokens")
            known = self._sequence_experts.get(item.sequence, item.expert)
            if item.sequence in self._sequence_experts and known != item.expert:
                raise ValueError(f"sequence {item.sequence!r} runs expert {known!r}, not {item.expert!r}")
        names = sorted({item.expert for item in inputs}, key=lambda name: (name is not None, name or ""))
        rank = {name: r for r, name in enumerate(names)}
        order = sorted(range(len(inputs)), key=lambda i: rank[inputs[i].expert])  # stable
        groups, start = [], 0
        for name in names:
            size = sum(len(inputs[i].tokens) for i in order if inputs[i].expert == name)
            weights = None if name is None else self.expert_weights(name, lease)
            groups.append(_Group(name, weights, start, start + size))
            start += size
        return order, groups

    @staticmethod
    def _regroup(groups: list[_Group], new_counts: list[int], counts: list[int]) -> list[_Group]:
        """``groups`` after each sequence's ``counts[s]`` tokens became ``new_counts[s]``."""
        result, old, new, s = [], 0, 0, 0
        for group in groups:
            size = 0
            while old < group.stop:
                old += counts[s]
                size += new_counts[s]
                s += 1
            result.append(_Group(group.expert, group.weights, new, new + size, group.device_deltas))
            new += size
        return result

    def _check_positions(self, inputs: list[SequenceInput], starts: list[int], counts: list[int]) -> None:
        limit = self.config.max_position_embeddings
        for item, start, count in zip(inputs, starts, counts):
            if start + count > limit:
                raise ValueError(f"sequence {item.sequence!r} would reach {start + count} tokens, past the "
                                 f"model's {limit} positions")

    # -- pieces of the decoder -------------------------------------------------------------

    def _embed(self, tokens: torch.Tensor, groups: list[_Group]) -> torch.Tensor:
        table = self.base["model.embed_tokens.weight"]
        hidden = torch.empty((tokens.shape[0], table.shape[1]), dtype=torch.float32, device=self.device)
        for group in groups:
            ids = tokens[group.start:group.stop]
            if group.weights is not None:
                hidden[group.start:group.stop] = group.weights.lookup("model.embed_tokens.weight", table, ids)
                continue
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
                bad = int(ids[(ids < 0) | (ids >= table.shape[0])][0])
                raise ValueError(f"token id {bad} is outside the vocabulary of the base ({table.shape[0]} tokens)")
            hidden[group.start:group.stop] = table[ids]
        return hidden

    def _per_token(self, name: str, groups: list[_Group]) -> torch.Tensor | None:
        """A small whole tensor (norm weight, bias) for each token: ``[dim]`` when all share the base's,
        else ``[tokens, dim]`` with each expert's own; ``None`` when no one has it."""
        base = self.base.get(name)
        own = [base if g.weights is None else g.weights.whole.get(name, base) for g in groups]
        if all(t is base for t in own):
            return base
        if any(t is None for t in own):
            dim = next(t for t in own if t is not None).shape[0]
            own = [torch.zeros(dim, device=self.device) if t is None else t for t in own]
        sizes = torch.tensor([g.stop - g.start for g in groups], device=self.device)
        return torch.repeat_interleave(torch.stack(own), sizes, dim=0)

    def _rms_norm(self, x: torch.Tensor, name: str, groups: list[_Group]) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self._per_token(name, groups) * (x * torch.rsqrt(variance + self.config.rms_norm_eps))

    def _segments(self, groups: list[_Group]) -> Any:
        """The CUDA segment table of these token ranges (group i is expert i; the base has no delta)."""
        from meswitch import cuda

        key = tuple((g.start, g.stop, g.device_deltas is not None) for g in groups)
        table = self._segment_tables.get(key)
        if table is None:
            ids = np.concatenate([np.full(g.stop - g.start, i if g.device_deltas is not None else -1, dtype=np.int64)
                                  for i, g in enumerate(groups)])
            table = self._segment_tables[key] = cuda.build_segments(ids, len(groups), device=self.device)
        return table

    def _linear(self, x: torch.Tensor, name: str, groups: list[_Group]) -> torch.Tensor:
        """Base GEMM for all tokens, each expert's own rows (dense or fused delta) by segment, bias."""
        if self.on_gpu:
            return self._linear_on_gpu(x, name, groups)
        weight = self.base[name]
        folded = {id(group) for group in groups if self._folds(group, name, weight.shape[0])}
        folds = [Fold(g.start, g.stop, partial(add_delta_rows, g.weights.deltas[name])) for g in groups
                 if id(g) in folded]
        out = base_matmul(x, weight, folds)
        run: list[_Group] = []
        for group in [*groups, None]:
            delta = None if group is None or group.weights is None else group.weights.deltas.get(name)
            if delta is not None and id(group) in folded:
                delta = None  # applied with the base's GEMM
            if delta is not None and (not run or run[-1].stop == group.start):
                run.append(group)
                continue
            if run:  # one kernel call for consecutive expert segments
                a, b = run[0].start, run[-1].stop
                multi_delta_matmul(x[a:b], [g.weights.deltas[name] for g in run],
                                   [g.start - a for g in run] + [b - a], out=out[a:b])
                run = [group] if delta is not None else []
            if group is not None and group.weights is not None and name in group.weights.whole:
                dense = group.weights.whole[name]
                out[group.start:group.stop] = x[group.start:group.stop] @ dense[:out.shape[1]].T
        bias = self._per_token(name.removesuffix(".weight") + ".bias", groups)
        return out if bias is None else out + bias

    @staticmethod
    def _folds(group: _Group, name: str, rows: int) -> bool:
        """Whether ``group``'s delta of ``name`` is folded into the base's GEMM (base_matmul.Fold)."""
        if group.weights is None or name not in group.weights.deltas or not folds_apply(group.stop - group.start):
            return False
        artifact, weight = group.weights.deltas[name]
        return artifact is not None and artifact.tensors[weight]["rows"] == rows

    def _linear_on_gpu(self, x: torch.Tensor, name: str, groups: list[_Group]) -> torch.Tensor:
        """As :meth:`_linear`, with every expert's delta of the batch in one CUDA launch."""
        out = base_matmul(x, self.base[name])
        deltas = [None if g.device_deltas is None else g.device_deltas.get(name) for g in groups]
        tiled = [None if isinstance(delta, torch.Tensor) else delta for delta in deltas]
        if any(delta is not None for delta in tiled):
            multi_delta_matmul(x.to(self.delta_activations), tiled, self._segments(groups), out=out)
        for group, delta in zip(groups, deltas):
            if isinstance(delta, torch.Tensor):  # a shape the kernel does not take: the dense delta
                out[group.start:group.stop, :delta.shape[0]] += x[group.start:group.stop] @ delta.T
            if group.weights is not None and name in group.weights.whole:
                out[group.start:group.stop] = x[group.start:group.stop] @ group.weights.whole[name][:out.shape[1]].T
        bias = self._per_token(name.removesuffix(".weight") + ".bias", groups)
        return out if bias is None else out + bias

    def _layer(self, layer: int, hidden: torch.Tensor, groups: list[_Group], positions: torch.Tensor,
               new_slots: torch.Tensor, attention: AttentionBatch) -> torch.Tensor:
        config, prefix = self.config, f"model.layers.{layer}."
        x = self._rms_norm(hidden, prefix + "input_layernorm.weight", groups)
        shape = (x.shape[0], -1, config.head_dim)
        q = self._linear(x, prefix + "self_attn.q_proj.weight", groups).view(shape)
        k = self._linear(x, prefix + "self_attn.k_proj.weight", groups).view(shape)
        v = self._linear(x, prefix + "self_attn.v_proj.weight", groups).view(shape)
        q = rotate(q, positions, self.inverse_frequencies)
        k = rotate(k, positions, self.inverse_frequencies)
        self.cache.write(layer, new_slots, k, v)
        attended = paged_attention(q, self.cache, layer, attention, window=config.sliding_windows[layer])
        hidden = hidden + self._linear(attended.reshape(x.shape[0], -1), prefix + "self_attn.o_proj.weight", groups)
        x = self._rms_norm(hidden, prefix + "post_attention_layernorm.weight", groups)
        gate = self._linear(x, prefix + "mlp.gate_proj.weight", groups)
        up = self._linear(x, prefix + "mlp.up_proj.weight", groups)
        return hidden + self._linear(torch.nn.functional.silu(gate) * up, prefix + "mlp.down_proj.weight", groups)

    @property
    def _head_name(self) -> str:
        """The output matrix: ``lm_head.weight``, or the embedding when the two are tied."""
        tied = self.config.tie_word_embeddings and "lm_head.weight" not in self.base
        return "model.embed_tokens.weight" if tied else "lm_head.weight"

    def _logits(self, hidden: torch.Tensor, groups: list[_Group]) -> list[torch.Tensor]:
        """Per expert group, its tokens' logits over that expert's own vocabulary: the base's rows
        by the fused linear, then the rows an expanded vocabulary adds."""
        name = self._head_name
        base_logits = self._linear(hidden, name, groups)
        parts = []
        for group in groups:
            part = base_logits[group.start:group.stop]
            weights = group.weights
            extra = None if weights is None else weights.extra_rows.get(name)
            if weights is not None and name in weights.whole:
                extra = weights.whole[name][base_logits.shape[1]:]
            if extra is not None and extra.shape[0]:
                part = torch.cat([part, hidden[group.start:group.stop] @ extra.T], dim=1)
            parts.append(part)
        return parts
