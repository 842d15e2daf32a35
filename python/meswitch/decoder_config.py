"""The architecture facts the serving model needs, read from a base's HF ``config.json``.

Llama, Mistral and Qwen2 share one decoder (pre-norm RMSNorm, rotary attention with
grouped-query heads, a SiLU-gated MLP); they differ only in what is read here: biases on
the attention projections (Qwen2, or Llama's ``attention_bias``), a sliding attention
window (Mistral, Qwen2 with ``use_sliding_window``) and rotary scaling.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: ``model_type`` values whose decoder :class:`meswitch.serve.MultiExpertModel` implements.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class DecoderConfig:
    """One decoder architecture, as the serving model computes it."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: dict[str, Any] = field(default_factory=dict)
    #: Per layer, the attention window in tokens (``None``: the whole sequence).
    sliding_windows: tuple[int | None, ...] = ()


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """``rope_theta`` and the scaling of a config, in one dict with ``rope_type``.

    Newer transformers write ``rope_parameters`` (theta and scaling together); older
    configs write ``rope_theta`` beside an optional ``rope_scaling`` whose kind is under
    ``rope_type`` or, older still, ``type``.
    """
    if isinstance(config.get("rope_parameters"), dict):
        parameters = dict(config["rope_parameters"])
    else:
        parameters = dict(config.get("rope_scaling") or {})
        parameters.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    kind = parameters.pop("type", None)
    parameters["rope_type"] = parameters.get("rope_type") or kind or "default"
    parameters.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return parameters


def _sliding_windows(config: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    if config.get("layer_types"):
        return tuple(window if kind == "sliding_attention" else None for kind in config["layer_types"])
    if config["model_type"] == "qwen2":
        # Qwen2 attends within the window only when asked, and only from max_window_layers on.
        if not config.get("use_sliding_window", False):
            return (None,) * num_layers
        first = int(config.get("max_window_layers", num_layers))
        return tuple(window if layer >= first else None for layer in range(num_layers))
    return (window,) * num_layers


def read_decoder_config(model_dir: str | os.PathLike[str]) -> DecoderConfig:
    """The :class:`DecoderConfig` of an HF model directory.

    Raises
    ------
    FileNotFoundError
        No ``config.json`` in ``model_dir``.
    ValueError
        The architecture is not Llama, Mistral or Qwen2 (the message names it), or its
        activation is not SiLU.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        architectures = ", ".join(config.get("architectures") or []) or "none listed"
        raise ValueError(f"{path}: architecture model_type={model_type!r} (architectures: {architectures}) is not "
                         f"supported by the multi-expert model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    activation = config.get("hidden_act", "silu")
    if activation != "silu":
        raise ValueError(f"{path}: hidden_act={activation!r}; the multi-expert model implements 'silu' only")
    num_heads = int(config["num_attention_heads"])
    num_layers = int(config["num_hidden_layers"])
    return DecoderConfig(
        model_type=model_type,
        hidden_size=int(config["hidden_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // num_heads),
        intermediate_size=int(config["intermediate_size"]),
        vocab_size=int(config["vocab_size"]),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope=rope_parameters(config),
        sliding_windows=_sliding_windows(config, num_layers),
    )
