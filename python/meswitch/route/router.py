"""Route queries to experts with a trained router directory (``router.json`` + weights).

The decision is made in C++ (``include/meswitch/router.hpp``); this module loads routers,
turns chat requests into the text that is routed, and converts results to Python objects.

Chat requests (OpenAI message lists) are routed on their **user turns**, joined by newlines
in order. System prompts are left out because a deployment sends the same one with every
request, and assistant turns are the models' own words, not the user's need. When the user
turns exceed the featurizer's input limit, the most recent ones are kept: the current
request decides, earlier ones add context while they fit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Query = str | bytes | Sequence[Mapping[str, Any]] | Mapping[str, Any]


def default_router_dir() -> Path:
    """Return the bundled router, trained on the tiny family's domain training data."""
    return Path(__file__).resolve().parents[1] / "family" / "router"


@dataclass(frozen=True)
class RouteResult:
    """Where one query goes.

    Attributes
    ----------
    expert
        The chosen expert's name, or the router's fallback (``"base"`` by default).
    confidence
        The classifier's probability of its most probable expert; 0 for a query with no features.
    fallback
        True when ``expert`` is the fallback (confidence below the threshold, or no features).
    label
        The most probable expert even when it fell back; None for a query with no features.
    probabilities
        Probability of each expert, in the router's label order.
    """

    expert: str
    confidence: float
    fallback: bool
    label: str | None
    probabilities: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Return the result as plain JSON-ready data."""
        return {"expert": self.expert, "confidence": self.confidence, "fallback": self.fallback,
                "label": self.label, "probabilities": dict(self.probabilities)}


def _message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    raise ValueError(f"message content must be a string or a list of content parts, not {type(content).__name__}")


def query_text(query: Query, max_input_bytes: int = 16384) -> str | bytes:
    """Return the text a query is routed on.

    Parameters
    ----------
    query
        A string (or bytes), an OpenAI message list ``[{"role": ..., "content": ...}, ...]``, or a
        request body with a ``"messages"`` list.
    max_input_bytes
        The featurizer's input limit; chat turns beyond it are dropped oldest first.

    Returns
    -------
    str or bytes
        Strings and bytes unchanged; for chat requests the user turns joined by newlines
        (see the module docstring).

    Raises
    ------
    TypeError
        ``query`` is none of these.
    ValueError
        A malformed message list.
    """
    if isinstance(query, (str, bytes)):
        return query
    if isinstance(query, Mapping):
        if "messages" not in query:
            raise ValueError("a chat request needs a 'messages' list")
        query = query["messages"]
    if not isinstance(query, Sequence):
        raise TypeError(f"a query is a string or a list of chat messages, not {type(query).__name__}")
    turns = []
    for index, message in enumerate(query):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"chat message {index} is not an object with a string 'role'")  # noqa: TRY004 - bad data, not a bad call
        if message["role"] == "user":
            turns.append(_message_text(message.get("content")))
    kept: list[str] = []
    used = 0
    for turn in reversed(turns):
        size = len(turn.encode("utf-8", "surrogatepass")) + (1 if kept else 0)
        if kept and used + size > max_input_bytes:
            break
        kept.append(turn)
        used += size
    return "\n".join(reversed(kept))


class Router:
    """A trained router, loaded from its directory.

    Parameters
    ----------
    path
        A router directory (or its ``router.json``); None for the bundled default.
    experts
        The names of the experts being served; a router whose labels (or named fallback) are
        not all among them is refused with an error naming the missing ones. ``"base"`` is
        always served.

    Raises
    ------
    meswitch.FormatError
        The router files are missing, malformed or do not match ``experts``.

    Notes
    -----
    Routing is thread-safe and releases the GIL.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, experts: Iterable[str] | None = None) -> None:
        from meswitch import _core

        self.path = Path(path) if path is not None else default_router_dir()
        self._router = _core.Router.load(str(self.path), None if experts is None else list(experts))
        self.labels: list[str] = list(self._router.labels)
        self.fallback: str = self._router.fallback
        self.threshold: float = float(self._router.threshold)
        self.featurizer: dict[str, int] = dict(self._router.featurizer)

    @property
    def training(self) -> dict[str, Any]:
        """The training summary stored with the router."""
        return json.loads(self._router.training_json)

    @property
    def metrics(self) -> dict[str, Any]:
        """The held-out metrics stored with the router."""
        return json.loads(self._router.metrics_json)

    def missing_experts(self, served: Iterable[str]) -> list[str]:
        """Return the labels (and a named fallback) not among ``served``."""
        return list(self._router.missing_experts(list(served)))

    def _result(self, result: Any) -> RouteResult:
        return RouteResult(
            expert=result.expert, confidence=float(result.confidence), fallback=bool(result.fallback),
            label=self.labels[result.label] if result.label >= 0 else None,
            probabilities={label: float(p) for label, p in zip(self.labels, result.probabilities)},
        )

    def route(self, query: Query) -> RouteResult:
        """Route one query: a string, or a chat message list / request routed on its user turns."""
        return self._result(self._router.route(query_text(query, self.featurizer["max_input_bytes"])))

    def route_batch(self, queries: Iterable[Query]) -> list[RouteResult]:
        """Route many queries in one call into C++."""
        limit = self.featurizer["max_input_bytes"]
        return [self._result(r) for r in self._router.route_batch([query_text(q, limit) for q in queries])]

    def __repr__(self) -> str:
        return f"Router({str(self.path)!r}, labels={self.labels}, fallback={self.fallback!r})"


__all__ = ["Query", "RouteResult", "Router", "default_router_dir", "query_text"]
