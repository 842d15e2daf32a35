"""CPU GEMMs: the fused delta GEMM ``out += x @ delta^T`` straight from the compressed
pieces, and the base model's dense GEMM ``out = x @ W^T`` for a few tokens.

Thin wrappers over ``meswitch._core``; the work is in ``include/meswitch/cpu/delta_gemm.hpp``
and ``include/meswitch/cpu/dense_gemm.hpp``.
Inputs may be NumPy arrays or PyTorch CPU tensors (anything with ``__dlpack__``); nothing
is copied except the activations, which the kernel widens to float32 once per call.
``out`` is float32 and is accumulated into, in place.

Dispatch by device: activations in CUDA memory (torch CUDA tensors) run the CUDA kernels of
:mod:`meswitch.cuda`, with the deltas already on the device (:func:`meswitch.cuda.to_device`);
a build without CUDA says so instead.

The kernel path is chosen at run time: AVX-512 VNNI or, on AVX2 CPUs without AVX-512,
AVX2 integer (integer dot products of the codes with x held as two int8 digits, each x
within max|x| / 32512 of its block; 3-bit deltas run the float kernel there), AVX-512 or
AVX2 (float32 throughout), or the portable reference.
``MESWITCH_CPU_PATH=reference|avx2|avx2int|avx512|avx512vnni`` forces one,
``MESWITCH_NUM_THREADS`` sets the thread count (a pool started on first use) and
``MESWITCH_ACTIVATION_DIGITS=1`` trades the integer paths' precision for speed: x as one
int8 digit (within max|x| / 254 of its block; about 1.5x faster, and about 2e-3 of the
largest logit on the bundled family instead of 3e-5).

:func:`dense_matmul` takes the same paths (avx512vnni runs its avx512 kernel, avx2int its
avx2 kernel), float32 products and sums throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from meswitch import _core
from meswitch.delta_pieces import delta_info as _delta_info
from meswitch.delta_pieces import delta_pieces as _pieces

__all__ = ["add_delta_rows", "cpu_kernel_path", "delta_matmul", "delta_rows", "dense_matmul", "multi_delta_matmul"]


def cpu_kernel_path() -> str:
    """The CPU kernel path in use now: ``"avx512vnni"``, ``"avx512"``, ``"avx2int"``, ``"avx2"`` or ``"reference"``."""
    from meswitch import _core

    return _core.cpu_kernel_path()


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _cuda_dispatch(x: Any, deltas: Sequence[Any]) -> Any:
    """:mod:`meswitch.cuda` when ``x`` lives on a CUDA device (``None`` otherwise)."""
    from meswitch import cuda

    if not cuda.is_cuda_tensor(x):
        return None
    cuda.require_cuda_build(f"x ({getattr(x, 'device', 'CUDA memory')})")
    for index, delta in enumerate(deltas):
        if delta is not None and not isinstance(delta, cuda.DeviceDelta):
            raise TypeError(f"x is on {getattr(x, 'device', 'a CUDA device')}: delta {index} must be a "
                            f"meswitch.cuda.DeviceDelta (meswitch.cuda.to_device(pieces)), got {type(delta).__name__}")
    return cuda


def _new_out(x: Any, rows: int) -> Any:
    if _is_torch(x):
        import torch

        return torch.zeros((x.shape[0], rows), dtype=torch.float32)
    return np.zeros((x.shape[0], rows), dtype=np.float32)


def delta_matmul(x: Any, delta_pieces: Any, out: Any = None, *, bits: int | None = None,
                 group_size: int | None = None) -> Any:
    """Add ``x @ delta^T`` to ``out``, unpacking the compressed delta on the fly.

    Parameters
    ----------
    x
        Activations ``[tokens, cols]``: float32, bfloat16 or float16, NumPy array or
        torch CPU tensor. Any strides (non-negative). A torch CUDA tensor (float16 or
        bfloat16) runs :func:`meswitch.cuda.delta_matmul` instead, with ``delta_pieces`` a
        :class:`meswitch.cuda.DeviceDelta`.
    delta_pieces
        The compressed delta of one weight ``[rows, cols]``: a mapping with the pieces
        ``qweight`` (uint32), ``scales`` (float16), ``zeros`` (uint8), ``salient_idx``
        (int32) and ``salient`` (float16) -- keys may also be ``"W.qweight"`` style --
        optionally with ``bits`` and ``group_size``; or an ``(ExpertArtifact, weight_name)``
        pair, which takes everything from the artifact.
    out
        float32 ``[tokens, rows]`` with contiguous rows, accumulated in place. ``None``
        allocates zeros of the same kind as ``x`` (NumPy or torch).
    bits
        Code width 1..4 (overrides the mapping's ``bits``).
    group_size
        Columns per quantization group (``0`` = whole row; overrides the mapping's).

    Returns
    -------
    The same object as ``out`` (or the new array).

    Raises
    ------
    ValueError
        Wrong dtype, shape or device of any argument (the message names it).
    RuntimeError
        ``x`` is on a CUDA device but this meswitch was built without CUDA.
    TypeError
        ``x`` is on a CUDA device but the delta is not a :class:`meswitch.cuda.DeviceDelta`.
    """
    from meswitch import _core

    cuda = _cuda_dispatch(x, [delta_pieces])
    if cuda is not None:
        return cuda.delta_matmul(x, delta_pieces, out)
    arrays, bits, group_size = _pieces(delta_pieces, bits, group_size)
    if out is None:
        out = _new_out(x, int(arrays[0].shape[0]))
    _core.delta_matmul(x, *arrays, bits, group_size, out)
    return out


def multi_delta_matmul(x: Any, experts: Sequence[Any], segment_starts: Sequence[int] | Any,
                       out: Any = None, *, bits: int | None = None, group_size: int | None = None) -> Any:
    """Add each token's own expert delta: ``out[t] += x[t] @ delta_e^T`` for ``t`` in segment ``e``.

    Tokens must be sorted by expert. Each active expert's packed delta is streamed once
    for all the tokens of its segment; empty segments cost nothing.

    Parameters
    ----------
    x
        Activations ``[tokens, cols]`` (as in :func:`delta_matmul`).
    experts
        One delta per expert, each as :func:`delta_matmul` takes it. All share ``cols``
        and ``rows``.
    segment_starts
        ``E + 1`` non-decreasing token offsets: expert ``e`` owns rows
        ``[segment_starts[e], segment_starts[e + 1])`` of ``x``. On CUDA also a
        :class:`meswitch.cuda.SegmentTable` (tokens in any order, ids on the device).
    out
        float32 ``[tokens, rows]``, accumulated in place; ``None`` allocates zeros.
    bits, group_size
        Defaults for experts whose mapping lacks them.

    Returns
    -------
    The same object as ``out`` (or the new array).
    """
    from meswitch import _core

    cuda = _cuda_dispatch(x, experts)
    if cuda is not None:
        return cuda.multi_delta_matmul(x, experts, segment_starts, out)
    tuples = []
    for expert in experts:
        arrays, expert_bits, expert_group = _pieces(expert, bits, group_size)
        tuples.append((*arrays, expert_bits, expert_group))
    if hasattr(segment_starts, "tolist"):
        segment_starts = segment_starts.tolist()
    starts = [int(s) for s in segment_starts]
    if out is None:
        if not tuples:
            raise ValueError("experts is empty and no out was given")
        out = _new_out(x, int(tuples[0][0].shape[0]))
    _core.multi_delta_matmul(x, tuples, starts, out)
    return out


def delta_rows(delta: Any, rows: Any, *, bits: int | None = None, group_size: int | None = None) -> np.ndarray:
    """Rows ``rows`` of the dequantized delta, float32 ``[len(rows), cols]``: an embedding lookup.

    The rule the fused kernels apply (``include/meswitch/quantize.hpp``, ``dequantize_rows``),
    reading the codes of those rows alone; equal bit for bit to the same rows of
    :meth:`ExpertArtifact.delta`. ``delta`` as :func:`delta_matmul` takes it; ``rows`` integer
    indices (NumPy or torch CPU).

    Raises
    ------
    ValueError
        A row outside the delta (the message names it), or pieces that do not fit the layout.
    """
    arrays, bits, group_size = _pieces(delta, bits, group_size)
    _, cols, name = _delta_info(delta, arrays, bits)
    return _core.delta_rows(*arrays, bits, group_size, cols, np.asarray(rows, dtype=np.int64), name)


def add_delta_rows(delta: Any, first: int, out: Any, *, bits: int | None = None,
                   group_size: int | None = None) -> Any:
    """Add rows ``first`` .. ``first + len(out)`` of the dequantized delta into ``out``, in place.

    ``out`` is float32 ``[rows, cols]`` with contiguous rows (NumPy or torch CPU), typically
    a widened slab of the base's rows: one GEMM over it then applies base and delta to an
    expert's many tokens (a prefill), where the fused kernel's cost grows with every token.
    The values are :func:`delta_rows`'s, the rule of ``include/meswitch/quantize.hpp``.
    ``delta`` as :func:`delta_matmul` takes it. Returns ``out``.

    Raises
    ------
    ValueError
        Rows outside the delta, or an ``out`` of the wrong dtype, width or strides.
    """
    arrays, bits, group_size = _pieces(delta, bits, group_size)
    _, cols, name = _delta_info(delta, arrays, bits)
    _core.add_delta_rows(*arrays, bits, group_size, cols, int(first), out, name)
    return out


def dense_matmul(x: Any, weight: Any, *, out: Any = None) -> Any:
    """Write ``x @ weight^T`` into ``out``: the dense GEMM of a few tokens on the CPU.

    The weight is streamed from memory once per call whatever the token count, widened to
    float32 in registers; products and sums are float32, each output within
    ``(in / 8 + 17) * 2**-24 * sum_c |weight[r, c] * x[t, c]|`` of the exact product.
    Fastest for 1-16 tokens; any count runs.

    Parameters
    ----------
    x
        Activations ``[tokens, in]``: float32 (float16 and bfloat16 are widened), NumPy array
        or torch CPU tensor, any non-negative strides.
    weight
        ``[out, in]`` as checkpoints store it: bfloat16 (``torch.bfloat16`` or
        ``ml_dtypes.bfloat16``), float16 or float32, rows contiguous (any row stride).
    out
        float32 ``[tokens, out]`` with contiguous rows, overwritten. ``None`` allocates one
        of the same kind as ``x`` (NumPy or torch).

    Returns
    -------
    The same object as ``out`` (or the new array).

    Raises
    ------
    ValueError
        Wrong dtype, shape or strides of ``x``, ``weight`` or ``out`` (the message names it).
    """
    if out is None:
        out = _new_out(x, int(weight.shape[0]) if len(weight.shape) == 2 else 0)
    _core.dense_matmul(x, weight, out)
    return out
