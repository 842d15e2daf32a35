"""The base GEMM: float32 activations times a base matrix held in 16 bit, float32 out.

Every product with a base matrix in the serving model goes through :func:`base_matmul`, so
a dedicated memory-bound 16-bit GEMM replaces the body here and nowhere else.

On the CPU the weight is widened to float32 a slab of rows at a time into one small buffer
that stays in cache, and each slab is one float32 GEMM; no float32 copy of the weight
exists beyond the slab. Measured on a shared 2-core AVX2 machine under load (one thread,
best of 15, ``bench/base_gemm``, a 5632 x 2048 weight; bfloat16 / float16), against the
ways torch offers:

======  ================  =========================  ===============================
tokens  slabs (this)      ``x.to(w.dtype) @ w.T``    the whole weight widened a call
======  ================  =========================  ===============================
1       19.6 / 14.1 ms    10.4 / 10.3 ms             79 / 86 ms
8       53.5 / 51.9 ms    91.0 / 80.0 ms             148 / 101 ms
16      58.2 / 37.2 ms    200.5 / 102.0 ms           157 / 116 ms
======  ================  =========================  ===============================

Rounding the activations to 16 bit is faster at one token (torch's 16-bit matrix-vector
product) and 1.5-3.4x slower from 8 tokens on (no fast 16-bit GEMM on CPUs without AVX-512
BF16/FP16), and it costs accuracy: 3e-3 of the output's scale per product in bfloat16,
3.5e-4 in float16, where the slabs keep float32's 6e-7. The slabs are chosen for both
reasons, and because one rule for every batch size keeps a sequence's logits independent
of what else shares its forward. Their one-token cost is the widening, which the dedicated
kernel removes.

On a GPU the product is the 16-bit GEMM of cuBLAS (tensor cores, float32 accumulation) with
the activations rounded to the weight's dtype, as a 16-bit model runs there.
"""

from __future__ import annotations

import torch

#: Rows of weight widened at a time on the CPU: a slab of 1 MiB of float32 at 2048 columns.
SLAB_BYTES = 1 << 20


def base_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` in float32: ``x`` float32 ``[tokens, cols]``, ``weight`` ``[rows, cols]``.

    ``weight`` is float16, bfloat16 or float32, on the device of ``x``; the result is a new
    contiguous float32 ``[tokens, rows]``.
    """
    if weight.dtype == torch.float32:
        return x @ weight.T
    if x.device.type != "cpu":
        return (x.to(weight.dtype) @ weight.T).float()
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
