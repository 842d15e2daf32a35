"""The device tier: experts' compressed deltas in GPU memory, within a byte budget.

Above the host tier (the expert store's resident buffers, or any opened artifact): when a
forward on a GPU needs an expert, its deltas are repacked on the host into the tile layout
the CUDA kernel reads (``include/meswitch/cuda/tile_layout.hpp``), straight into pinned
(page-locked) buffers, and copied to the device asynchronously on the tier's own copy stream;
the forward's stream waits for the copy with an event, not the host. Experts stay resident
until the budget needs their bytes: the least recently used expert nobody holds goes first.
An expert that does not fit because everything resident is held is refused
(:class:`meswitch.TierFull`, naming the holders), never waited for (a forward holding one expert
while loading another would wait forever): the host tier's rule, written once in C++
(``include/meswitch/eviction.hpp``) and called here.

A delta whose shape the kernel does not take (rows or columns not a multiple of 64, a group
size that is not a multiple of 16) is kept dequantized instead, a dense float32 matrix that
the model multiplies with cuBLAS: correct for any model, four bytes a weight, so meant for small
models whose odd widths the kernel leaves out (real ones have multiples of 64 throughout).

A byte here is a byte of what the device allocation holds: the four tiled arrays of every delta
of the expert (codes, scales and zero points, salient indices and values), or the dense matrix.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from meswitch import _core, cuda

__all__ = ["DeviceTier"]

@dataclass
class _Resident:
    deltas: dict[str, cuda.DeviceDelta | torch.Tensor]
    source: Any  # what the deltas were made from (the artifact's core): a reload is a new source
    nbytes: int
    ready: Any   # CUDA event recorded after the upload
    holders: int = 0


class DeviceTier:
    """Tiled deltas of experts on one CUDA device within ``budget_bytes``.

    Parameters
    ----------
    device
        The CUDA device (``"cuda"``, ``"cuda:1"``, a ``torch.device``).
    budget_bytes
        Device bytes for resident experts' tiled deltas.

    Raises
    ------
    RuntimeError
        This meswitch has no CUDA kernels, or ``device`` is not a CUDA device.
    ValueError
        ``budget_bytes`` is not positive.
    """

    def __init__(self, device: Any = "cuda", budget_bytes: int = 8 << 30) -> None:
        cuda.require_cuda_build("the device tier")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise RuntimeError(f"the device tier needs a CUDA device, got {self.device}")
        if int(budget_bytes) <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # least recently used first
        self._copy_stream = torch.cuda.Stream(device=self.device)
        self.hits = self.uploads = self.evictions = 0

    @property
    def used_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._resident.values())

    def acquire(self, name: str, artifact: Any, weights: list[str]) -> dict[str, cuda.DeviceDelta | torch.Tensor]:
        """The device deltas of ``weights`` of expert ``name``, uploaded first if needed, held until :meth:`release`.

        Each is a :class:`meswitch.cuda.DeviceDelta`, or a dense float32 ``torch.Tensor`` for a
        shape the kernel does not take.

        ``artifact`` is the expert's opened :class:`~meswitch.artifact.ExpertArtifact` (a store's
        resident one, read from its host buffers). The current stream of the device waits for
        the upload, so the deltas are usable by the next kernel enqueued on it.

        Raises
        ------
        meswitch.TierFull
            The expert's deltas do not fit beside the held ones (now: a later try may fit).
        RuntimeError
            The expert's deltas are larger than the whole budget.
        """
        source = getattr(artifact, "_core", artifact)
        entry = self._resident.get(name)
        if entry is not None and entry.source is not source:  # the host tier reloaded it: stale
            if entry.holders:
                raise RuntimeError(f"expert {name!r} was reloaded by its source while held on {self.device}")
            self._drop(name)
            entry = None
        if entry is None:
            entry = self._upload(name, artifact, source, weights)
        else:
            self.hits += 1
            self._resident.move_to_end(name)
        torch.cuda.current_stream(self.device).wait_event(entry.ready)
        entry.holders += 1
        return entry.deltas

    def release(self, name: str) -> None:
        """Let go of one hold of ``name`` (it may be evicted once nobody holds it)."""
        entry = self._resident.get(name)
        if entry is None or entry.holders == 0:
            raise RuntimeError(f"expert {name!r} is not held on {self.device}")
        entry.holders -= 1

    def evict(self, name: str) -> None:
        """Drop ``name`` from the device now; refused (``RuntimeError``) while it is held."""
        entry = self._resident.get(name)
        if entry is not None and entry.holders:
            raise RuntimeError(f"expert {name!r} is held on {self.device} ({entry.holders} holders)")
        self._drop(name)

    def memory_report(self) -> dict[str, Any]:
        """``used_bytes``, ``budget_bytes``, ``entries``, counters ``hits``, ``uploads``, ``evictions``,
        and per expert ``name``, ``bytes``, ``holders`` (least recently used first)."""
        return {"device": str(self.device), "used_bytes": self.used_bytes, "budget_bytes": self.budget_bytes,
                "entries": len(self._resident), "hits": self.hits, "uploads": self.uploads,
                "evictions": self.evictions,
                "experts": [{"name": name, "bytes": entry.nbytes, "holders": entry.holders}
                            for name, entry in self._resident.items()]}

    # -- internals ------------------------------------------------------------------------

    def _upload(self, name: str, artifact: Any, source: Any, weights: list[str]) -> _Resident:
        tiled, dense = {}, {}
        for weight in weights:
            try:
                tiled[weight] = cuda.tile_on_host((artifact, weight), pinned=True)
            except ValueError as error:
                if "the CUDA kernels need" not in str(error):
                    raise
                dense[weight] = torch.from_numpy(artifact.delta(weight)).pin_memory()
        nbytes = sum(int(host[key].numel()) * host[key].element_size()
                     for host in tiled.values() for key in ("codes", "params", "salient_idx", "salient"))
        nbytes += sum(int(t.numel()) * t.element_size() for t in dense.values())
        self._make_room(name, nbytes)
        # The copy stream waits for work already queued on the compute stream (whatever wrote
        # memory it may reuse), then the copies run beside the compute stream.
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        deltas = {}
        with torch.cuda.stream(self._copy_stream):
            for weight, host in tiled.items():
                moved = {key: host[key].to(self.device, non_blocking=True)
                         for key in ("codes", "params", "salient_idx", "salient")}
                deltas[weight] = cuda.DeviceDelta(**moved, rows=host["rows"], cols=host["cols"], bits=host["bits"],
                                                  group_size=host["group_size"], name=host["name"])
            for weight, matrix in dense.items():
                deltas[weight] = matrix.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        # Memory allocated on the copy stream is used on the compute stream: tell the allocator.
        compute = torch.cuda.current_stream(self.device)
        for delta in deltas.values():
            tensors = [delta] if isinstance(delta, torch.Tensor) else [delta.codes, delta.params, delta.salient_idx,
                                                                       delta.salient]
            for tensor in tensors:
                tensor.record_stream(compute)
        entry = _Resident(deltas, source, nbytes, ready)
        self._resident[name] = entry
        self.uploads += 1
        return entry

    def _make_room(self, name: str, nbytes: int) -> None:
        """Evict by the rule of every tier (``include/meswitch/eviction.hpp``), least recently used first."""
        residents = [(other, entry.nbytes, "held" if entry.holders else "") for other, entry in self._resident.items()]
        victims = _core.choose_evictions(str(self.device), name, nbytes, self.used_bytes, self.budget_bytes, residents)
        for index in victims:
            self._drop(residents[index][0])
            self.evictions += 1

    def _drop(self, name: str) -> None:
        self._resident.pop(name, None)
