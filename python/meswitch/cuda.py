"""meswitch on CUDA devices: deltas in the GPU tile layout, segment tables, the fused kernel.

Thin wrappers over ``meswitch._core`` (``include/meswitch/cuda/``). Tensors are torch CUDA
tensors, handed to the kernels through DLPack without copies; every launch goes to torch's
current stream of the tensors' device, so it is ordered with the surrounding torch work as a
torch op would be. meswitch is not built against torch: torch only holds the memory.

A delta is repacked once on the host into the tile layout the kernel reads coalesced (see
``include/meswitch/cuda/delta_gemm.cuh``), into pinned memory, and copied to the device
asynchronously (:func:`to_device`). A batch's segment table is built on the device from
per-token expert ids (:func:`build_segments`), once per forward, and serves every linear;
:func:`multi_delta_matmul` is then one launch per linear for the whole mixed batch.

Shapes the kernel takes: rows and columns multiples of 64, group sizes multiples of 16 or
whole rows; activations float16 or bfloat16; outputs float32, float16 or bfloat16,
accumulated in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from meswitch import _core
from meswitch.delta_pieces import delta_info, delta_pieces

__all__ = ["DeviceDelta", "SegmentTable", "build_segments", "delta_matmul", "dequantize", "is_available",
           "is_built", "is_cuda_tensor", "multi_delta_matmul", "require_cuda_build", "segments_from_starts",
           "to_device", "unavailable_reason"]

#: DLPack's device type of CUDA memory.
_DLPACK_CUDA = 2


def is_built() -> bool:
    """Whether this meswitch was built with its CUDA kernels (``MESWITCH_CUDA=ON``)."""
    return bool(_core.CUDA)


def is_available() -> bool:
    """Whether the CUDA kernels can run here: built with them, and a device is visible."""
    return is_built() and _core.cuda_device_count() > 0


def unavailable_reason() -> str:
    """Why :func:`is_available` is false (``""`` when it is true)."""
    if not is_built():
        return "meswitch was built without CUDA (MESWITCH_CUDA=OFF)"
    return _core.cuda_device_error()


def is_cuda_tensor(x: Any) -> bool:
    """Whether ``x`` lives in CUDA device memory (any DLPack producer: torch, CuPy ...)."""
    device = getattr(x, "__dlpack_device__", None)
    if device is None:
        return False
    try:
        return int(device()[0]) == _DLPACK_CUDA
    except (TypeError, ValueError, RuntimeError, BufferError):
        return False


def require_cuda_build(what: str) -> None:
    """Raise ``RuntimeError`` saying so when ``what`` is on a CUDA device but this build has no CUDA kernels."""
    if not is_built():
        raise RuntimeError(f"{what} is on a CUDA device, but this meswitch was built without CUDA "
                           f"(MESWITCH_CUDA=OFF): rebuild with -DMESWITCH_CUDA=ON, or pass CPU tensors")


def _torch():
    import torch

    return torch


def _stream(device: Any) -> int:
    """The raw handle of torch's current stream on ``device``."""
    return int(_torch().cuda.current_stream(device).cuda_stream)


@dataclass(frozen=True)
class DeviceDelta:
    """One compressed delta in the tile layout, in device memory (torch tensors).

    ``codes`` and ``params`` hold 32-bit words (as ``torch.int32``), ``salient_idx`` int32,
    ``salient`` float16, flat, as ``include/meswitch/cuda/tile_layout.hpp`` lays them out.
    """

    codes: Any
    params: Any
    salient_idx: Any
    salient: Any
    rows: int
    cols: int
    bits: int
    group_size: int
    name: str = ""

    @property
    def k(self) -> int:
        """Salient input channels."""
        return int(self.salient_idx.numel())

    @property
    def device(self) -> Any:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Device bytes of the four arrays."""
        return sum(int(t.numel()) * t.element_size() for t in (self.codes, self.params, self.salient_idx, self.salient))

    def kernel_argument(self) -> tuple:
        """The tuple ``meswitch._core.cuda_multi_delta_matmul`` takes for this expert."""
        return (self.codes, self.params, self.salient_idx, self.salient, self.rows, self.cols, self.bits,
                self.group_size, self.name)


def tile_on_host(delta: Any, *, bits: int | None = None, group_size: int | None = None, name: str | None = None,
                 pinned: bool = False) -> dict[str, Any]:
    """The delta's four tile-layout arrays on the host, repacked from its canonical pieces.

    Parameters
    ----------
    delta
        As :func:`meswitch.ops.delta_matmul` takes it: a mapping of the five pieces (optionally
        with ``bits``, ``group_size`` and ``cols``) or an ``(ExpertArtifact, weight)`` pair.
    pinned
        Put the arrays in page-locked torch tensors (for an asynchronous copy to a device);
        otherwise NumPy arrays.

    Returns
    -------
    dict
        ``codes``, ``params`` (32-bit words), ``salient_idx``, ``salient`` and the scalars
        ``rows``, ``cols``, ``bits``, ``group_size``, ``name``.

    Raises
    ------
    ValueError
        The delta's shape or group size is one the kernels do not take (the message says which).
    """
    arrays, bits, group_size = delta_pieces(delta, bits, group_size)
    rows, cols, label = delta_info(delta, arrays, bits)
    name = label if name is None else name
    k = int(arrays[3].shape[0])
    sizes = _core.tiled_sizes(rows, cols, bits, group_size, k, name)
    if pinned:
        torch = _torch()
        dtypes = {"codes": torch.int32, "params": torch.int32, "salient_idx": torch.int32, "salient": torch.float16}
        out = {key: torch.empty(sizes[key], dtype=dtype, pin_memory=True) for key, dtype in dtypes.items()}
    else:
        dtypes = {"codes": np.uint32, "params": np.uint32, "salient_idx": np.int32, "salient": np.float16}
        out = {key: np.empty(sizes[key], dtype=dtype) for key, dtype in dtypes.items()}
    _core.tile_delta_into(*arrays, bits, group_size, cols, out["codes"], out["params"], out["salient_idx"],
                          out["salient"], name)
    return {**out, "rows": rows, "cols": cols, "bits": bits, "group_size": group_size or cols, "name": name}


def to_device(delta: Any, device: Any = "cuda", *, bits: int | None = None, group_size: int | None = None,
              name: str | None = None) -> DeviceDelta:
    """Repack ``delta`` into the tile layout (pinned host memory) and copy it to ``device`` asynchronously.

    The copy is ordered on torch's current stream of ``device``; torch keeps the pinned
    staging alive until the copy is done.

    Raises
    ------
    RuntimeError
        This meswitch has no CUDA kernels, or torch sees no CUDA device.
    ValueError
        A shape the kernels do not take, or malformed pieces (the message names them).
    """
    require_cuda_build("the target device")
    torch = _torch()
    target = torch.device(device)
    host = tile_on_host(delta, bits=bits, group_size=group_size, name=name, pinned=True)
    moved = {key: host[key].to(target, non_blocking=True) for key in ("codes", "params", "salient_idx", "salient")}
    return DeviceDelta(**moved, rows=host["rows"], cols=host["cols"], bits=host["bits"], group_size=host["group_size"],
                       name=host["name"])


@dataclass(frozen=True)
class SegmentTable:
    """Which tokens of a batch each expert owns, built on the device (``include/meswitch/cuda/segments.hpp``).

    A token's expert id ``-1`` means no delta (base only); an id ``>= experts`` that only the
    device saw makes the token's output rows NaN (ids given on the host are checked there).
    """

    order: Any   # int32 [max(tokens, 1)]
    items: Any   # int32 [capacity, 4]
    tokens: int
    experts: int


def build_segments(expert_ids: Any, experts: int, *, device: Any = None) -> SegmentTable:
    """The segment table of a batch from its per-token expert ids.

    Parameters
    ----------
    expert_ids
        One id per token, in any order: a torch CUDA tensor (int32 or int64; nothing comes
        back to the host), or a host sequence / array (checked, then copied to ``device``).
    experts
        Experts of the batch, 1..1024; ``-1`` marks a token without a delta.
    device
        Where the table goes, for host ids (default: the current CUDA device).

    Raises
    ------
    ValueError
        A host id outside ``[-1, experts)``, or a batch too large for one table.
    """
    require_cuda_build("the segment table")
    torch = _torch()
    if is_cuda_tensor(expert_ids):
        ids = expert_ids.to(torch.int32).contiguous().reshape(-1)
    else:
        host = np.asarray(expert_ids, dtype=np.int64).reshape(-1)
        bad = host[(host < -1) | (host >= experts)]
        if bad.size:
            raise ValueError(f"expert id {int(bad[0])} is outside [-1, {experts}) (-1: no delta)")
        ids = torch.from_numpy(host.astype(np.int32)).to(torch.device("cuda") if device is None else torch.device(device))
    tokens = int(ids.numel())
    capacity = _core.segment_capacity(tokens, experts)
    order = torch.empty(max(tokens, 1), dtype=torch.int32, device=ids.device)
    items = torch.empty((capacity, 4), dtype=torch.int32, device=ids.device)
    with torch.cuda.device(ids.device):
        _core.cuda_build_segments(ids, experts, order, items, _stream(ids.device))
    return SegmentTable(order, items, tokens, experts)


def segments_from_starts(segment_starts: Sequence[int], *, device: Any = None) -> SegmentTable:
    """The table of tokens sorted by expert, as the CPU kernels take them (``E + 1`` offsets)."""
    starts = np.asarray(segment_starts, dtype=np.int64).reshape(-1)
    if starts.size < 2 or starts[0] != 0 or np.any(np.diff(starts) < 0):
        raise ValueError(f"segment_starts must be E + 1 >= 2 non-decreasing offsets from 0, got {starts.tolist()}")
    ids = np.repeat(np.arange(starts.size - 1), np.diff(starts))
    return build_segments(ids, int(starts.size - 1), device=device)


def _check_experts(x: Any, experts: Sequence[DeviceDelta | None]) -> DeviceDelta:
    present = [e for e in experts if e is not None]
    for index, expert in enumerate(experts):
        if expert is not None and not isinstance(expert, DeviceDelta):
            raise TypeError(f"x is on {x.device}: experts[{index}] must be a meswitch.cuda.DeviceDelta "
                            f"(meswitch.cuda.to_device(pieces)), got {type(expert).__name__}")
    if not present:
        raise ValueError("no expert has a delta")
    return present[0]


def multi_delta_matmul(x: Any, experts: Sequence[DeviceDelta | None], segments: SegmentTable | Sequence[int],
                       out: Any = None) -> Any:
    """Add each token's expert delta, ``out[t] += x[t] @ delta_e^T``, in one launch.

    Parameters
    ----------
    x
        Activations ``[tokens, cols]``, a torch CUDA tensor of float16 or bfloat16 with
        contiguous rows.
    experts
        One :class:`DeviceDelta` per expert id of the table (``None``: that expert has no
        delta for this linear, its tokens get none here). All share rows and cols.
    segments
        A :class:`SegmentTable` of this batch, or ``E + 1`` host offsets of tokens sorted by
        expert (as :func:`meswitch.ops.multi_delta_matmul` takes them on the CPU).
    out
        ``[tokens, rows]`` float32, float16 or bfloat16 on the same device, accumulated in
        place; ``None`` allocates float32 zeros.

    Returns
    -------
    The same object as ``out`` (or the new tensor).

    Raises
    ------
    ValueError
        Wrong dtype, shape, alignment or device of an argument (the message names it).
    RuntimeError
        A CUDA call failed (the message names it and the runtime's error).
    """
    require_cuda_build("x")
    torch = _torch()
    first = _check_experts(x, experts)
    if not isinstance(segments, SegmentTable):
        segments = segments_from_starts(segments, device=x.device)
    if out is None:
        out = torch.zeros((x.shape[0], first.rows), dtype=torch.float32, device=x.device)
    arguments = [None if e is None else e.kernel_argument() for e in experts]
    with torch.cuda.device(x.device):
        _core.cuda_multi_delta_matmul(x, arguments, segments.order, segments.items, out, _stream(x.device))
    return out


def delta_matmul(x: Any, delta: DeviceDelta, out: Any = None) -> Any:
    """``out += x @ delta^T`` for every token of ``x`` (see :func:`multi_delta_matmul`)."""
    require_cuda_build("x")
    torch = _torch()
    _check_experts(x, [delta])
    ids = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
    return multi_delta_matmul(x, [delta], build_segments(ids, 1), out)


def dequantize(delta: DeviceDelta, activation: Any = None) -> Any:
    """The dense float32 delta ``[rows, cols]`` on its device, by the kernel's own arithmetic.

    ``activation`` (torch.float16 or torch.bfloat16, default float16) is the 16-bit type the
    code - zero subtraction runs in; the result is the same for both, bit for bit, and equals
    the CPU reference dequantization.
    """
    require_cuda_build("the delta")
    torch = _torch()
    kind = "BF16" if activation == torch.bfloat16 else "F16"
    out = torch.empty((delta.rows, delta.cols), dtype=torch.float32, device=delta.device)
    with torch.cuda.device(delta.device):
        _core.cuda_dequantize_delta(delta.kernel_argument(), kind, out, _stream(delta.device))
    return out
