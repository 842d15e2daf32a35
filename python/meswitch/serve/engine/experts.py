"""Where the serving model gets its experts, and each expert's tensors made ready to apply.

The model asks an *expert source* for an opened :class:`~meswitch.artifact.ExpertArtifact`
by name. A source is either a mapping (name -> artifact or artifact directory) or an
object with ``acquire(name)`` -- an expert store that loads, holds and evicts experts --
and optionally ``release(name)``, called once the forward that used the expert is done. A
forward takes one batch lease over all its experts (:meth:`ExpertSourceAdapter.lease`): a
store with ``acquire_batch`` holds them all or none, in one call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from meswitch.artifact import ExpertArtifact, load_artifact
from meswitch.ops import delta_rows


class ExpertSourceAdapter:
    """One way to acquire and release experts, whatever the source given to the model."""

    def __init__(self, source: Any) -> None:
        if not (isinstance(source, Mapping) or hasattr(source, "acquire")):
            raise TypeError(f"experts must be a mapping name -> artifact or an object with acquire(name), "
                            f"got {type(source).__name__}")
        self.source = source
        self._opened: dict[str, ExpertArtifact] = {}
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
        if name not in self.source:
            known = ", ".join(sorted(map(str, self.source))) or "none"
            raise KeyError(f"unknown expert {name!r}; known experts: {known}")
        if name not in self._opened:
            value = self.source[name]
            self._opened[name] = value if isinstance(value, ExpertArtifact) else load_artifact(os.fspath(value))
        return self._opened[name]

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

    def release(self) -> None:
        while self._artifacts:
            self._adapter.release(self._artifacts.popitem()[0])


def _float32(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32))


@dataclass
class ExpertWeights:
    """What one expert changes in the base, in the forms the model applies them.

    ``deltas`` are the compressed matrices (linears, ``lm_head`` and the embedding), applied
    from the artifact's mapped shards (``artifact`` ``None``: prepared tensors kept without a
    loaded artifact, see :meth:`bound_to`): by the fused kernel as products, and for an embedding
    lookup by dequantizing only the rows looked up; ``whole`` the tensors stored whole
    (norms, biases, or a matrix the compressor kept dense); ``extra_rows`` the rows past the
    base's (an expanded vocabulary of the embedding and ``lm_head``), keyed by weight name.
    Nothing here holds a dense copy of a compressed matrix, so an expert's host memory is
    its store entry plus these small tensors.
    """

    artifact: ExpertArtifact | None
    deltas: dict[str, tuple[ExpertArtifact | None, str]] = field(default_factory=dict)
    whole: dict[str, torch.Tensor] = field(default_factory=dict)
    extra_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    record_serial: int = 0  # of the artifact these were prepared from (ExpertArtifact.record_serial)

    def bound_to(self, artifact: ExpertArtifact | None) -> ExpertWeights:
        """The same tensors with the deltas read from ``artifact``: the same files loaded again
        (an expert store's reload), or ``None`` to hold no reference to any loaded artifact."""
        return replace(self, artifact=artifact, deltas={name: (artifact, name) for name in self.deltas})

    @classmethod
    def prepare(cls, artifact: ExpertArtifact, base_dir: str | os.PathLike[str], *,
                check_base: bool = True, device: str | torch.device = "cpu") -> ExpertWeights:
        """Check ``artifact`` against the base and gather its tensors (raises ``meswitch.FormatError``).

        The whole tensors and extra rows go to ``device``; the deltas stay references into the
        artifact (on a GPU, the device tier uploads them).
        """
        prepared = cls._gather(artifact, base_dir, check_base)
        if torch.device(device).type != "cpu":
            prepared.whole = {name: t.to(device) for name, t in prepared.whole.items()}
            prepared.extra_rows = {name: t.to(device) for name, t in prepared.extra_rows.items()}
        return prepared

    @classmethod
    def _gather(cls, artifact: ExpertArtifact, base_dir: str | os.PathLike[str], check_base: bool) -> ExpertWeights:
        if check_base:
            artifact.check_base(base_dir)
        prepared = cls(artifact, record_serial=artifact.record_serial)
        for name, entry in artifact.tensors.items():
            kind = entry["kind"]
            if kind == "full":
                prepared.whole[name] = _float32(artifact.stored(f"{name}.full")).reshape(entry["shape"])
            elif kind == "delta":
                prepared.deltas[name] = (artifact, name)
                if entry.get("extra_rows"):
                    prepared.extra_rows[name] = _float32(artifact.stored(f"{name}.extra_rows"))
        return prepared

    def rows(self, name: str, base_rows: int) -> int:
        """Rows of matrix ``name`` in this expert (the base's ``base_rows``, or its own whole tensor's, plus extra)."""
        if name in self.whole:
            return self.whole[name].shape[0]
        extra = self.extra_rows.get(name)
        return base_rows + (0 if extra is None else extra.shape[0])

    def lookup(self, name: str, base_table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of this expert's matrix ``name`` (an embedding), float32 ``[len(ids), cols]``.

        Raises
        ------
        ValueError
            An id outside this expert's rows.
        """
        count = self.rows(name, base_table.shape[0])
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= count):
            bad = int(ids[(ids < 0) | (ids >= count)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary of {self.artifact.name} ({count} tokens)")
        if name in self.whole:
            return self.whole[name][ids]
        out = torch.empty((ids.shape[0], base_table.shape[1]), dtype=torch.float32, device=base_table.device)
        own = ids < base_table.shape[0]
        shared = ids[own]
        out[own] = base_table[shared].float()  # a 16-bit base table, widened
        if name in self.deltas and shared.numel():
            # base + delta in float32, not rounded back to the stored dtype (as the linears do)
            rows = delta_rows((self.artifact, name), shared.cpu().numpy())
            out[own] += torch.from_numpy(rows).to(base_table.device)
        if not bool(own.all()):
            out[~own] = self.extra_rows[name][ids[~own] - base_table.shape[0]]
        return out
