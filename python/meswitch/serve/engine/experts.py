"""Where the serving model gets its experts, and each expert's tensors ready to apply.

The model asks an *expert source* for an opened :class:`~meswitch.artifact.ExpertArtifact`
by name. A source is either a mapping (name -> artifact or artifact directory) or an
object with ``acquire(name)`` -- an expert store that loads, holds and evicts experts --
and optionally ``release(name)``, called once the forward that used the expert is done. A
forward takes one batch lease over all its experts (:meth:`ExpertSourceAdapter.lease`): a
store with ``acquire_batch`` holds them all or none, in one call, and hands out each
expert's tensors as it gathered them on loading (``include/meswitch/expert_tensors.hpp``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from meswitch import _core
from meswitch.artifact import ExpertArtifact, load_artifact


class ExpertSourceAdapter:
    """One way to acquire and release experts, whatever the source given to the model."""

    def __init__(self, source: Any, base_dir: str | os.PathLike[str]) -> None:
        if not (isinstance(source, Mapping) or hasattr(source, "acquire")):
            raise TypeError(f"experts must be a mapping name -> artifact or an object with acquire(name), "
                            f"got {type(source).__name__}")
        self.source = source
        self.base_dir = base_dir
        # A mapping's experts, opened, checked against the base and gathered once each.
        # Guarded by the lock: the engine thread and the expert loader thread both open.
        self._opened: dict[str, tuple[ExpertArtifact, Any]] = {}
        self._opened_lock = threading.Lock()
        self._handles: dict[str, list[Any]] = {}  # a store's handles, held until released

    @property
    def is_store(self) -> bool:
        """A store checks each expert against the base when it is added."""
        return hasattr(self.source, "acquire")

    def acquire(self, name: str) -> ExpertArtifact:
        """The opened artifact of ``name``; held until :meth:`release` for a store."""
        if self.is_store:
            handle = self.source.acquire(name)
            self._handles.setdefault(name, []).append(handle)
            return getattr(handle, "artifact", handle)
        return self._open(name)[0]

    def _open(self, name: str) -> tuple[ExpertArtifact, Any]:
        """A mapping's expert: its artifact and its ``_core.ExpertTensors``, checked against the base once."""
        if name not in self.source:
            known = ", ".join(sorted(map(str, self.source))) or "none"
            raise KeyError(f"unknown expert {name!r}; known experts: {known}")
        with self._opened_lock:
            opened = self._opened.get(name)
        if opened is None:
            value = self.source[name]
            artifact = value if isinstance(value, ExpertArtifact) else load_artifact(os.fspath(value))
            artifact.check_base(self.base_dir)
            opened = (artifact, _core.ExpertTensors(artifact._core))
            with self._opened_lock:
                opened = self._opened.setdefault(name, opened)
        return opened

    def lease(self, names: list[str]) -> Any:
        """One hold on each of ``names`` for one forward: ``lease[name]`` is the expert's artifact,
        ``lease.release()`` lets go of them all. A store's ``acquire_batch`` when it has one (all
        or none); otherwise one :meth:`acquire` each, released together."""
        if self.is_store and hasattr(self.source, "acquire_batch"):
            return self.source.acquire_batch(names)
        return _Holds(self, names)

    def release(self, name: str) -> None:
        """Let go of the latest hold on ``name`` (a store's handle, or the store's ``release(name)``)."""
        handles = self._handles.get(name)
        handle = handles.pop() if handles else None
        if handle is not None and hasattr(handle, "release"):
            handle.release()
        elif hasattr(self.source, "release"):
            self.source.release(name)


class _Holds:
    """A lease made of one :meth:`ExpertSourceAdapter.acquire` per expert (mappings, other stores)."""

    def __init__(self, adapter: ExpertSourceAdapter, names: list[str]) -> None:
        self._adapter = adapter
        self._artifacts: dict[str, ExpertArtifact] = {}
        try:
            for name in dict.fromkeys(names):
                self._artifacts[name] = adapter.acquire(name)
        except BaseException:
            self.release()
            raise

    def __getitem__(self, name: str) -> ExpertArtifact:
        return self._artifacts[name]

    def tensors(self, name: str) -> Any:
        """The ``_core.ExpertTensors`` of ``name``: a mapping's as gathered once, another store's now."""
        if not self._adapter.is_store:
            return self._adapter._open(name)[1]
        return _core.ExpertTensors(self._artifacts[name]._core)

    def release(self) -> None:
        while self._artifacts:
            self._adapter.release(self._artifacts.popitem()[0])


class _Widened(Mapping):
    """Named tensors of an expert (whole tensors, extra rows), widened to float32 on first use."""

    def __init__(self, names: list[str], read: Callable[[str], np.ndarray], device: torch.device) -> None:
        self._names = frozenset(names)
        self._read = read
        self._device = device
        self._done: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        tensor = self._done.get(name)
        if tensor is None:
            tensor = self._done[name] = torch.from_numpy(self._read(name)).to(self._device)
        return tensor

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names))

    def __len__(self) -> int:
        return len(self._names)


class ExpertWeights:
    """What one expert changes in the base, for one forward, over the tensors its lease handed out.

    A thin face over ``meswitch._core.ExpertTensors`` (``include/meswitch/expert_tensors.hpp``),
    which gathered them when the expert was loaded and holds the rules: ``deltas`` are the
    compressed matrices (linears, ``lm_head`` and the embedding) as ``(artifact, weight)``
    pairs for the fused kernels, read from the artifact's buffers; ``whole`` the tensors
    stored whole (norms, biases, or a matrix the compressor kept dense) and ``extra_rows`` the
    rows past the base's (an expanded vocabulary), each widened to float32 when first used in
    this forward; :meth:`rows` and :meth:`lookup` (an embedding lookup) are the C++ rules.
    Nothing here holds a dense copy of a compressed matrix, and nothing outlives the forward's
    lease.
    """

    def __init__(self, tensors: Any, artifact: ExpertArtifact, device: str | torch.device = "cpu") -> None:
        self.tensors = tensors
        self.artifact = artifact
        self.device = torch.device(device)
        self.deltas: dict[str, tuple[ExpertArtifact, str]] = {name: (artifact, name) for name in tensors.delta_names()}
        self.whole = _Widened(tensors.whole_names(), tensors.whole, self.device)
        self.extra_rows = _Widened(tensors.extra_row_names(), tensors.extra_rows, self.device)

    def rows(self, name: str, base_rows: int) -> int:
        """Rows of matrix ``name`` in this expert (the base's ``base_rows``, or its own whole tensor's, plus extra)."""
        return self.tensors.rows(name, base_rows)

    def lookup(self, name: str, base_table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of this expert's matrix ``name`` (an embedding), float32 ``[len(ids), cols]``.

        Raises
        ------
        ValueError
            An id outside this expert's rows.
        """
        wanted = ids.cpu().numpy()
        if base_table.device.type == "cpu":
            rows = self.tensors.lookup(name, base_table.contiguous(), wanted)
        else:  # the base's rows gathered where the table lives, the rule applied on the host
            clamped = ids.clamp(0, base_table.shape[0] - 1)
            rows = self.tensors.lookup_gathered(name, base_table.shape[0], base_table[clamped].cpu(), wanted)
        return torch.from_numpy(rows).to(base_table.device)
