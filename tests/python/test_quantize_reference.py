"""The quantization core (C++) against an independent NumPy float32 reference, bit for bit.

The reference below is written from the specification in include/meswitch/quantize.hpp,
pack.hpp and salient.hpp, not from the C++ code: a little-endian bitstream packer, the
asymmetric group quantizer with its clip-ratio search (scale rounded to f16 before use,
round half to even, float32 arithmetic in the specified order), the salient scatter, the
per-channel error scores and a brute-force top-k ranking.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from meswitch import _core

F32 = np.float32
SMALLEST_F16_SUBNORMAL = np.array([1], dtype=np.uint16).view(np.float16)[0]


# --------------------------------------------------------------------------- reference


def ref_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [rows, cols] -> u32 words: code j at stream bits [j*bits, j*bits+bits), word i // 32."""
    rows, cols = codes.shape
    words = (cols * bits + 31) // 32
    stream = np.zeros((rows, words * 32), dtype=np.uint64)
    for b in range(bits):
        stream[:, np.arange(cols) * bits + b] = (codes >> b) & 1
    place = np.uint64(1) << np.arange(32, dtype=np.uint64)
    return (stream.reshape(rows, words, 32) * place).sum(axis=2).astype(np.uint32)


def ref_unpack(words: np.ndarray, cols: int, bits: int) -> np.ndarray:
    rows = words.shape[0]
    stream = ((words[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(rows, -1)
    codes = np.zeros((rows, cols), dtype=np.uint8)
    for b in range(bits):
        codes |= (stream[:, np.arange(cols) * bits + b] << b).astype(np.uint8)
    return codes


def ref_clip_ratios(clip_grid: int, min_clip: float) -> list[np.float32]:
    if clip_grid == 1:
        return [F32(1)]
    span = F32(1) - F32(min_clip)
    steps = F32(clip_grid - 1)
    return [F32(1) - F32(t) * span / steps for t in range(clip_grid)]


def ref_params(lo0: np.ndarray, hi0: np.ndarray, alpha: np.float32, levels: np.float32):
    """f16 scale (as float32 and as f16) and zero point of every group for one clip ratio."""
    lo = alpha * lo0
    hi = alpha * hi0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale16 = ((hi - lo) / levels).astype(np.float16)
    scale16 = np.where(scale16 == 0, SMALLEST_F16_SUBNORMAL, scale16)
    scale16 = np.where(hi == lo, np.float16(1), scale16)
    scale = scale16.astype(F32)
    zero = np.clip(np.rint(-lo / scale), F32(0), levels)
    return scale16, scale, zero


def ref_quantize(delta: np.ndarray, weight: np.ndarray | None, salient_idx: np.ndarray, bits: int,
                 group_size: int, clip_grid: int = 20, min_clip: float = 0.5) -> dict[str, np.ndarray]:
    rows, cols = delta.shape
    group = min(group_size or cols, cols)
    groups = -(-cols // group)  # a ragged last group is padded with columns that take no part
    padded = groups * group
    levels = F32(2**bits - 1)
    excluded = np.ones(padded, dtype=bool)
    excluded[:cols] = False
    excluded[salient_idx] = True
    v = np.pad(delta, ((0, 0), (0, padded - cols))).reshape(rows, groups, group)
    keep = ~excluded.reshape(1, groups, group)
    full_weight = np.ones(padded)
    if weight is not None:
        full_weight[:cols] = weight.astype(np.float64)
    w = full_weight.reshape(1, groups, group)
    masked = np.where(keep, v, F32(0))  # salient columns do not shape the range
    lo0 = np.minimum(masked.min(axis=2), F32(0))  # 0 is always inside the range
    hi0 = np.maximum(masked.max(axis=2), F32(0))

    def quantize_with(scale, zero):
        return np.clip(np.rint(v / scale[..., None]) + zero[..., None], F32(0), levels)

    best_error = np.full((rows, groups), np.inf)
    best_scale16 = np.zeros((rows, groups), dtype=np.float16)
    best_scale = np.zeros((rows, groups), dtype=F32)
    best_zero = np.zeros((rows, groups), dtype=F32)
    for alpha in ref_clip_ratios(clip_grid, min_clip):
        scale16, scale, zero = ref_params(lo0, hi0, alpha, levels)
        approx = (quantize_with(scale, zero) - zero[..., None]) * scale[..., None]
        difference = v.astype(np.float64) - approx.astype(np.float64)
        terms = np.where(keep, w * (difference * difference), 0.0)
        error = np.cumsum(terms, axis=2)[..., -1]  # sequential, in column order
        better = error < best_error  # strict: the first minimum wins
        best_error = np.where(better, error, best_error)
        best_scale16 = np.where(better, scale16, best_scale16)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)

    codes = quantize_with(best_scale, best_zero)
    codes = np.where(keep, codes, best_zero[..., None]).reshape(rows, padded)[:, :cols].astype(np.uint8)
    order = np.sort(np.asarray(salient_idx, dtype=np.int32))
    return {"codes": codes, "qweight": ref_pack(codes, bits), "scales": best_scale16,
            "zeros": best_zero.astype(np.uint8), "salient_idx": order,
            "salient": delta[:, order].astype(np.float16)}


def ref_dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, salient_idx: np.ndarray,
                   salient: np.ndarray, group_size: int) -> np.ndarray:
    rows, cols = codes.shape
    group = min(group_size or cols, cols)
    scale = np.repeat(scales.astype(F32), group, axis=1)[:, :cols]
    zero = np.repeat(zeros.astype(F32), group, axis=1)[:, :cols]
    out = (codes.astype(F32) - zero) * scale
    out[:, salient_idx] += salient.astype(F32)
    return out


def ref_scores(delta: np.ndarray, weight: np.ndarray | None, bits: int, group_size: int) -> np.ndarray:
    q = ref_quantize(delta, weight, np.zeros(0, dtype=np.int32), bits, group_size)
    approx = ref_dequantize(q["codes"], q["scales"], q["zeros"], q["salient_idx"], q["salient"], group_size)
    difference = delta.astype(np.float64) - approx.astype(np.float64)
    per_column = np.cumsum(difference * difference, axis=0)[-1]  # rows summed in order
    return per_column if weight is None else per_column * weight.astype(np.float64)


def ref_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    ranking = np.argsort(-scores, kind="stable")  # ties keep the lower index first
    return np.sort(ranking[:k]).astype(np.int32)


# --------------------------------------------------------------------------- data


def heavy_tailed(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return (rng.standard_t(3, size=(rows, cols)) * 0.01).astype(F32)


def adversarial(rows_of: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Rows that exercise the corners: zeros, sub-f16 ranges, exact ties, one sign, one spike."""
    rows = [np.zeros(cols),
            rng.standard_normal(cols) * 1e-9,                      # f16 scale rounds to 0
            rng.integers(-8, 8, cols) * 0.125,                     # exact halves after scaling
            np.full(cols, 0.25),                                   # all positive, constant
            np.full(cols, -3.0),                                   # all negative
            np.where(np.arange(cols) == cols // 2, 5.0, 0.0),      # one spike
            rng.standard_normal(cols) * 0.02]
    return np.stack([rows[i % len(rows)] for i in range(rows_of)]).astype(F32)


def channel_weights(rng: np.random.Generator, cols: int) -> np.ndarray:
    weight = rng.gamma(0.5, 2.0, cols).astype(F32)
    weight[:: max(cols // 7, 1)] = 0.0  # channels never active in calibration
    return weight


# --------------------------------------------------------------------------- pack


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("cols", [1, 7, 31, 33, 100, 257])
def test_pack_matches_numpy_bitstream(rng, bits, cols):
    codes = rng.integers(0, 2**bits, size=(5, cols), dtype=np.uint8)
    words = _core.pack_codes(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (5, (cols * bits + 31) // 32)
    np.testing.assert_array_equal(words, ref_pack(codes, bits))
    np.testing.assert_array_equal(_core.unpack_codes(words, 5, cols, bits), codes)
    np.testing.assert_array_equal(ref_unpack(words, cols, bits), codes)


def test_pack_rejects_bad_widths_and_codes():
    codes = np.array([[0, 1, 4]], dtype=np.uint8)
    with pytest.raises(ValueError, match="1..4"):
        _core.pack_codes(codes, 5)
    with pytest.raises(_core.FormatError, match=r"w\.codes.*\(0, 2\)"):
        _core.pack_codes(codes, 2, "w.codes")
    with pytest.raises(ValueError, match="elements"):
        _core.unpack_codes(np.zeros((1, 1), dtype=np.uint32), 1, 33, 1)


# --------------------------------------------------------------------------- quantize


def check_against_reference(delta, weight, salient_idx, bits, group_size, clip_grid=20, min_clip=0.5, ragged=False):
    rows, cols = delta.shape
    ours = _core.quantize_delta(delta, weight, salient_idx, bits, group_size, clip_grid, min_clip, "w", ragged)
    ref = ref_quantize(delta, weight, salient_idx, bits, group_size, clip_grid, min_clip)
    assert ours["qweight"].dtype == np.uint32 and ours["scales"].dtype == np.float16
    assert ours["zeros"].dtype == np.uint8 and ours["salient"].dtype == np.float16
    assert ours["salient_idx"].dtype == np.int32
    shape = (ours["rows"], ours["cols"], ours["bits"], ours["group_size"])
    assert shape == (rows, cols, bits, min(group_size or cols, cols))
    np.testing.assert_array_equal(_core.unpack_codes(ours["qweight"], rows, cols, bits), ref["codes"])
    np.testing.assert_array_equal(ours["qweight"], ref["qweight"])
    np.testing.assert_array_equal(ours["scales"].view(np.uint16), ref["scales"].view(np.uint16))
    np.testing.assert_array_equal(ours["zeros"], ref["zeros"])
    np.testing.assert_array_equal(ours["salient_idx"], ref["salient_idx"])
    np.testing.assert_array_equal(ours["salient"].view(np.uint16), ref["salient"].view(np.uint16))

    dense = _core.dequantize_delta(ours["qweight"], ours["scales"], ours["zeros"], ours["salient_idx"],
                                   ours["salient"], rows, cols, bits, ours["group_size"])
    expected = ref_dequantize(ref["codes"], ref["scales"], ref["zeros"], ref["salient_idx"], ref["salient"],
                              group_size)
    assert dense.dtype == F32 and dense.shape == (rows, cols)
    np.testing.assert_array_equal(dense.view(np.uint32), expected.view(np.uint32))
    # Salient columns come back as exactly their f16 value.
    kept = ref["salient_idx"]
    np.testing.assert_array_equal(dense[:, kept], delta[:, kept].astype(np.float16))
    return ours


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, 0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("k", [0, 5])
def test_quantize_is_bit_exact(rng, bits, group_size, weighted, k):
    delta = heavy_tailed(rng, 12, 256)
    weight = channel_weights(rng, 256) if weighted else None
    salient_idx = rng.choice(256, size=k, replace=False).astype(np.int32)  # unsorted on purpose
    check_against_reference(delta, weight, salient_idx, bits, group_size)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize(("cols", "group_size"), [(688, 64), (100, 32), (33, 32), (257, 128), (20, 64)])
@pytest.mark.parametrize("weighted", [False, True])
def test_quantize_ragged_last_group_is_bit_exact(rng, bits, cols, group_size, weighted):
    delta = heavy_tailed(rng, 6, cols)
    weight = channel_weights(rng, cols) if weighted else None
    salient_idx = np.array([0, cols - 1], dtype=np.int32)  # one in the ragged last group
    ours = check_against_reference(delta, weight, salient_idx, bits, group_size, ragged=True)
    assert ours["scales"].shape == (6, -(-cols // group_size) if group_size < cols else 1)
    with pytest.raises(ValueError, match="does not divide the width"):
        _core.quantize_delta(delta, weight, salient_idx, bits, group_size, 20, 0.5, "w", False)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("cols", [1, 7, 31, 33, 100, 257])
def test_quantize_ragged_whole_rows(rng, bits, cols):
    delta = heavy_tailed(rng, 4, cols)
    salient_idx = np.array([cols - 1], dtype=np.int32) if cols > 1 else np.zeros(0, dtype=np.int32)
    check_against_reference(delta, channel_weights(rng, cols), salient_idx, bits, 0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 0])
def test_quantize_adversarial_rows(rng, bits, group_size):
    delta = adversarial(14, 96, rng)
    check_against_reference(delta, None, np.array([3, 95], dtype=np.int32), bits, group_size)
    check_against_reference(delta, channel_weights(rng, 96), np.zeros(0, dtype=np.int32), bits, group_size)


@pytest.mark.parametrize("clip_grid, min_clip", [(1, 0.5), (2, 0.3), (7, 0.8), (40, 0.25)])
def test_quantize_other_search_grids(rng, clip_grid, min_clip):
    check_against_reference(heavy_tailed(rng, 6, 128), channel_weights(rng, 128), np.zeros(0, dtype=np.int32),
                            2, 64, clip_grid, min_clip)


def test_search_beats_round_to_nearest(rng):
    delta = heavy_tailed(rng, 16, 256)
    weight = channel_weights(rng, 256)
    none = np.zeros(0, dtype=np.int32)

    def error(clip_grid):
        q = _core.quantize_delta(delta, weight, none, 2, 64, clip_grid, 0.5, "w")
        dense = _core.dequantize_delta(q["qweight"], q["scales"], q["zeros"], q["salient_idx"], q["salient"],
                                       16, 256, 2, 64)
        return float((((delta.astype(np.float64) - dense) ** 2).sum(axis=0) * weight).sum())

    assert error(20) < error(1)


# --------------------------------------------------------------------------- salient selection


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 0])
@pytest.mark.parametrize("weighted", [False, True])
def test_scores_and_top_k_match_brute_force(rng, bits, group_size, weighted):
    delta = heavy_tailed(rng, 10, 128)
    weight = channel_weights(rng, 128) if weighted else None
    scores = _core.channel_error_scores(delta, weight, bits, group_size, 20, 0.5, "w")
    assert scores.dtype == np.float64 and scores.shape == (128,)
    np.testing.assert_array_equal(scores, ref_scores(delta, weight, bits, group_size))
    for k in [0, 1, 3, 13, 128, 500]:
        chosen = _core.select_salient_channels(scores, k)
        assert chosen.dtype == np.int32
        np.testing.assert_array_equal(chosen, ref_top_k(scores, min(k, 128)))


def test_top_k_ties_go_to_the_lower_index():
    scores = np.array([0.5, 3.0, 1.0, 3.0, 0.0, 2.0, 3.0, 0.0])
    for k in range(9):
        np.testing.assert_array_equal(_core.select_salient_channels(scores, k), ref_top_k(scores, k))
    np.testing.assert_array_equal(_core.select_salient_channels(scores, 2), [1, 3])
    np.testing.assert_array_equal(_core.select_salient_channels(np.zeros(5), 3), [0, 1, 2])


def test_salient_pipeline_lowers_the_error(rng):
    delta = heavy_tailed(rng, 16, 128)
    scores = _core.channel_error_scores(delta, None, 2, 32, 20, 0.5, "w")
    chosen = _core.select_salient_channels(scores, 8)
    q = check_against_reference(delta, None, chosen, 2, 32)
    plain = _core.quantize_delta(delta, None, np.zeros(0, dtype=np.int32), 2, 32, 20, 0.5, "w")

    def error(p):
        dense = _core.dequantize_delta(p["qweight"], p["scales"], p["zeros"], p["salient_idx"], p["salient"],
                                       16, 128, 2, 32)
        return float(((delta.astype(np.float64) - dense) ** 2).sum())

    assert error(q) < error(plain)


# --------------------------------------------------------------------------- delta


@pytest.mark.parametrize("base_dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("expert_dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_compute_delta_mixed_dtypes(rng, base_dtype, expert_dtype):
    base = rng.standard_normal((6, 10)).astype(base_dtype)
    expert = (base.astype(F32) + rng.standard_normal((6, 10)).astype(F32) * 0.01).astype(expert_dtype)
    delta, extra = _core.compute_delta(base, expert, "w")
    expected = expert.astype(F32) - base.astype(F32)
    np.testing.assert_array_equal(delta.view(np.uint32), expected.view(np.uint32))
    assert extra.shape == (0, 10) and extra.dtype == F32


def test_compute_delta_bf16_bits_and_vectors(rng):
    base = rng.standard_normal(12).astype(ml_dtypes.bfloat16)
    expert = rng.standard_normal(12).astype(F32)
    delta, extra = _core.compute_delta(base.view(np.uint16), expert, "norm", base_dtype="BF16")
    assert delta.shape == (1, 12) and extra.shape == (0, 12)
    np.testing.assert_array_equal(delta[0], expert - base.astype(F32))


def test_compute_delta_expanded_vocabulary(rng):
    base = rng.standard_normal((5, 8)).astype(np.float16)
    expert = rng.standard_normal((7, 8)).astype(np.float16)
    delta, extra = _core.compute_delta(base, expert, "lm_head")
    np.testing.assert_array_equal(delta, expert[:5].astype(F32) - base.astype(F32))
    np.testing.assert_array_equal(extra, expert[5:].astype(F32))


def test_compute_delta_errors_name_the_tensor():
    a = np.ones((3, 4), dtype=F32)
    with pytest.raises(_core.FormatError, match=r"q_proj.*\[3, 4\].*\[3, 5\]"):
        _core.compute_delta(a, np.ones((3, 5), dtype=F32), "q_proj")
    with pytest.raises(_core.FormatError, match="q_proj.*rank"):
        _core.compute_delta(a, np.ones(12, dtype=F32), "q_proj")
    with pytest.raises(_core.FormatError, match="q_proj.*fewer rows"):
        _core.compute_delta(a, np.ones((2, 4), dtype=F32), "q_proj")
    with pytest.raises(_core.FormatError, match="q_proj.*floating"):
        _core.compute_delta(a, np.ones((3, 4), dtype=np.int32), "q_proj")
    with pytest.raises(_core.FormatError, match="q_proj.*floating"):
        _core.compute_delta(np.ones((3, 4), dtype=np.int64), a, "q_proj")
    bad = a.copy()
    bad[2, 1] = np.nan
    with pytest.raises(_core.FormatError, match=r"q_proj.*expert.*\(2, 1\)"):
        _core.compute_delta(a, bad, "q_proj")
    with pytest.raises(_core.FormatError, match=r"q_proj.*base.*\(2, 1\)"):
        _core.compute_delta(np.where(np.isnan(bad), np.inf, bad).astype(F32), a, "q_proj")
    assert issubclass(_core.FormatError, ValueError)


# --------------------------------------------------------------------------- bad input


def test_bad_settings_raise_value_error_naming_the_tensor(rng):
    delta = heavy_tailed(rng, 4, 96)
    none = np.zeros(0, dtype=np.int32)
    for bits in (0, 5):
        with pytest.raises(ValueError, match=r"mlp\.up.*bits"):
            _core.quantize_delta(delta, None, none, bits, 32, 20, 0.5, "mlp.up")
        with pytest.raises(ValueError, match=r"mlp\.up.*bits"):
            _core.channel_error_scores(delta, None, bits, 32, 20, 0.5, "mlp.up")
    with pytest.raises(ValueError, match=r"mlp\.up.*64.*96"):
        _core.quantize_delta(delta, None, none, 2, 64, 20, 0.5, "mlp.up", ragged_groups=False)
    assert _core.quantize_delta(delta, None, none, 2, 64, 20, 0.5, "mlp.up")["scales"].shape == (4, 2)  # ragged
    with pytest.raises(ValueError, match=r"mlp\.up.*-32"):
        _core.quantize_delta(delta, None, none, 2, -32, 20, 0.5, "mlp.up")
    with pytest.raises(ValueError, match=r"mlp\.up.*min_clip"):
        _core.quantize_delta(delta, None, none, 2, 32, 20, 0.0, "mlp.up")
    with pytest.raises(ValueError, match=r"mlp\.up.*out of range"):
        _core.quantize_delta(delta, None, np.array([96], dtype=np.int32), 2, 32, 20, 0.5, "mlp.up")
    with pytest.raises(ValueError, match=r"mlp\.up.*repeated"):
        _core.quantize_delta(delta, None, np.array([1, 1], dtype=np.int32), 2, 32, 20, 0.5, "mlp.up")
    with pytest.raises(ValueError, match=r"mlp\.up.*channel_weight"):
        _core.quantize_delta(delta, np.ones(95, dtype=F32), none, 2, 32, 20, 0.5, "mlp.up")
    with pytest.raises(ValueError, match=r"mlp\.up.*2-D"):
        _core.quantize_delta(delta[0], None, none, 2, 32, 20, 0.5, "mlp.up")


def test_bad_data_raises_format_error_naming_the_tensor(rng):
    delta = heavy_tailed(rng, 4, 64)
    none = np.zeros(0, dtype=np.int32)
    for bad in (np.nan, np.inf, -np.inf):
        broken = delta.copy()
        broken[3, 17] = bad
        with pytest.raises(_core.FormatError, match=r"attn\.o.*\(3, 17\)"):
            _core.quantize_delta(broken, None, none, 2, 32, 20, 0.5, "attn.o")
    weight = np.ones(64, dtype=F32)
    weight[9] = -1.0
    with pytest.raises(_core.FormatError, match=r"attn\.o.*channel 9"):
        _core.quantize_delta(delta, weight, none, 2, 32, 20, 0.5, "attn.o")
    q = _core.quantize_delta(delta, None, none, 2, 32, 20, 0.5, "attn.o")
    with pytest.raises(_core.FormatError, match=r"attn\.o.*scales"):
        _core.dequantize_delta(q["qweight"], q["scales"][:, :1], q["zeros"], q["salient_idx"], q["salient"],
                               4, 64, 2, 32, "attn.o")
    with pytest.raises(ValueError, match=r"attn\.o\.scales.*scales must be F16"):
        _core.dequantize_delta(q["qweight"], q["scales"].astype(F32), q["zeros"], q["salient_idx"],
                               q["salient"], 4, 64, 2, 32, "attn.o")


def test_scale_free_parts_rebuild_the_dequantized_delta_bit_for_bit(rng):
    delta = heavy_tailed(rng, 6, 100)
    q = _core.quantize_delta(delta, None, np.array([7, 50], dtype=np.int32), 2, 32, 1, 0.5, "w")
    pieces = [q[piece] for piece, _ in _core.DELTA_PIECES]
    parts = _core.scale_free_parts(*pieces, 6, 100, 2, q["group_size"], "w")
    assert parts["column_group"].tolist() == [c // 32 for c in range(100)]  # ragged last group of 4
    rebuilt = parts["centred"] * q["scales"].astype(F32)[:, parts["column_group"]] + parts["salient"]
    dense = _core.dequantize_delta(*pieces, 6, 100, 2, q["group_size"], "w")
    np.testing.assert_array_equal(rebuilt, dense)


def test_quantization_defaults_come_from_the_cpp_quant_spec():
    from meswitch.compress import CompressionSettings

    settings = CompressionSettings()
    assert _core.QUANT_DEFAULTS == {"bits": 2, "group_size": 64, "clip_grid": 1, "min_clip": 0.5,
                                    "ragged_groups": True}
    for key, value in _core.QUANT_DEFAULTS.items():
        assert getattr(settings, key) == value


def test_hostile_delta_pieces_are_refused_naming_tensor_and_field(tmp_path):
    """Zero points >= 2^bits and bad salient indices never reach a kernel's indexing."""
    def write(zero: int, salient_idx: list[int]) -> str:
        directory = tmp_path / f"z{zero}-{'-'.join(map(str, salient_idx))}.meswitch"
        writer = _core.ArtifactWriter(str(directory))
        writer.add_tensor("w.qweight", "U32", np.full((2, 1), 0x55555555, dtype=np.uint32))
        writer.add_tensor("w.scales", "F16", np.ones((2, 1), dtype=np.float16).view(np.uint16))
        writer.add_tensor("w.zeros", "U8", np.full((2, 1), zero, dtype=np.uint8))
        writer.add_tensor("w.salient_idx", "I32", np.array(salient_idx, dtype=np.int32))
        writer.add_tensor("w.salient", "F16", np.ones((2, len(salient_idx)), dtype=np.float16).view(np.uint16))
        writer.commit(json.dumps({
            "name": "h", "base": {"fingerprint": "0" * 64, "config_sha256": "0" * 64, "tensors": {}},
            "expert_config": {}, "statistics": {"delta_parameters": 16, "delta_storage_bits": 0, "avg_bits": 0.0},
            "quantization": {"bits": 2, "group_size": 8, "clip_grid": 1, "min_clip": 0.5, "avg_bits": None,
                             "vocab_bits": None, "calibration": {"kind": "weight-only"}},
            "tensors": {"w": {"kind": "delta", "dtype": "F16", "shape": [2, 8], "rows": 2, "cols": 8, "bits": 2,
                              "group_size": 8, "salient": len(salient_idx)}}}))
        return str(directory)

    from meswitch.artifact import load_artifact

    assert load_artifact(write(1, [3])).delta("w").shape == (2, 8)
    with pytest.raises(_core.FormatError, match=r"'w\.zeros'.*zero point 4"):
        load_artifact(write(4, [3])).delta("w")
    with pytest.raises(_core.FormatError, match=r"'w\.salient_idx'.*outside \[0, 8\)"):
        load_artifact(write(1, [8])).validate_delta("w")
    with pytest.raises(_core.FormatError, match=r"'w\.salient_idx'.*strictly ascending"):
        load_artifact(write(1, [5, 2])).delta("w")
