"""meswitch.ops.dense_matmul against a float64 NumPy product of the same widened weights.

Bound: |out - ref| <= (in / 8 + 17) * 2**-24 * M, M = |x| @ |W|^T (float64): each of L <= 16
lanes sums ceil(in / L) float32 products in order, then the lanes are added, and bf16/f16
weights widen to float32 exactly (include/meswitch/cpu/dense_gemm.hpp). Every CPU path this
machine has, all three weight dtypes (torch and ml_dtypes bfloat16), strided x, 1 and 2 threads.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from meswitch import ops

torch = pytest.importorskip("torch")

PATHS = ["reference", "avx2", "avx2int", "avx512", "avx512vnni"]
WEIGHT_KINDS = ["torch-bfloat16", "ml_dtypes-bfloat16", "float16", "float32"]


def make_weight(kind: str, rows: int, cols: int, rng: np.random.Generator) -> tuple[object, np.ndarray]:
    """(weight as the kernel takes it, its values widened to float64)."""
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    if kind == "torch-bfloat16":
        weight = torch.from_numpy(values).to(torch.bfloat16)
        return weight, weight.float().numpy().astype(np.float64)
    if kind == "ml_dtypes-bfloat16":
        weight = values.astype(ml_dtypes.bfloat16)
    else:
        weight = values.astype(kind)
    return weight, weight.astype(np.float64)


def check(out: np.ndarray, x: np.ndarray, widened: np.ndarray) -> None:
    x64 = np.asarray(x, dtype=np.float64)
    expected = x64 @ widened.T
    bound = (widened.shape[1] / 8 + 17) * 2.0**-24 * (np.abs(x64) @ np.abs(widened).T) + 1e-30
    error = np.abs(np.asarray(out, dtype=np.float64) - expected)
    worst = np.unravel_index(np.argmax(error / bound), error.shape)
    assert (error <= bound).all(), f"{(error > bound).sum()} outputs beyond the bound; worst {worst}: " \
                                   f"error {error[worst]:.3g}, bound {bound[worst]:.3g}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_dense_matmul_matches_float64(path, kind, force_cpu_path, monkeypatch, rng):
    force_cpu_path(path)
    for rows, cols in [(1, 1), (5, 7), (37, 33), (64, 256), (67, 1031), (13, 4099)]:
        weight, widened = make_weight(kind, rows, cols, rng)
        for tokens in (1, 2, 3, 6, 8, 11, 16, 17):
            for threads in ("1", "2"):
                monkeypatch.setenv("MESWITCH_NUM_THREADS", threads)
                # x a column slice of a wider array: row stride cols + 5
                wide = rng.standard_normal((tokens, cols + 5)).astype(np.float32)
                x = wide[:, 2:2 + cols]
                out = np.full((tokens, rows), np.nan, dtype=np.float32)
                assert ops.dense_matmul(x, weight, out=out) is out
                check(out, x, widened)


@pytest.mark.parametrize("path", PATHS)
def test_dense_matmul_torch_in_torch_out(path, force_cpu_path):
    force_cpu_path(path)
    torch.manual_seed(0)
    weight = torch.randn(300, 520).to(torch.bfloat16)
    x = torch.randn(520, 8).t()  # a transposed view: column stride 8, row stride 1
    out = ops.dense_matmul(x, weight)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == (8, 300)
    check(out.numpy(), x.numpy(), weight.float().numpy().astype(np.float64))
    # the same product as torch's own float32 GEMM, to float32 rounding of the sums
    torch.testing.assert_close(out, x @ weight.float().T, rtol=2e-4, atol=2e-4)


def test_dense_matmul_rejects_bad_input_by_name(rng):
    weight = rng.standard_normal((4, 8)).astype(np.float16)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"weight must be F16, BF16 or F32, got I32"):
        ops.dense_matmul(x, weight.astype(np.int32))
    with pytest.raises(ValueError, match=r"weight: unsupported DLPack dtype \(code 1, bits 16"):  # uint16
        ops.dense_matmul(x, weight.view(np.uint16))
    with pytest.raises(ValueError, match=r"weight must be 2-D"):
        ops.dense_matmul(x, weight.reshape(-1), out=np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"weight must have contiguous rows"):
        ops.dense_matmul(x[:, :4], np.asfortranarray(weight[:, :4]))
    with pytest.raises(ValueError, match=r"x has shape \[3, 7\] but weight has shape \[4, 8\]"):
        ops.dense_matmul(x[:, :7], weight)
    with pytest.raises(ValueError, match=r"x must be F32, BF16 or F16"):
        ops.dense_matmul(x.astype(np.int32), weight)
    with pytest.raises(ValueError, match=r"out: expected shape \[3, 4\], got \[3, 5\]"):
        ops.dense_matmul(x, weight, out=np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"out: expected float32"):
        ops.dense_matmul(x, weight, out=np.zeros((3, 4), np.float16))
    read_only = np.zeros((3, 4), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match=r"out: array is read-only"):
        ops.dense_matmul(x, weight, out=read_only)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["torch-bfloat16", "float16", "float32"])
def test_a_tokens_output_is_the_same_bits_alone_and_in_a_batch(path, kind, force_cpu_path, rng):
    """Every token count sums in one order, so a sequence's logits do not depend on its batch."""
    force_cpu_path(path)
    weight, _ = make_weight(kind, 67, 1031, rng)
    x = rng.standard_normal((17, 1031)).astype(np.float32)
    together = ops.dense_matmul(x, weight)
    for first, count in [(0, 1), (3, 1), (16, 1), (0, 2), (5, 3), (2, 7), (0, 16)]:
        np.testing.assert_array_equal(ops.dense_matmul(x[first:first + count], weight), together[first:first + count])
