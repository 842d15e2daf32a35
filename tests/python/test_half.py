"""Bit-exact f32 <-> f16/bf16 conversions against NumPy, ml_dtypes and PyTorch."""

import ml_dtypes
import numpy as np
import torch

from meswitch import _core

ALL_16BIT = np.arange(65536, dtype=np.uint32).astype(np.uint16)


def _interesting_floats(rng: np.random.Generator) -> np.ndarray:
    """Random floats of every magnitude plus every half value and every midpoint between halves."""
    halves = ALL_16BIT.view(np.float16).astype(np.float32)
    finite = np.sort(halves[np.isfinite(halves)])
    midpoints = (finite[:-1].astype(np.float64) + finite[1:]) / 2  # exact ties
    random_bits = rng.integers(0, 2**32, size=400_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.996, 65520, 1e-8, -6e-8,
                         np.finfo(np.float32).max, np.finfo(np.float32).tiny], dtype=np.float32)
    return np.concatenate([halves, midpoints.astype(np.float32), random_bits, specials])


def test_every_f16_widens_like_numpy():
    ours = _core.f16_bits_to_f32(ALL_16BIT)
    reference = ALL_16BIT.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(ours.view(np.uint32), reference.view(np.uint32))


def test_every_bf16_widens_like_ml_dtypes():
    ours = _core.bf16_bits_to_f32(ALL_16BIT)
    reference = ALL_16BIT.view(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(ours.view(np.uint32), reference.view(np.uint32))


def test_f32_to_f16_is_bit_identical_to_numpy(rng):
    values = _interesting_floats(rng)
    ours = _core.f32_to_f16_bits(values)
    with np.errstate(over="ignore"):  # overflow to Inf is part of what is compared
        reference = values.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(ours, reference)


def test_f32_to_bf16_is_bit_identical_to_torch(rng):
    values = _interesting_floats(rng)
    ours = _core.f32_to_bf16_bits(values)
    reference = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(values)
    np.testing.assert_array_equal(ours[~nan], reference[~nan])
    # NaN payloads differ between libraries; only "stays NaN with its sign" is specified.
    widened = _core.bf16_bits_to_f32(ours[nan])
    assert np.isnan(widened).all()
    np.testing.assert_array_equal(np.signbit(widened), np.signbit(values[nan]))
