"""The expert store: experts of one base within a host-memory byte budget.

A thin face over ``meswitch._core.ExpertStore`` (``include/meswitch/store.hpp``, whose
header explains the tiers, what a byte is, eviction, holding and prefetch). Every call
that loads or waits releases the GIL, so a serving loop can prefetch on one thread and
run batches on another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from meswitch.arguments import parse_size
from meswitch.artifact import ExpertArtifact
from meswitch.inputs import read_model_config

__all__ = ["BatchLease", "ExpertClaim", "ExpertStore", "HeldExpert"]


class HeldExpert:
    """An expert held resident by the store until :meth:`release` (or the end of a ``with``).

    While held it is never evicted. ``artifact`` reads the store's resident buffers; arrays
    taken from it must not be used after the release (the expert may then be evicted).

    Attributes
    ----------
    name
        The expert's name.
    artifact
        The loaded :class:`meswitch.artifact.ExpertArtifact`; ``(held.artifact, weight)``
        is what :func:`meswitch.ops.multi_delta_matmul` takes for each expert.
    """

    def __init__(self, handle: Any, manifest: dict[str, Any] | None = None) -> None:
        self._handle = handle
        self.name: str = handle.name
        self.artifact = ExpertArtifact.from_core(handle.artifact, manifest)

    def release(self) -> None:
        """Let the store evict this expert again (idempotent)."""
        self._handle.release()

    def __enter__(self) -> ExpertArtifact:
        return self.artifact

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self._handle else "released"
        return f"HeldExpert({self.name!r}, {state})"


class ExpertClaim:
    """One request's use of an expert, from its acceptance until :meth:`release` (or the end of a ``with``).

    While any claim lives the expert cannot be removed; a claim holds no memory (the expert
    may be evicted and loaded again meanwhile). Thread-safe.
    """

    def __init__(self, claim: Any, name: str) -> None:
        self._claim = claim
        self.name = name

    def release(self) -> None:
        """End the claim (idempotent)."""
        self._claim.release()

    def __enter__(self) -> ExpertClaim:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"ExpertClaim({self.name!r}, {'claimed' if self._claim else 'released'})"


class BatchLease:
    """Holds on every expert of one batch, taken together, until :meth:`release` (or the end of a ``with``).

    ``lease[name]`` is the expert's loaded :class:`meswitch.artifact.ExpertArtifact`; arrays
    taken from it must not be used after the release.
    """

    def __init__(self, lease: Any, manifests: dict[str, dict[str, Any]]) -> None:
        self._lease = lease
        self._artifacts = {name: ExpertArtifact.from_core(lease.artifact(name), manifests[name])
                           for name in lease.names()}

    def __getitem__(self, name: str) -> ExpertArtifact:
        try:
            return self._artifacts[name]
        except KeyError:
            raise KeyError(f"this batch lease holds no expert named {name!r} (it holds "
                           f"{', '.join(self._artifacts) or 'none'})") from None

    def tensors(self, name: str) -> Any:
        """What ``name`` changes in the base, as the store gathered it on loading: a
        ``meswitch._core.ExpertTensors`` (``include/meswitch/expert_tensors.hpp``)."""
        self[name]  # the KeyError naming what this lease holds
        return self._lease.tensors(name)

    def names(self) -> list[str]:
        """The experts held, sorted."""
        return sorted(self._artifacts)

    def release(self) -> None:
        """Let go of every hold (idempotent)."""
        self._lease.release()

    def __enter__(self) -> BatchLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class ExpertStore:
    """Compressed experts of one base, loaded into host memory within a byte budget.

    Parameters
    ----------
    base
        The base model directory (its safetensors and ``config.json``); fingerprinted once
        here, and every added expert must have been compressed against it.
    host_budget
        Bytes of host memory for resident experts: an int or a size such as ``"8GB"`` or
        ``"512MiB"``. Resident plus loading experts never take more.

    Raises
    ------
    FileNotFoundError
        ``base`` has no ``config.json``.
    ValueError
        ``host_budget`` is not a positive size.

    Examples
    --------
    >>> store = ExpertStore("family/tiny/base", host_budget="64MB")  # doctest: +SKIP
    >>> store.add("math.meswitch")                                    # doctest: +SKIP
    'math'
    >>> with store.acquire("math") as artifact:                       # doctest: +SKIP
    ...     multi_delta_matmul(x, [(artifact, "model.layers.0.mlp.up_proj.weight")], [0, len(x)])
    """

    def __init__(self, base: str | os.PathLike[str], host_budget: int | str = "8GB") -> None:
        from meswitch import _core

        budget = parse_size(host_budget) if isinstance(host_budget, str) else int(host_budget)
        if budget <= 0:
            raise ValueError(f"host_budget must be a positive number of bytes, got {host_budget!r}")
        self.base = Path(base)
        config_text = read_model_config(self.base)[0]
        self._core = _core.ExpertStore(str(self.base), config_text, budget)
        # name -> (record serial, parsed manifest): a reload of unchanged files shares its
        # record, so the manifest is not serialised and parsed again on every acquire.
        self._manifests: dict[str, tuple[int, dict[str, Any]]] = {}

    @property
    def host_budget(self) -> int:
        """The host tier's budget in bytes."""
        return self._core.host_budget

    def add(self, artifact: str | os.PathLike[str]) -> str:
        """Add the ``NAME.meswitch`` artifact (on disk; nothing loaded) and return its name.

        Raises
        ------
        FileNotFoundError
            ``artifact`` has no ``manifest.json``.
        meswitch.FormatError
            A malformed artifact, or one compressed against another base (the message
            names the first differing tensor).
        RuntimeError
            The store already has an expert of that name.
        """
        path = Path(artifact)
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"{path}: no manifest.json (not a NAME.meswitch artifact)")
        return self._core.add(str(path))

    def remove(self, name: str, *, drain: float = 0.0) -> None:
        """Drop an expert from every tier.

        Parameters
        ----------
        name
            The expert.
        drain
            Seconds to wait for the batches that hold it: meanwhile it is draining (every
            new :meth:`claim` or :meth:`acquire` of it raises ``RuntimeError``) and it goes
            when the last hold ends. ``0`` refuses at once when it is held.

        Raises
        ------
        RuntimeError
            No such expert; requests claim it (refused at once, naming how many); or it is
            still held when ``drain`` runs out (the message says by how many), or is being
            loaded. It is then served again as before.
        """
        self._core.remove(name, drain)
        self._manifests.pop(name, None)

    def acquire(self, name: str) -> HeldExpert:
        """Hold the expert resident, loading it first (or waiting for its prefetch) if needed.

        Use as ``with store.acquire(name) as artifact: ...``, or keep the returned
        :class:`HeldExpert` across the steps of a batch and :meth:`HeldExpert.release` it.

        Raises
        ------
        meswitch.FormatError
            The load found the artifact altered (a checksum mismatch names the shard),
            also when that load was a :meth:`prefetch` in the background.
        meswitch.TierFull
            It does not fit now because everything resident is held, pinned or loading (the
            message says who); a later try, once a hold ends, may fit.
        RuntimeError
            No such expert, or the expert is larger than the whole host budget.
        """
        handle = self._core.acquire(name)
        return HeldExpert(handle, self._manifest(name, handle.artifact))

    def acquire_if_resident(self, name: str) -> HeldExpert | None:
        """Hold the expert as :meth:`acquire` does if it is resident now; ``None`` if it is not.

        Nothing is loaded or waited for: a scheduler asks this every step.

        Raises
        ------
        RuntimeError
            No such expert, or it is being removed.
        """
        handle = self._core.acquire_if_resident(name)
        return HeldExpert(handle, self._manifest(name, handle.artifact)) if handle else None

    def claim(self, name: str) -> ExpertClaim:
        """Claim the expert for one request until the claim is released (see :class:`ExpertClaim`).

        Raises
        ------
        RuntimeError
            No such expert, or it is being removed.
        """
        return ExpertClaim(self._core.claim(name), name)

    def _manifest(self, name: str, core_artifact: Any) -> dict[str, Any]:
        """The parsed manifest of ``name`` as loaded now, parsed once per record."""
        serial = core_artifact.record_serial
        cached = self._manifests.get(name)
        if cached is None or cached[0] != serial:
            cached = self._manifests[name] = (serial, json.loads(core_artifact.manifest_json()))
        return cached[1]

    def acquire_batch(self, names: list[str]) -> BatchLease:
        """Hold every expert of ``names`` (repeats count once) for one batch: all of them or none.

        Each is loaded or waited for as :meth:`acquire` does; when one cannot be had, the holds
        already taken are let go and its error raised (the same errors as :meth:`acquire`).
        """
        lease = self._core.acquire_batch(list(names))
        return BatchLease(lease, {name: self._manifest(name, lease.artifact(name)) for name in lease.names()})

    def prefetch(self, name: str) -> None:
        """Start loading the expert in the background and return at once.

        A failure reaches the next :meth:`acquire` or :meth:`wait`; a prefetch that finds
        no room when its turn comes is skipped (``prefetches_skipped`` in the report).
        """
        self._core.prefetch(name)

    def wait(self, name: str) -> None:
        """Wait for the expert's prefetch or load in flight and raise its error, if any."""
        self._core.wait(name)

    def pin(self, name: str) -> None:
        """Load the expert if needed and keep it resident until :meth:`unpin`."""
        self._core.pin(name)

    def unpin(self, name: str) -> None:
        """Let the store evict the expert again when nobody holds it."""
        self._core.unpin(name)

    def names(self) -> list[str]:
        """The experts added, sorted."""
        return list(self._core.names())

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __len__(self) -> int:
        return len(self.names())

    def tier(self, name: str) -> str:
        """Where the expert's bytes are now: ``"disk"``, ``"loading"`` or ``"host"`` (resident).

        A cheap query (no :meth:`memory_report` is built), for a scheduler that asks every
        step. Raises ``RuntimeError`` for an unknown name.
        """
        return self._core.tier(name)

    def memory_report(self) -> dict[str, Any]:
        """A consistent snapshot of the store.

        Returns
        -------
        dict
            ``tiers``: ``{"disk": ..., "host": ...}``, each with ``used_bytes`` (host:
            resident plus loading), ``budget_bytes`` (``0``: none), ``entries`` (experts
            resident there) and ``loading``; ``experts``: one dict per expert with
            ``name``, ``directory``, ``tier`` (``"disk"``, ``"loading"`` or ``"host"``),
            ``bytes``, ``holders`` (holds: running batches and requests), ``claims``
            (requests accepted and not ended), ``pinned``, ``loads`` and ``load_seconds`` (its completed
            loads), ``waited_acquires`` and ``wait_seconds`` (acquires that found it not
            resident, and what they waited for its load); counters ``hits``, ``misses``,
            ``evictions``, ``loads``, ``verified_loads`` (loads that hashed every shard:
            an expert's first, and any after its files changed), ``load_failures``,
            ``prefetches_skipped``, ``recycled_buffers`` (shard buffers loads took over
            from the experts they evicted instead of making new pages) and
            ``load_seconds`` (summed over loads).
        """
        return self._core.memory_report()
