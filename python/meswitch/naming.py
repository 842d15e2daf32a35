"""Which tensors of a Llama/Mistral/Qwen2 checkpoint get the delta treatment.

Every linear weight of attention and MLP (q, k, v, o, gate, up, down) is a delta
matrix whose input channels are its columns. Embeddings and ``lm_head`` are
deltas too, row-wise (an expanded vocabulary stores its extra rows whole).
Everything else (norms, biases, rotary buffers) is small and stored whole when
it differs from the base.
"""

from __future__ import annotations

import re

LINEAR_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LINEAR = re.compile(r"(^|\.)(" + "|".join(LINEAR_PROJECTIONS) + r")\.weight$")
_EMBEDDING = re.compile(r"(^|\.)embed_tokens\.weight$")
_LM_HEAD = re.compile(r"(^|\.)lm_head\.weight$")


def tensor_role(name: str) -> str:
    """``"linear"``, ``"embedding"``, ``"lm_head"`` or ``"other"`` for a checkpoint tensor name."""
    if _LINEAR.search(name):
        return "linear"
    if _EMBEDDING.search(name):
        return "embedding"
    if _LM_HEAD.search(name):
        return "lm_head"
    return "other"


def is_delta_role(role: str) -> bool:
    return role in ("linear", "embedding", "lm_head")


def module_name(weight_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj``."""
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def layer_index(name: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None
