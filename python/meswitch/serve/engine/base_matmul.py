"""The base GEMM: float32 activations times a base matrix held in 16 bit, float32 out.

Every product with a base matrix in the serving model goes through :func:`base_matmul`, the
one place the rule below is written.

On the CPU a product of at most :data:`FEW_TOKENS` tokens (every decode step of up to that
many sequences) is the project's own dense kernel, :func:`meswitch.ops.dense_matmul`: the
16-bit weight is streamed from memory once and widened to float32 in registers, so the call
costs about the time to read the weight (``bench/cpu_gemm``, ``bench/base_gemm``). Larger
products (prefill chunks) are compute-bound, where BLAS is faster: the weight is widened to
float32 a slab of rows at a time into one small buffer that stays in cache and each slab is
one float32 GEMM, so no float32 copy of the weight exists beyond the slab. Both keep float32
products and sums (about 1e-6 of the output's scale), where rounding the activations to 16
bit would cost 3e-3 in bfloat16 and 3.5e-4 in float16. Measured crossover on the 2-core AVX2
machine, a 5632 x 2048 bf16 weight: the kernel 2.2 / 5.5 / 14.4 ms at 1 / 8 / 16 tokens
against 6.1 / 12.1 / 21.0 ms for the slabs, 32.8 against 18.7 ms at 32 tokens.

On a GPU the product is the 16-bit GEMM of cuBLAS (tensor cores, float32 accumulation) with
the activations rounded to the weight's dtype, as a 16-bit model runs there.
"""

from __future__ import annotations

import torch

from meswitch.ops import dense_matmul

#: Most tokens a CPU product sends to the dense kernel; more go to BLAS over widened slabs.
FEW_TOKENS = 16
#: Rows of weight widened at a time on the CPU: a slab of 1 MiB of float32 at 2048 columns.
SLAB_BYTES = 1 << 20


def base_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` in float32: ``x`` float32 ``[tokens, cols]``, ``weight`` ``[rows, cols]``.

    ``weight`` is float16, bfloat16 or float32, on the device of ``x``; the result is a new
    contiguous float32 ``[tokens, rows]``.
    """
    if x.device.type != "cpu":
        if weight.dtype == torch.float32:
            return x @ weight.T
        return (x.to(weight.dtype) @ weight.T).float()
    if x.shape[0] <= FEW_TOKENS:
        return dense_matmul(x, weight)
    if weight.dtype == torch.float32:
        return x @ weight.T
    rows, cols = weight.shape
    slab_rows = max(1, SLAB_BYTES // (4 * cols))
    out_t = torch.empty((rows, x.shape[0]), dtype=torch.float32)  # transposed: each slab's rows contiguous
    slab = torch.empty((min(slab_rows, rows), cols), dtype=torch.float32)
    x_t = x.T
    for start in range(0, rows, slab_rows):
        stop = min(start + slab_rows, rows)
        widened = slab[:stop - start]
        widened.copy_(weight[start:stop])
        torch.mm(widened, x_t, out=out_t[start:stop])
    return out_t.T.contiguous()
