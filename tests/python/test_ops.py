"""meswitch.ops against a dequantize-then-matmul reference written here (own packer and unpacker).

Tolerance: |out - ref| <= 1e-5 * M, with M = |x| @ (|s| * (code + zero))^T + |x[:, idx]| @ |S|^T the
magnitude of what is accumulated (the kernel reorders float32 sums; the reference is float64 on
the same, already rounded, activations). The integer paths (avx512vnni, avx2int) multiply 1/2/4-bit
codes with x held as two int8 digits, each x within max|x| / 32512 of its block of code bytes
(max|x| / 254 with MESWITCH_ACTIVATION_DIGITS=1), so there the bound grows by that resolution times
max_c |x_t| * sum_c |s| * (code + zero) (docs/benchmarks.md, include/meswitch/cpu).
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from meswitch import ops
from meswitch.delta_pieces import PIECES

torch = pytest.importorskip("torch")

RTOL = 1e-5
# avx512vnni, avx2int: |x - digits| <= max|x of the block| / (127 * 256) with two digits, / 254 with one
DIGIT_RESOLUTION = {"1": 1 / 254, "2": 1 / 32512}
INTEGER_PATHS = ("avx512vnni", "avx2int")
# Every kernel: a path and, on the integer paths, MESWITCH_ACTIVATION_DIGITS.
KERNELS = [("reference", ""), ("avx2", ""), ("avx512", ""), ("avx512vnni", "2"), ("avx512vnni", "1"), ("avx2int", "2"),
           ("avx2int", "1")]


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [rows, cols] -> uint32 [rows, ceil(cols*bits/32)], per docs/format.md."""
    rows, cols = codes.shape
    words = (cols * bits + 31) // 32
    stream = np.zeros((rows, words * 32), dtype=np.uint8)
    for b in range(bits):
        stream[:, np.arange(cols) * bits + b] = (codes >> b) & 1
    weights = (1 << np.arange(32, dtype=np.uint64)).astype(np.uint64)
    return (stream.reshape(rows, words, 32).astype(np.uint64) * weights).sum(-1).astype(np.uint32)


def unpack(qweight: np.ndarray, bits: int, cols: int) -> np.ndarray:
    rows, words = qweight.shape
    stream = ((qweight[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(rows, words * 32)
    positions = np.arange(cols)[:, None] * bits + np.arange(bits)[None, :]
    return (stream[:, positions] << np.arange(bits, dtype=np.uint32)).sum(-1).astype(np.uint32)


def make_delta(rows: int, cols: int, bits: int, group: int, k: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    groups = -(-cols // group)
    codes = rng.integers(0, 1 << bits, size=(rows, cols), dtype=np.uint32)
    scales = rng.uniform(0.001, 0.05, size=(rows, groups)).astype(np.float16)
    zeros = rng.integers(0, 1 << bits, size=(rows, groups), dtype=np.uint8)
    idx = np.sort(rng.choice(cols, size=k, replace=False)).astype(np.int32)
    salient = rng.uniform(-0.5, 0.5, size=(rows, k)).astype(np.float16)
    codes[:, idx] = zeros[:, idx // group]  # salient channels carry code = zero
    return {"qweight": pack(codes, bits), "scales": scales, "zeros": zeros, "salient_idx": idx,
            "salient": salient, "bits": bits, "group_size": group, "cols": cols}


def reference(x: np.ndarray, d: dict, path: str) -> tuple[np.ndarray, np.ndarray]:
    """(x @ full_delta^T, allowed error on `path`) in float64 from the packed pieces."""
    cols, group = d["cols"], d["group_size"]
    codes = unpack(d["qweight"], d["bits"], cols).astype(np.float64)
    g = np.arange(cols) // group
    s = d["scales"].astype(np.float32)[:, g]
    z = d["zeros"].astype(np.float32)[:, g]
    dense = ((codes.astype(np.float32) - z) * s).astype(np.float64)
    weight_mag = np.abs(s.astype(np.float64)) * (codes + z)
    code_mag = weight_mag.sum(1)
    sal = d["salient"].astype(np.float64)
    dense[:, d["salient_idx"]] += sal
    weight_mag[:, d["salient_idx"]] += np.abs(sal)
    x = x.astype(np.float64)
    allowed = RTOL * (np.abs(x) @ weight_mag.T)
    if path in INTEGER_PATHS and d["bits"] != 3:  # 3-bit deltas run the float kernels there
        resolution = DIGIT_RESOLUTION[os.environ.get("MESWITCH_ACTIVATION_DIGITS") or "2"]
        allowed += np.abs(x).max(1, keepdims=True) * resolution * code_mag[None, :] * (1 + 1e-3)
    return x @ dense.T, allowed


def as_numpy_f32(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.float32)
    return x.float().numpy()


def check(out, x, d, initial=None):
    expected, allowed = reference(as_numpy_f32(x), d, ops.cpu_kernel_path())
    got = out.numpy() if hasattr(out, "numpy") else out
    if initial is not None:
        got = got - initial
    np.testing.assert_array_less(np.abs(got - expected), allowed + 1e-6)


def test_pack_unpack_roundtrip():
    codes = np.random.default_rng(0).integers(0, 8, size=(3, 100), dtype=np.uint32)
    assert np.array_equal(unpack(pack(codes, 3), 3, 100), codes)


SHAPES = [(1, 32, 32), (7, 96, 32), (100, 544, 32), (13, 1024, 128), (5, 4096, 64), (3, 2048, 2048),
          (7, 100, 32)]  # (rows, cols, group); the last has a ragged last group


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize(("rows", "cols", "group"), SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_delta_matmul_matches_reference(bits, rows, cols, group, tokens):
    d = make_delta(rows, cols, bits, group, k=max(1, cols // 100), seed=bits * 1000 + rows + cols + tokens)
    x = np.random.default_rng(tokens).standard_normal((tokens, cols)).astype(np.float32)
    initial = np.random.default_rng(1).standard_normal((tokens, rows)).astype(np.float32)
    out = initial.copy()
    result = ops.delta_matmul(x, d, out)
    assert result is out
    check(out, x, d, initial)


def test_whole_row_group_given_as_zero_and_k_zero():
    d = make_delta(9, 256, 2, 256, k=0, seed=5)
    x = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    out = ops.delta_matmul(x, d, group_size=0)
    check(out, x, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 64])
def test_torch_activations_and_in_place_output(dtype, tokens):
    d = make_delta(37, 1024, 2, 64, k=10, seed=7)
    x = torch.randn(tokens, 1024).to(dtype)
    out = torch.zeros(tokens, 37)
    pointer = out.data_ptr()
    pieces = {f"layer.w.{key}": value for key, value in d.items() if key in PIECES}
    pieces["layer.w.scales"] = torch.from_numpy(d["scales"])  # torch float16 pieces work too
    result = ops.delta_matmul(x, pieces, out, bits=2, group_size=64)
    assert result is out and out.data_ptr() == pointer
    check(out, x, d)
    fresh = ops.delta_matmul(x, pieces, bits=2, group_size=64)
    assert isinstance(fresh, torch.Tensor) and torch.equal(fresh, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_numpy_activations(dtype):
    d = make_delta(11, 512, 4, 128, k=5, seed=8)
    x = np.random.default_rng(3).standard_normal((3, 512)).astype(dtype)
    out = ops.delta_matmul(x, d)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    check(out, x, d)


def test_read_only_pieces_are_accepted():
    d = make_delta(6, 128, 3, 32, k=2, seed=9)
    for key in PIECES:
        d[key].setflags(write=False)  # as ExpertArtifact.stored() returns them
    x = np.random.default_rng(4).standard_normal((2, 128)).astype(np.float32)
    check(ops.delta_matmul(x, d), x, d)


def test_non_contiguous_activations_work():
    d = make_delta(9, 256, 2, 64, k=3, seed=10)
    wide = np.random.default_rng(5).standard_normal((6, 512)).astype(np.float32)
    strided = wide[::2, ::2]  # both strides > 1
    check(ops.delta_matmul(strided, d), strided, d)
    transposed = torch.randn(256, 4).t()  # column stride 4
    check(ops.delta_matmul(transposed, d), transposed, d)


def test_negative_strides_raise():
    d = make_delta(9, 256, 2, 64, k=3, seed=10)
    x = np.random.default_rng(5).standard_normal((4, 256)).astype(np.float32)[::-1]
    with pytest.raises(ValueError, match="strides"):
        ops.delta_matmul(x, d)


def test_bad_arguments_name_themselves():
    d = make_delta(4, 128, 2, 32, k=2, seed=11)
    x = np.zeros((2, 128), np.float32)
    with pytest.raises(ValueError, match=r"out: expected shape \[2, 4\]"):
        ops.delta_matmul(x, d, np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="out: (expected float32|unsupported .*dtype)"):
        ops.delta_matmul(x, d, np.zeros((2, 4), np.float64))
    with pytest.raises(ValueError, match="out: rows must be contiguous"):
        ops.delta_matmul(x, d, np.zeros((4, 2), np.float32).T)
    frozen = np.zeros((2, 4), np.float32)
    frozen.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        ops.delta_matmul(x, d, frozen)
    with pytest.raises(ValueError, match=r"x has shape \[\*, 64\] but qweight \[4, 8\]"):
        ops.delta_matmul(np.zeros((2, 64), np.float32), d)
    with pytest.raises(ValueError, match="x: expected float32|x: unsupported"):
        ops.delta_matmul(np.zeros((2, 128), np.int32), d)
    with pytest.raises(ValueError, match="scales must be F16"):
        ops.delta_matmul(x, {**d, "scales": d["scales"].astype(np.float32)})
    with pytest.raises(ValueError, match=r"qweight \[4, 7\] holds 2-bit codes for 112 columns"):
        ops.delta_matmul(x, {**d, "qweight": d["qweight"][:, :7].copy()})
    with pytest.raises(ValueError, match="bits must be 1..4"):
        ops.delta_matmul(x, d, bits=5)


def test_multi_delta_matmul_with_empty_segments():
    cols, rows = 512, 21
    experts = [make_delta(rows, cols, bits, group, k=4, seed=20 + i)
               for i, (bits, group) in enumerate([(2, 64), (4, 128), (3, 32), (1, 512), (2, 64)])]
    starts = [0, 3, 3, 4, 8, 8]  # experts 1 and 4 get no tokens
    x = torch.randn(8, cols)
    out = torch.zeros(8, rows)
    pointer = out.data_ptr()
    ops.multi_delta_matmul(x, experts, np.array(starts), out)
    assert out.data_ptr() == pointer
    for e, d in enumerate(experts):
        segment = slice(starts[e], starts[e + 1])
        if starts[e + 1] > starts[e]:
            check(out[segment], x[segment], d)
    with pytest.raises(ValueError, match="segment_starts"):
        ops.multi_delta_matmul(x, experts, [0, 3, 3, 4, 8], out)
    with pytest.raises(ValueError, match=r"segment_starts\[2\]"):
        ops.multi_delta_matmul(x, experts, [0, 5, 3, 4, 8, 8], out)


def test_multi_delta_matmul_single_token_batch():
    d = make_delta(16, 256, 2, 64, k=2, seed=30)
    x = np.random.default_rng(6).standard_normal((1, 256)).astype(np.float32)
    out = ops.multi_delta_matmul(x, [d, d], [0, 0, 1])
    check(out, x, d)


def test_kernel_path_is_reported():
    assert ops.cpu_kernel_path() in ("avx512vnni", "avx512", "avx2int", "avx2", "reference")


@pytest.mark.parametrize(("path", "digits"), KERNELS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_every_kernel_path(monkeypatch, force_cpu_path, path, digits, bits):
    force_cpu_path(path)  # skips, with the reason, where this CPU lacks the path
    monkeypatch.setenv("MESWITCH_ACTIVATION_DIGITS", digits)
    d = make_delta(19, 1024, bits, 64, k=10, seed=40 + bits)
    x = np.random.default_rng(7).standard_normal((5, 1024)).astype(np.float32)
    out = ops.delta_matmul(x, d)
    assert ops.cpu_kernel_path() == path
    check(out, x, d)
    expected, float_bound = reference(x, d, "reference")
    beyond = (np.abs(out - expected) > float_bound + 1e-6).mean()
    if path in INTEGER_PATHS and bits != 3 and digits == "1":
        # One int8 digit per x: the rounding shows on most outputs (measured: 95-97 %),
        # so this is the int8 kernel and not a float one.
        assert beyond > 0.5, beyond
    else:
        assert beyond == 0, beyond


@pytest.mark.parametrize(("path", "digits"), KERNELS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize(("cols", "group"), [(688, 64), (320, 128), (64 * 7 + 24, 32)])
def test_every_kernel_path_on_widths_ending_inside_a_block(monkeypatch, force_cpu_path, path, digits, bits, cols,
                                                           group):
    """The tiny family's 688-wide rows and 64k + r widths: the last SIMD block is partial and the last group ragged."""
    force_cpu_path(path)
    monkeypatch.setenv("MESWITCH_ACTIVATION_DIGITS", digits)
    d = make_delta(37, cols, bits, group, k=cols // 64, seed=cols + bits)
    used = cols * bits % 32
    if used:  # garbage in the padding bits after each row's last code: ignored by every path
        d["qweight"][:, -1] |= np.uint32((0xFFFFFFFF << used) & 0xFFFFFFFF)
    x = np.random.default_rng(cols).standard_normal((6, cols)).astype(np.float32)
    out = ops.delta_matmul(x, d)
    assert ops.cpu_kernel_path() == path
    check(out, x, d)


@pytest.mark.parametrize("path", ["reference", "avx2"])
@pytest.mark.parametrize("bits,group", [(1, 64), (2, 64), (2, 48), (2, 20), (3, 32), (4, 128)])
def test_add_delta_rows_adds_the_rows_delta_rows_gives(force_cpu_path, path, bits, group):
    """Into zeros: bit-equal to delta_rows (the rule of the fused kernels); into a slab: that slab
    plus those rows, the one float32 addition each. On every path (AVX2: 1, 2 and 4 bits), a
    width ending inside a vector and groups ending inside one (48, 20) included."""
    force_cpu_path(path)
    d = make_delta(40, 203, bits, group, k=5, seed=bits * 100 + group)
    expected = ops.delta_rows(d, np.arange(7, 30))
    zero = torch.zeros(23, 203)
    assert ops.add_delta_rows(d, 7, zero) is zero
    assert np.array_equal(zero.numpy(), expected)
    slab = np.random.default_rng(bits).standard_normal((23, 203)).astype(np.float32)
    before = slab.copy()
    ops.add_delta_rows(d, 7, slab)
    assert np.array_equal(slab, before + expected)
    strided = torch.zeros(23, 256)[:, :203]  # rows 256 floats apart
    ops.add_delta_rows(d, 7, strided)
    assert np.array_equal(strided.numpy(), expected)


def test_add_delta_rows_refuses_bad_input():
    d = make_delta(40, 200, 2, 64, k=5, seed=1)
    with pytest.raises(ValueError, match=r"rows 30\.\.41 are outside delta"):
        ops.add_delta_rows(d, 30, np.zeros((11, 200), np.float32))
    with pytest.raises(ValueError, match="out: (expected float32|unsupported DLPack dtype)"):
        ops.add_delta_rows(d, 0, np.zeros((2, 200), np.float64))
    with pytest.raises(ValueError, match=r"out: expected shape \[\*, 200\]"):
        ops.add_delta_rows(d, 0, np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="column stride 1"):
        ops.add_delta_rows(d, 0, np.zeros((200, 2), np.float32).T)
