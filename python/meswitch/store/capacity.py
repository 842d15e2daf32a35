"""How many compressed experts fit on one accelerator beside the base and the KV cache.

The count comes from the artifact format's own byte counts (docs/format.md): a delta
matrix ``[rows, cols]`` stores ``rows * ceil(cols * bits / 32)`` code words, an f16 scale
and a u8 zero point per group and row, and ``k`` salient columns as f16 values plus their
i32 indices; 1-D tensors (norms, biases) are stored whole. With a base's ``config.json``
every tensor's shape is known and the count is exact for an expert that changes every
tensor of the base (a full fine-tune); with only a parameter count the same rule is
applied per parameter of wide matrices (widths a multiple of the group size), which is
what 7B-class models are.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meswitch.compress import compressed_bits, salient_count
from meswitch.decoder_config import read_decoder_config

#: Bytes per element of the base as it is held for serving.
BASE_DTYPE_BYTES = {"f16": 2, "bf16": 2, "f32": 4}


@dataclass(frozen=True)
class ExpertFormat:
    """How each expert is compressed (the ``meswitch compress`` settings that decide its size)."""

    bits: int = 2
    group_size: int = 64
    salient: float = 0.01
    salient_channels: int | None = None
    vocab_bits: int | None = None

    def delta_bytes(self, rows: int, cols: int, role: str = "linear") -> int:
        """Stored bytes of one delta matrix (codes, scales, zeros, salient values and indices)."""
        bits = self.vocab_bits if role in ("embedding", "lm_head") and self.vocab_bits else self.bits
        group_size = cols if self.group_size == 0 else self.group_size
        k = salient_count(self.salient, self.salient_channels, cols)
        return compressed_bits(rows, cols, bits, group_size, k) // 8

    def bytes_per_parameter(self) -> float:
        """Stored bytes per delta parameter of a wide matrix (``k / cols`` = the salient fraction)."""
        if self.salient_channels is not None:
            raise ValueError("a per-parameter size needs the salient share as a fraction; give a config for a count")
        groups_per_column = 0.0 if self.group_size == 0 else 1.0 / self.group_size
        return self.bits / 8 + 3 * groups_per_column + 2 * self.salient


def decoder_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama, Mistral or Qwen2 checkpoint with its shape, from its ``config.json``."""
    hidden = int(config["hidden_size"])
    heads, layers = int(config["num_attention_heads"]), int(config["num_hidden_layers"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inner, vocab = int(config["intermediate_size"]), int(config["vocab_size"])
    attention_bias = config.get("model_type") == "qwen2" or bool(config.get("attention_bias"))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        projections = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
                       "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
                       "mlp.gate_proj": (inner, hidden), "mlp.up_proj": (inner, hidden), "mlp.down_proj": (hidden, inner)}
        for name, shape in projections.items():
            shapes[f"{prefix}{name}.weight"] = shape
            if attention_bias and name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                shapes[f"{prefix}{name}.bias"] = (shape[0],)
        shapes[f"{prefix}input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}post_attention_layernorm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _role(name: str) -> str:
    return "embedding" if name == "model.embed_tokens.weight" else "lm_head" if name == "lm_head.weight" else "linear"


@dataclass(frozen=True)
class CapacityPlan:
    """What fits: every figure in bytes, and the number of experts."""

    base_parameters: int
    base_bytes: int
    expert_bytes: int
    expert_bits_per_parameter: float
    memory_bytes: int
    kv_cache_bytes: int
    reserve_bytes: int
    free_for_experts: int
    experts: int
    fp16_experts: int
    kv_bytes_per_token: int | None
    exact: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_capacity(memory_bytes: int, expert_format: ExpertFormat, *, base: str | os.PathLike[str] | None = None,
                  base_parameters: float | None = None, kv_cache_bytes: int = 0, reserve_bytes: int = 0,
                  base_dtype: str = "f16") -> CapacityPlan:
    """How many experts of ``expert_format`` fit in ``memory_bytes`` beside the base and the KV cache.

    Parameters
    ----------
    memory_bytes
        The accelerator's memory.
    expert_format
        The compression settings of every expert.
    base
        A base model directory or its ``config.json`` (exact tensor shapes); or give
    base_parameters
        The base's parameter count (the per-parameter estimate).
    kv_cache_bytes, reserve_bytes
        Bytes set aside for the KV cache and for everything else (activations, workspace,
        the runtime's own context).
    base_dtype
        How the base is held: ``f16``, ``bf16`` or ``f32``.

    Raises
    ------
    ValueError
        Neither or both of ``base`` and ``base_parameters``; an unknown ``base_dtype``; the
        base, KV cache and reserve do not fit in ``memory_bytes`` (the message has the sums).
    """
    if (base is None) == (base_parameters is None):
        raise ValueError("give exactly one of base (a config) and base_parameters")
    if base_dtype not in BASE_DTYPE_BYTES:
        raise ValueError(f"base_dtype must be one of {', '.join(BASE_DTYPE_BYTES)}, got {base_dtype!r}")
    element = BASE_DTYPE_BYTES[base_dtype]
    kv_per_token = None
    if base is not None:
        directory = Path(base).parent if Path(base).is_file() else Path(base)
        config = json.loads((directory / "config.json").read_text())
        decoder = read_decoder_config(directory)  # refuses architectures the serving model lacks
        kv_per_token = 2 * decoder.num_layers * decoder.num_kv_heads * decoder.head_dim * element
        shapes = decoder_tensor_shapes(config)
        parameters = sum(math.prod(shape) for shape in shapes.values())
        expert = sum(expert_format.delta_bytes(*shape, role=_role(name)) if len(shape) == 2 else 2 * shape[0]
                     for name, shape in shapes.items())
        delta_parameters = sum(math.prod(shape) for shape in shapes.values() if len(shape) == 2)
        bits_per_parameter = 8 * expert / max(1, delta_parameters)
    else:
        parameters = int(base_parameters)
        if parameters < 1:
            raise ValueError(f"base_parameters must be positive, got {base_parameters}")
        expert = math.ceil(parameters * expert_format.bytes_per_parameter())
        bits_per_parameter = 8 * expert_format.bytes_per_parameter()
    base_bytes = parameters * element
    free = memory_bytes - base_bytes - kv_cache_bytes - reserve_bytes
    if free < 0:
        raise ValueError(f"the base ({base_bytes / 1e9:.2f} GB), KV cache ({kv_cache_bytes / 1e9:.2f} GB) and reserve "
                         f"({reserve_bytes / 1e9:.2f} GB) take more than the {memory_bytes / 1e9:.2f} GB of memory")
    return CapacityPlan(base_parameters=parameters, base_bytes=base_bytes, expert_bytes=expert,
                        expert_bits_per_parameter=bits_per_parameter, memory_bytes=memory_bytes,
                        kv_cache_bytes=kv_cache_bytes, reserve_bytes=reserve_bytes, free_for_experts=free,
                        experts=free // expert, fp16_experts=free // (2 * parameters),
                        kv_bytes_per_token=kv_per_token, exact=base is not None)


def _size(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{int(count)} B"


def base_dtype_note(plan: CapacityPlan) -> str:
    return f"keys and values in the base's {plan.base_bytes // plan.base_parameters * 8}-bit dtype"


def describe(plan: CapacityPlan, expert_format: ExpertFormat) -> str:
    """The plan as the few lines ``meswitch plan`` prints."""
    salient = (f"{expert_format.salient_channels} salient channels" if expert_format.salient_channels is not None
               else f"{expert_format.salient * 100:g}% salient")
    lines = [
        f"base         {plan.base_parameters:.4g} parameters: {_size(plan.base_bytes)}",
        f"one expert   {expert_format.bits} bits + {salient}, group {expert_format.group_size or 'row'}: "
        f"{_size(plan.expert_bytes)} ({plan.expert_bits_per_parameter:.2f} bits per parameter"
        f"{'' if plan.exact else ', per-parameter estimate'})",
        f"memory       {_size(plan.memory_bytes)} = base + KV cache {_size(plan.kv_cache_bytes)} + reserve "
        f"{_size(plan.reserve_bytes)} + {_size(plan.free_for_experts)} for experts",
    ]
    if plan.kv_bytes_per_token:
        held = f": {plan.kv_cache_bytes // plan.kv_bytes_per_token} tokens" if plan.kv_cache_bytes else ""
        lines.append(f"KV cache     {plan.kv_bytes_per_token} bytes per token ({base_dtype_note(plan)}){held}")
    lines.append(f"experts fit  {plan.experts} compressed (FP16 copies of the base: {plan.fp16_experts})")
    return "\n".join(lines)
