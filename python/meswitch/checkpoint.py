"""Zero-copy access to safetensors checkpoints (single file, directory or sharded).

A :class:`Checkpoint` maps files instead of reading them: tensors come back as
read-only NumPy views of the mapping, or through DLPack so that
``torch.from_dlpack`` shares the same memory. Shards are mapped, and their whole
header validated, the first time one of their tensors is asked for.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from meswitch import _core

#: NumPy dtype of each safetensors dtype meswitch handles; BF16 uses ml_dtypes.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I32": np.dtype(np.int32),
    "U8": np.dtype(np.uint8),
    "U32": np.dtype(np.uint32),
}
_SAFETENSORS_DTYPES = {dtype: name for name, dtype in NUMPY_DTYPES.items()}


class DLPackTensor:
    """One checkpoint tensor exposed through the DLPack protocol (CPU, read-only by contract).

    The mapping is private copy-on-write: a consumer that writes into the tensor
    changes only its own pages, never the file.
    """

    def __init__(self, checkpoint: _core.SafetensorsCheckpoint, name: str) -> None:
        self._checkpoint = checkpoint
        self._name = name

    def __dlpack__(self, *, stream: Any = None, max_version: Any = None, dl_device: Any = None,
                   copy: bool | None = None) -> Any:
        if copy:
            raise BufferError("meswitch DLPack export shares memory; copy=True is not supported")
        return self._checkpoint.dlpack(self._name)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU, device 0


class Checkpoint(Mapping):
    """A safetensors checkpoint opened lazily.

    Parameters
    ----------
    path
        A ``.safetensors`` file, a ``model.safetensors.index.json`` file, or a
        directory holding either.

    Raises
    ------
    meswitch.FormatError
        If a header, the index or a shard is malformed or missing; the message
        names the file and the tensor.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._core = _core.SafetensorsCheckpoint.open(self.path)
        self._names = self._core.names()

    # Mapping protocol: names -> NumPy arrays (views, no copy).
    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self:
            raise KeyError(name)
        return self.get_array(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._core.contains(name)

    def keys(self) -> list[str]:  # type: ignore[override]
        return list(self._names)

    @property
    def shard_paths(self) -> list[str]:
        """Every file of the checkpoint (one entry when it is not sharded)."""
        return list(self._core.shard_paths)

    @property
    def index_metadata(self) -> dict[str, str]:
        """The ``metadata`` object of a sharded index (empty for a single file)."""
        return dict(self._core.index_metadata)

    def metadata(self, name: str | None = None) -> dict[str, str]:
        """``__metadata__`` of the file holding ``name`` (the first tensor's file by default)."""
        if name is None:
            if not self._names:
                return {}
            name = self._names[0]
        return dict(self._core.file_metadata(name))

    def info(self, name: str) -> dict[str, Any]:
        """``{"dtype", "shape", "nbytes", "file"}`` of one tensor, without reading it."""
        return dict(self._core.info(name))

    def get_array(self, name: str, *, widen: bool = False) -> np.ndarray:
        """The tensor as a NumPy array.

        Parameters
        ----------
        name
            Tensor name.
        widen
            If true, 16-bit floats are returned as a new float32 array. Otherwise
            the result is a read-only view of the mapping (no copy); BF16 tensors
            come back with the ``ml_dtypes.bfloat16`` dtype.
        """
        array = self._core.array(name)
        if self._core.info(name)["dtype"] == "BF16":
            array = array.view(ml_dtypes.bfloat16)
        if widen and array.dtype in (np.float16, ml_dtypes.bfloat16):
            return array.astype(np.float32)
        return array

    def release(self, name: str, offset: int = 0, size: int | None = None) -> None:
        """Drop the pages of ``name`` (or of its bytes ``[offset, offset + size)``) from memory.

        For streaming over checkpoints larger than memory. Views of the tensor stay
        valid: touching them reads the pages back from the file.
        """
        if size is None:
            self._core.release(name, offset)
        else:
            self._core.release(name, offset, size)

    def get_dlpack(self, name: str) -> DLPackTensor:
        """An object for ``torch.from_dlpack`` (or any DLPack consumer) sharing the mapping."""
        if name not in self:
            raise KeyError(name)
        return DLPackTensor(self._core, name)

    def get_torch(self, name: str) -> Any:
        """The tensor as a ``torch.Tensor`` sharing the mapping (requires torch)."""
        import torch

        return torch.from_dlpack(self.get_dlpack(name))

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, tensors={len(self)}, shards={len(self.shard_paths)})"


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a safetensors checkpoint; see :class:`Checkpoint`."""
    return Checkpoint(path)


def _to_numpy(name: str, tensor: Any) -> np.ndarray:
    if hasattr(tensor, "detach") and hasattr(tensor, "cpu"):  # torch.Tensor, without importing torch
        import torch

        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()
    array = np.asarray(tensor)
    if array.dtype not in _SAFETENSORS_DTYPES:
        raise TypeError(f"tensor '{name}': dtype {array.dtype} is not one of {sorted(NUMPY_DTYPES)}")
    return array


def save_file(tensors: Mapping[str, Any], path: str | os.PathLike[str],
              metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors to one safetensors file atomically (temporary file, then rename).

    Parameters
    ----------
    tensors
        Name -> NumPy array or torch tensor (F32, F16, BF16, I32, U8, U32).
    path
        Destination file; replaced only once the new file is complete.
    metadata
        Optional ``__metadata__`` string map.
    """
    entries = []
    for name, tensor in tensors.items():
        array = np.ascontiguousarray(_to_numpy(name, tensor))
        entries.append((name, _SAFETENSORS_DTYPES[array.dtype], list(array.shape), array.reshape(-1).view(np.uint8)))
    _core.write_safetensors(os.fspath(path), entries, dict(metadata or {}))
