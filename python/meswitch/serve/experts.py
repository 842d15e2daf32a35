"""Where the serving model gets its experts, and each expert's tensors made ready to apply.

The model asks an *expert source* for an opened :class:`~meswitch.artifact.ExpertArtifact`
by name. A source is either a mapping (name -> artifact or artifact directory) or an
object with ``acquire(name)`` -- an expert store that loads, holds and evicts experts --
and optionally ``release(name)``, called once the forward that used the expert is done.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from meswitch.artifact import ExpertArtifact, load_artifact
from meswitch.checkpoint import open_checkpoint
from meswitch.naming import tensor_role


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

    def release(self, name: str) -> None:
        """Let go of the latest hold on ``name`` (a store's handle, or the store's ``release(name)``)."""
        handles = self._handles.get(name)
        handle = handles.pop() if handles else None
        if handle is not None and hasattr(handle, "release"):
            handle.release()
        elif hasattr(self.source, "release"):
            self.source.release(name)


def _float32(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32))


@dataclass
class ExpertWeights:
    """What one expert changes in the base, in the forms the model applies them.

    ``deltas`` are the compressed linears, applied by the fused kernel from the artifact's
    shards (``artifact`` ``None``: prepared tensors kept without a loaded artifact, see
    :meth:`bound_to`); ``whole`` the tensors stored whole (norms, biases, or a linear the
    compressor kept dense); ``embedding`` the expert's table with its extra rows, dequantized
    once (a lookup is no GEMM to fuse); ``extra_rows`` the output rows past the base's,
    keyed by weight name (the expanded vocabulary of ``lm_head``).
    """

    artifact: ExpertArtifact | None
    deltas: dict[str, tuple[ExpertArtifact | None, str]] = field(default_factory=dict)
    whole: dict[str, torch.Tensor] = field(default_factory=dict)
    extra_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    embedding: torch.Tensor | None = None
    record_serial: int = 0  # of the artifact these were prepared from (ExpertArtifact.record_serial)

    def bound_to(self, artifact: ExpertArtifact | None) -> ExpertWeights:
        """The same tensors with the deltas read from ``artifact``: the same files loaded again
        (an expert store's reload), or ``None`` to hold no reference to any loaded artifact."""
        return replace(self, artifact=artifact, deltas={name: (artifact, name) for name in self.deltas})

    @classmethod
    def prepare(cls, artifact: ExpertArtifact, base_dir: str | os.PathLike[str], *,
                check_base: bool = True) -> ExpertWeights:
        """Check ``artifact`` against the base and gather its tensors (raises ``meswitch.FormatError``)."""
        if check_base:
            artifact.check_base(base_dir)
        prepared = cls(artifact, record_serial=artifact.record_serial)
        for name, entry in artifact.tensors.items():
            kind, role = entry["kind"], tensor_role(name)
            if kind == "same":
                continue
            if role == "embedding":
                if kind == "full":
                    prepared.embedding = _float32(artifact.stored(f"{name}.full")).reshape(entry["shape"])
                else:
                    # base + delta in float32 (not rounded back to the stored dtype), then the extra rows
                    rows = [open_checkpoint(base_dir).get_array(name, widen=True) + artifact.delta(name)]
                    if entry["extra_rows"]:
                        rows.append(artifact.stored(f"{name}.extra_rows").astype(np.float32))
                    prepared.embedding = _float32(np.concatenate(rows, axis=0))
            elif kind == "full":
                prepared.whole[name] = _float32(artifact.stored(f"{name}.full")).reshape(entry["shape"])
            else:
                prepared.deltas[name] = (artifact, name)
                if entry["extra_rows"]:
                    prepared.extra_rows[name] = _float32(artifact.stored(f"{name}.extra_rows"))
        return prepared
