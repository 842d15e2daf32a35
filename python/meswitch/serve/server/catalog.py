"""The models the server offers, and which one answers a request.

The models are every expert in the store, ``base`` (the base model alone) and, with a
router, ``auto``: the router picks the expert from the request's text (chat requests on
their user turns), and a query under the router's threshold goes to its fallback. An
expert the router picks that is no longer served (removed at run time) is replaced by the
fallback as well; experts added at run time are served by name, and ``auto`` reaches them
only through a router trained with them.

Experts come and go at run time through :meth:`ModelCatalog.add` and
:meth:`ModelCatalog.remove`. A request holds its expert with :meth:`ModelCatalog.use`
from before it is submitted until its last token; removing an expert that a request
holds is refused (409) rather than waited for, so a DELETE never hangs behind a long
generation and never pulls an expert from under one.

The catalog's lock guards only its own bookkeeping (holds, names changing, when each
expert was added) and is never held while the store works: an add opens and checks the
artifact (reads its manifest and shard headers, compares it with the base) and a removal
frees an expert's memory, and requests for other experts go on meanwhile. A name being
added or removed is reserved under the lock first, so two adds of one name, or an add and
a removal, never run at once: the second is refused with 409 at once.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meswitch.arguments import one_line
from meswitch.serve.server.errors import APIError
from meswitch.serve.server.metrics import BASE

#: The model name that asks the router.
AUTO = "auto"
#: Names an expert cannot have: they mean something else here.
RESERVED = (AUTO, BASE)
#: Seconds a removal waits for the engine to let go of an expert no request uses any more.
REMOVE_DRAIN_SECONDS = 10.0


@dataclass(frozen=True)
class Choice:
    """Who answers one request.

    Attributes
    ----------
    model
        The name the response reports (``model`` field, ``x-meswitch-expert`` header).
    expert
        The engine's expert: the name, or ``None`` for the base.
    route
        The router's result when the request asked for ``auto``.
    """

    model: str
    expert: str | None
    route: Any = None


class ModelCatalog:
    """The served models over an :class:`~meswitch.store.expert_store.ExpertStore` and an optional router.

    Parameters
    ----------
    store
        The expert store the engine serves from.
    router
        A :class:`~meswitch.route.router.Router` for ``auto``, or None (no ``auto``).
    """

    def __init__(self, store: Any, router: Any = None) -> None:
        self.store = store
        self.router = router
        self._lock = threading.Lock()
        self._changing: dict[str, str] = {}  # name -> "added" or "removed": the store is at work on it
        self.started = int(time.time())
        self._added: dict[str, int] = {name: self.started for name in store.names()}
        for name in store.names():
            check_expert_name(name)

    # -- what is served ---------------------------------------------------------------------

    def experts(self) -> list[str]:
        """The experts served, sorted: those of the store, less any whose removal was accepted."""
        with self._lock:
            return [name for name in self.store.names() if self._changing.get(name) != "removed"]

    def models(self) -> list[tuple[str, int]]:
        """``(model id, created)`` of every model offered: the experts, then ``auto`` and ``base``."""
        listed = [(name, self._added.get(name, self.started)) for name in self.experts()]
        if self.router is not None:
            listed.append((AUTO, self.started))
        return [*listed, (BASE, self.started)]

    def choose(self, model: str, query: Any = None) -> Choice:
        """Who answers a request for ``model``; ``query`` is what ``auto`` routes on.

        Raises
        ------
        APIError
            404 for a model that is not served (``auto`` without a router included).
        """
        if model == BASE:
            return Choice(BASE, None)
        if model == AUTO and self.router is not None:
            return self._route(query)
        if model in self.experts():
            return Choice(model, model)
        offered = ", ".join(name for name, _ in self.models())
        hint = " (no router is loaded: start the server with --router DIR)" if model == AUTO else ""
        raise APIError(404, f"the model '{model}' does not exist{hint}; served: {offered}", param="model",
                       code="model_not_found")

    def _route(self, query: Any) -> Choice:
        try:
            routed = self.router.route(query)
        except (TypeError, ValueError) as error:
            raise APIError(400, f"model 'auto': the request cannot be routed: {error}", param="model") from None
        name = routed.expert
        if name != BASE and name not in self.experts():
            name = self.router.fallback  # routed to an expert removed at run time
        if name == BASE:
            return Choice(BASE, None, routed)
        if name not in self.experts():
            raise APIError(503, f"model 'auto': the router's fallback '{name}' is not served", param="model",
                           code="model_not_found")
        return Choice(name, name, routed)

    # -- changing experts ------------------------------------------------------------------------

    def add(self, path: str | os.PathLike[str]) -> str:
        """Serve the ``NAME.meswitch`` artifact at ``path``; returns its name.

        Blocking (the store reads and checks the artifact): call it off the event loop.
        Requests for other experts are served meanwhile.

        Raises
        ------
        APIError
            400 for a path that is no artifact, a malformed one, one compressed against
            another base, or a reserved name; 409 for a name already served or being
            added or removed.
        """
        from meswitch import _core

        directory = Path(path)
        name = manifest_name(directory)
        try:
            check_expert_name(name)
        except ValueError as error:
            raise APIError(400, f"path: {directory}: {error}", param="path", code="invalid_expert") from None
        with self._changes(name, "added"):
            if name is not None and name in self.store.names():
                raise APIError(409, f"an expert named '{name}' is already served; DELETE /v1/experts/{name} first",
                               param="path", code="expert_exists")
            try:
                added = self.store.add(directory)
            except (FileNotFoundError, NotADirectoryError, _core.FormatError, ValueError) as error:
                raise APIError(400, f"path: {one_line(error)}", param="path", code="invalid_expert") from None
            except RuntimeError as error:  # the store's "already has an expert of that name"
                raise APIError(409, f"path: {one_line(error)}", param="path", code="expert_exists") from None
            with self._lock:
                self._added[added] = int(time.time())
        return added

    @contextmanager
    def _changes(self, name: str | None, change: str) -> Iterator[None]:
        """Reserve ``name`` while the store adds or removes it (409 while another change of it runs).

        ``None`` (an artifact whose manifest names nobody) reserves nothing: the store refuses it.
        """
        if name is None:
            yield
            return
        with self._lock:
            if name in self._changing:
                raise APIError(409, f"expert '{name}' is being {self._changing[name]} by another request; "
                                    "retry when that has finished", param="path" if change == "added" else None,
                               code="expert_changing")
            self._changing[name] = change
        try:
            yield
        finally:
            with self._lock:
                del self._changing[name]

    def remove(self, name: str) -> None:
        """Stop serving ``name``.

        Blocking (the store frees the expert's memory): call it off the event loop. The
        store decides: requests that claim the expert (accepted, not ended) make it refuse
        at once, naming how many; a request that just ended (a client that closed its
        stream, say) may leave the engine holding the expert until its next step, and the
        store drains that hold, waiting up to :data:`REMOVE_DRAIN_SECONDS`, so the removal
        succeeds without the client retrying. While it drains, new requests get 404.

        Raises
        ------
        APIError
            404 for an expert not served, 400 for ``base`` or ``auto``, 409 while requests
            use it (naming how many), when a hold outlasts the drain or the store is still
            loading it, or while it is being added or removed.
        """
        if name in RESERVED:
            raise APIError(400, f"'{name}' is not an expert and cannot be removed", code="invalid_expert")
        with self._changes(name, "removed"):
            if name not in self.store.names():
                raise APIError(404, f"the model '{name}' does not exist; served experts: "
                                    f"{', '.join(self.store.names()) or 'none'}", code="model_not_found")
            try:
                self.store.remove(name, drain=REMOVE_DRAIN_SECONDS)
            except RuntimeError as error:  # requests claim it, a hold outlasts the drain, or a load is in flight
                raise APIError(409, f"expert '{name}' is in use: {one_line(error)}; retry shortly",
                               code="expert_in_use") from None
            with self._lock:
                self._added.pop(name, None)


def check_expert_name(name: str | None) -> None:
    """Refuse (``ValueError``) an expert named like another model (``auto``, ``base``)."""
    if name in RESERVED:
        raise ValueError(f"an expert may not be named '{name}' ({' and '.join(RESERVED)} name other models); "
                         "compress it with another --name")


def manifest_name(directory: Path) -> str | None:
    """The expert name in ``directory``'s manifest, or None when the store is left to explain the problem."""
    try:
        name = json.loads((directory / "manifest.json").read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


__all__ = ["AUTO", "RESERVED", "Choice", "ModelCatalog", "check_expert_name", "manifest_name"]
