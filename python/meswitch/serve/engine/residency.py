"""Which experts the engine can run now: held while in use, loaded off the loop thread.

A sequence's forward needs its expert resident in the store. Each running request *holds*
its expert (a :class:`~meswitch.store.expert_store.HeldExpert` of its own, ``request.hold``)
from its admission until it ends or is preempted: the store's hold count is the one count
of who runs an expert, and a store evicts only experts nobody holds, so an expert never
leaves memory between the steps of a request that still uses it, while an expert no running
request uses is free to make room for another. Nothing here counts requests.

A waiting request whose expert was loaded before and is resident now is admitted at once
(``store.acquire_if_resident``: no load, no wait). Otherwise it is passed over while a
loader thread asks the store to prefetch the expert (the store's background load), waits
for that load, takes a hold and prepares the model's tensors of the expert; the loop thread
keeps stepping the running requests meanwhile. A load ends one of three ways:

- ready: its hold is kept as the expert's *spare* hold until a waiting request of the expert
  is admitted and takes it (so the expert is not evicted before its requests run), or
  released when no request waits for it any more;
- failed (an altered artifact, an expert larger than the budget, one removed from the
  store): the engine ends that expert's waiting requests with the error;
- no room (everything resident is held or pinned, by this engine or others): tried
  again after a hold is released or a short while, and meanwhile no request of another
  expert is admitted past it, so the holds drain and the expert gets its turn.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from meswitch._core import TierFull
from meswitch.artifact import ExpertArtifact
from meswitch.serve.engine.model_runner import MultiExpertModel
from meswitch.serve.engine.request import Request
from meswitch.serve.engine.scheduler import Admission

LOGGER = logging.getLogger(__name__)
#: Seconds before an expert that found no room tries again, when no hold was released meanwhile.
RETRY_SECONDS = 0.25


class ExpertResidency:
    """Holds for the engine's running requests, and a loader thread for the experts not resident.

    Parameters
    ----------
    model
        The multi-expert model (its tensors of each expert are prepared on loading).
    store
        The model's expert store, or ``None`` when the model's experts are a mapping
        (always available; only their first preparation runs on the loader thread).
    wake
        Called (from the loader thread) when a load ended, to wake the engine loop.

    Only the engine loop calls the methods that change holds (:meth:`gate`,
    :meth:`admitted`, :meth:`left`, :meth:`poll`, :meth:`release_spares`).
    """

    def __init__(self, model: MultiExpertModel, store: Any | None, wake: Callable[[], None]) -> None:
        self.model = model
        self.store = store
        self._wake = wake
        self._spare: dict[str, Any] = {}  # expert -> a hold no request has taken yet
        self._vocab: dict[str, int] = {}  # expert -> logits rows, from its first load
        self._pending: set[str] = set()  # handed to the loader, not back yet
        self._no_room: dict[str, tuple[int, float]] = {}  # expert -> (releases then, retry time)
        self._releases = 0  # holds released so far: a chance of room for those without
        self._results: deque[tuple[str, str, Any]] = deque()
        self._jobs: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._loader: threading.Thread | None = None
        self._closed = False

    # -- any thread ------------------------------------------------------------------------

    def known(self, expert: str) -> bool:
        """Whether the model's expert source has ``expert``."""
        return expert in self.names()

    def names(self) -> list[str]:
        if self.store is not None:
            return self.store.names()
        return sorted(self.model.experts.source)

    def directory(self, expert: str) -> Path:
        """The artifact directory of ``expert`` (its tokenizer is under ``expert/``), read without loading it."""
        if self.store is not None:
            for entry in self.store.memory_report()["experts"]:
                if entry["name"] == expert:
                    return Path(entry["directory"])
            raise KeyError(expert)
        value = self.model.experts.source[expert]
        return value.path if isinstance(value, ExpertArtifact) else Path(os.fspath(value))

    def vocab_size(self, expert: str) -> int | None:
        """Rows of ``expert``'s logits once it has been loaded, else ``None``."""
        return self._vocab.get(expert)

    # -- the engine loop ---------------------------------------------------------------------

    def gate(self, expert: str | None) -> Admission:
        """Whether a request of ``expert`` may be admitted now; starts its load when needed.

        READY means a hold is waiting for the request (its expert's spare hold, taken here
        from the store when the expert is resident): :meth:`admitted` hands it over.
        """
        if expert is None or expert in self._spare:
            return Admission.READY
        if expert in self._vocab:  # loaded and prepared before: resident still?
            if self.store is None:  # a mapping's expert: always there
                return Admission.READY
            try:
                held = self.store.acquire_if_resident(expert)
            except RuntimeError:  # removed meanwhile: the loader reports why
                held = None
            if held is not None:
                self._spare[expert] = held
                return Admission.READY
        no_room = self._no_room.get(expert)
        if expert in self._pending:
            return Admission.WAIT if no_room is None else Admission.BLOCKED
        if no_room is not None and no_room[0] == self._releases and time.monotonic() < no_room[1]:
            return Admission.BLOCKED
        self._pending.add(expert)
        self._jobs.put(expert)
        if self._loader is None:
            self._loader = threading.Thread(target=self._load_forever, name="meswitch-expert-loader", daemon=True)
            self._loader.start()
        return Admission.WAIT if no_room is None else Admission.BLOCKED

    def admitted(self, request: Request) -> None:
        """``request`` (:meth:`gate` said ready) starts running: it takes its expert's hold.

        The first request of a step takes the spare hold; the next ones of the same expert
        take holds of their own (resident: the first one holds it).
        """
        expert = request.expert
        if expert is None or self.store is None:
            return
        held = self._spare.pop(expert, None)
        request.hold = held if held is not None else self.store.acquire_if_resident(expert)

    def left(self, request: Request) -> None:
        """``request`` ended or was preempted: its hold ends."""
        held, request.hold = request.hold, None
        if held is not None:
            held.release()
            self._releases += 1

    def release_spares(self, wanted: Iterable[str | None]) -> None:
        """Release the spare holds of experts no request in ``wanted`` waits for."""
        wanted = set(wanted)
        for expert in [name for name in self._spare if name not in wanted]:
            self._spare.pop(expert).release()
            self._releases += 1

    @property
    def has_spares(self) -> bool:
        return bool(self._spare)

    def poll(self) -> list[tuple[str, str]]:
        """Take the loads that ended; return ``(expert, message)`` for each that failed."""
        failures = []
        while self._results:
            outcome, expert, value = self._results.popleft()
            self._pending.discard(expert)
            if outcome == "ready":
                held, vocab = value
                self._no_room.pop(expert, None)
                self._vocab[expert] = vocab
                if held is None:  # a mapping's expert: nothing to hold
                    continue
                if self._closed or expert in self._spare:
                    held.release()
                else:
                    self._spare[expert] = held
            elif outcome == "no room":
                self._no_room[expert] = (self._releases, time.monotonic() + RETRY_SECONDS)
            else:
                self._no_room.pop(expert, None)
                failures.append((expert, value))
        return failures

    def close(self, timeout: float) -> None:
        """Stop the loader (waiting at most ``timeout`` s for a load in flight) and release the
        spare holds (the engine ends its requests, and their holds, first)."""
        self._closed = True
        self._jobs.put(None)
        if self._loader is not None:
            self._loader.join(timeout)
        self.poll()
        self.release_spares(())

    # -- the loader thread -----------------------------------------------------------------

    def _load_forever(self) -> None:
        while (expert := self._jobs.get()) is not None:
            if self._closed:
                continue
            try:
                self._results.append(self._load(expert))
            except BaseException as error:
                LOGGER.exception("loading expert %r", expert)
                self._results.append(("failed", expert, f"expert {expert!r} failed to load: {error}"))
            self._wake()

    def _load(self, expert: str) -> tuple[str, str, Any]:
        held = None
        try:
            if self.store is not None:
                self.store.prefetch(expert)  # raises at once when the expert can never fit
                self.store.wait(expert)  # raises the load's error
                held = self.store.acquire(expert)  # resident now (or loads itself if the prefetch found no room)
            self.model.expert_weights(expert)
            return "ready", expert, (held, self.model.vocab_size(expert))
        except TierFull as error:  # no room beside what is held now (host or device tier): try again later
            if held is not None:
                held.release()
            return "no room", expert, str(error)
        except Exception as error:  # noqa: BLE001 - any other failure ends the expert's waiting requests
            if held is not None:
                held.release()
            return "failed", expert, f"expert {expert!r} failed to load: {error}"
