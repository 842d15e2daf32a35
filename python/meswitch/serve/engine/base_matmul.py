"""The base GEMM: float32 activations times a base matrix held in 16 bit, float32 out.

Every product with a base matrix in the serving model goes through :func:`base_matmul`, the
one place the rule below is written.

On the CPU a product of at most :data:`FEW_TOKENS` tokens (every decode step of up to that
many sequences) is the project's own dense kernel, :func:`meswitch.ops.dense_matmul`: the
16-bit weight is streamed from memory once and widened to float32 in registers, so the call
costs about the time to read the weight (``bench/cpu_gemm``, ``bench/base_gemm``). Larger
products (prefill chunks) are compute-bound, where BLAS is faster: the weight is widened to
float32 a slab of rows at a time into one small buffer that stays in cache and each slab is
one float32 GEMM, so no float32 copy of the weight exists beyond the slab (4 MiB: at 24-384
tokens 10-20 % faster than 1 MiB on the 2-core AVX2 machine, both MLP shapes of a 2048-wide model). Both keep float32
products and sums (about 1e-6 of the output's scale), where rounding the activations to 16
bit would cost 3e-3 in bfloat16 and 3.5e-4 in float16. Measured crossover on the 2-core AVX2
machine, a 5632 x 2048 bf16 weight: the kernel 2.2 / 5.5 / 14.4 ms at 1 / 8 / 16 tokens
against 6.1 / 12.1 / 21.0 ms for 1 MiB slabs, 32.8 against 18.7 ms at 32 tokens.

A prefill of an expert's many tokens needs the base and the expert's delta. The fused
delta kernel's cost grows with every token (it is built for a few), while a GEMM of
``base + delta`` costs what the base's GEMM costs: so a segment of more than
:data:`FEW_TOKENS` tokens of one expert is a *fold*: each widened slab of base rows gets the
delta's rows added (:func:`meswitch.ops.add_delta_rows`) and one GEMM applies both to that
segment's tokens. On a 4-layer slice of a 2048-wide model (16 sequences of 24 tokens over
the base and three 2-bit experts, 2-core AVX2) a prefill forward went from 6.39 s (fused
kernel 2.88 s of it) to 3.9-4.1 s, 0.6 s of it adding the deltas' rows.

On a GPU the product is the 16-bit GEMM of cuBLAS (tensor cores, float32 accumulation) with
the activations rounded to the weight's dtype, as a 16-bit model runs there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from meswitch.ops import dense_matmul

#: Most tokens a CPU product sends to the dense kernel; more go to BLAS over widened slabs.
FEW_TOKENS = 16
#: Bytes of float32 weight widened at a time on the CPU (512 rows at 2048 columns).
SLAB_BYTES = 4 << 20


@dataclass(frozen=True)
class Fold:
    """Tokens ``start:stop`` (one expert's segment) multiply ``weight + delta``: ``add_rows(first,
    slab)`` adds the delta's rows ``first ..`` into a float32 slab of widened base rows."""

    start: int
    stop: int
    add_rows: Callable[[int, torch.Tensor], object]


def folds_apply(tokens: int) -> bool:
    """Whether a segment of ``tokens`` tokens of one expert is folded into the base's GEMM on the CPU."""
    return tokens > FEW_TOKENS


def base_matmul(x: torch.Tensor, weight: torch.Tensor, folds: Sequence[Fold] = ()) -> torch.Tensor:
    """``x @ weight.T`` in float32: ``x`` float32 ``[tokens, cols]``, ``weight`` ``[rows, cols]``.

    ``weight`` is float16, bfloat16 or float32, on the device of ``x``; the result is a new
    contiguous float32 ``[tokens, rows]``. Each fold's tokens get ``x @ (weight + delta).T``
    instead (CPU only; sorted, disjoint segments of more than :data:`FEW_TOKENS` tokens).
    """
    if x.device.type != "cpu":
        if folds:
            raise ValueError("folds: a delta is folded into the base's GEMM on the CPU only")
        if weight.dtype == torch.float32:
            return x @ weight.T
        return (x.to(weight.dtype) @ weight.T).float()
    if x.shape[0] <= FEW_TOKENS and not folds:
        return dense_matmul(x, weight)
    if weight.dtype == torch.float32 and not folds:
        return x @ weight.T
    rows, cols = weight.shape
    slab_rows = max(1, SLAB_BYTES // (4 * cols))
    out_t = torch.empty((rows, x.shape[0]), dtype=torch.float32)  # transposed: each slab's rows contiguous
    slab = torch.empty((min(slab_rows, rows), cols), dtype=torch.float32)
    folded = torch.empty_like(slab) if folds else slab
    plain = _plain_segments(x.shape[0], folds)
    x_t = x.T
    for start in range(0, rows, slab_rows):
        stop = min(start + slab_rows, rows)
        widened = slab[:stop - start]
        widened.copy_(weight[start:stop])
        if not folds:
            torch.mm(widened, x_t, out=out_t[start:stop])
            continue
        for a, b in plain:
            out_t[start:stop, a:b] = widened @ x_t[:, a:b]
        for fold in folds:
            expert = folded[:stop - start]
            expert.copy_(widened)
            fold.add_rows(start, expert)
            out_t[start:stop, fold.start:fold.stop] = expert @ x_t[:, fold.start:fold.stop]
    return out_t.T.contiguous()


def _plain_segments(tokens: int, folds: Sequence[Fold]) -> list[tuple[int, int]]:
    """The token ranges outside every fold."""
    segments, at = [], 0
    for fold in folds:
        if fold.start < at or fold.stop <= fold.start or fold.stop > tokens:
            raise ValueError(f"folds: segments must be sorted, disjoint and within {tokens} tokens, got "
                             f"{[(f.start, f.stop) for f in folds]}")
        if fold.start > at:
            segments.append((at, fold.start))
        at = fold.stop
    return [*segments, (at, tokens)] if at < tokens else segments
