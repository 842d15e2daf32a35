"""Rotary position embedding: the frequencies for each scaling kind, and their application.

The frequencies follow transformers' ``ROPE_INIT_FUNCTIONS`` for the kinds implemented
here, so positions rotate exactly as in the reference models; other kinds are refused
rather than silently computed as unscaled.
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: Rotary scaling kinds :func:`inverse_frequencies` implements.
ROPE_KINDS = ("default", "linear", "llama3")


def inverse_frequencies(parameters: dict[str, Any], head_dim: int) -> torch.Tensor:
    """float32 ``[head_dim // 2]`` rotary inverse frequencies.

    Parameters
    ----------
    parameters
        ``rope_theta``, ``rope_type`` and the kind's fields (see
        :func:`meswitch.decoder_config.rope_parameters`).
    head_dim
        Channels per attention head (all of them rotate).

    Raises
    ------
    NotImplementedError
        A scaling kind other than ``default``, ``linear`` or ``llama3``.
    """
    kind = parameters.get("rope_type", "default")
    if kind not in ROPE_KINDS:
        raise NotImplementedError(f"rope scaling {kind!r} is not implemented by the multi-expert model; "
                                  f"implemented: {', '.join(ROPE_KINDS)}")
    if float(parameters.get("partial_rotary_factor", 1.0)) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not implemented by the multi-expert model")
    theta = float(parameters["rope_theta"])
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inverse = 1.0 / (theta ** exponents)
    if kind == "linear":
        return inverse / float(parameters["factor"])
    if kind == "llama3":
        return _llama3(inverse, parameters)
    return inverse


def _llama3(inverse: torch.Tensor, parameters: dict[str, Any]) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, and the band between
    # interpolated smoothly (Llama 3.1's context extension).
    factor = float(parameters["factor"])
    low, high = float(parameters["low_freq_factor"]), float(parameters["high_freq_factor"])
    original = float(parameters["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inverse
    scaled = torch.where(wavelength > original / low, inverse / factor, inverse)
    smooth = (original / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelength < original / high) & ~(wavelength > original / low)
    return torch.where(medium, smoothed, scaled)


def rotate(x: torch.Tensor, positions: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x`` ``[tokens, heads, head_dim]`` rotated to each token's position (``positions`` ``[tokens]``).

    The halves convention of the HF Llama family: channel ``i`` pairs with ``i + head_dim / 2``.
    """
    angles = positions.to(torch.float32)[:, None] * inverse[None, :]
    angles = torch.cat([angles, angles], dim=-1)[:, None, :]
    cos, sin = angles.cos(), angles.sin()
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated_half * sin
