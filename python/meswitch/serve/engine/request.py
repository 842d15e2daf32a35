"""One request: its state inside the engine, the events it streams, and the caller's handle.

The engine loop alone changes a :class:`Request` (nano-vllm's ``Sequence``): the tokens so
far, how many of them the KV cache holds, the sampler's generator, the text stream. The
caller sees a :class:`RequestHandle`, which the loop feeds :class:`RequestEvent` s through a
lock-guarded buffer; a thread reads them with :meth:`RequestHandle.events`, an asyncio task
with :meth:`RequestHandle.aevents` (woken with ``call_soon_threadsafe``, so no thread waits
per request on the asyncio side).
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from meswitch.serve.engine.detokenizer import IncrementalDetokenizer, StopStrings
from meswitch.serve.engine.sampling import SamplingParams
from meswitch.serve.engine.tokenizer import SharedTokenizer

#: Why a request ended: one of its stop tokens (EOS, end of turn) or a stop string, max_tokens
#: (or the KV pool could not hold it any longer), its cancel(), a failure of its own, the
#: engine's close().
FINISH_REASONS = ("stop", "length", "cancelled", "error", "abort")


@dataclass(frozen=True)
class RequestEvent:
    """What one request made since its previous event.

    Attributes
    ----------
    text
        New text (held back while it could still begin a stop string; never a broken
        UTF-8 character). May be empty while a character or a stop string is incomplete.
    token_ids
        The new tokens (a stop token, EOS or end of turn, that ended the request is not included).
    finish_reason
        ``None`` while running, then one of ``"stop"``, ``"length"``, ``"cancelled"``,
        ``"error"``, ``"abort"`` (the last event).
    error
        The message when ``finish_reason`` is ``"error"``.
    time
        ``time.monotonic()`` when the event was made (TTFT, inter-token latency).
    prompt_tokens, completion_tokens
        Tokens of the prompt; tokens sampled so far (an ending EOS included).
    """

    text: str
    token_ids: list[int]
    finish_reason: str | None
    error: str | None
    time: float
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class RequestResult:
    """A finished request: all its text and tokens, why it ended, and its token usage."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    error: str | None
    usage: dict[str, int]


class RequestHandle:
    """The caller's side of one request: its events, its result, its cancellation.

    Events are consumed once, by one reader: :meth:`events` and :meth:`aevents` each
    resume where the previous reading stopped. :meth:`result` does not consume them.

    Attributes
    ----------
    request_id
        The request's id.
    expert
        Its expert (``None``: the base).
    prompt_tokens
        Tokens of its prompt.
    """

    def __init__(self, request_id: str, expert: str | None, prompt_tokens: int,
                 cancel: Callable[[], None]) -> None:
        self.request_id = request_id
        self.expert = expert
        self.prompt_tokens = prompt_tokens
        self._cancel = cancel
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._buffer: deque[RequestEvent] = deque()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self._last: RequestEvent | None = None
        self._finished = threading.Event()

    # -- the engine's side -----------------------------------------------------------------

    def _push(self, event: RequestEvent) -> None:
        with self._lock:
            self._buffer.append(event)
            self._text.append(event.text)
            self._token_ids.extend(event.token_ids)
            self._last = event
            waiters, self._async_waiters = self._async_waiters, []
            if event.finish_reason is not None:
                self._finished.set()
            self._arrived.notify_all()
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:  # that event loop is closed: nobody waits there any more
                pass

    # -- the caller's side -----------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Whether the last event has been made."""
        return self._finished.is_set()

    def events(self, timeout: float | None = None) -> Iterator[RequestEvent]:
        """The request's events as they come, up to and including the last one (blocking; nothing
        more once the last one has been read).

        Parameters
        ----------
        timeout
            Seconds to wait for each event (``None``: no limit).

        Raises
        ------
        TimeoutError
            No event came within ``timeout``.
        """
        while True:
            with self._lock:
                if not self._buffer and self._finished.is_set():
                    return  # the last event was read before
                if not self._buffer and not self._arrived.wait_for(lambda: self._buffer, timeout):
                    raise TimeoutError(f"request {self.request_id}: no event within {timeout} s")
                event = self._buffer.popleft()
            yield event
            if event.finish_reason is not None:
                return

    async def aevents(self) -> AsyncIterator[RequestEvent]:
        """The request's events from an asyncio task (any event loop), up to the last one."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if not self._buffer and self._finished.is_set():
                    return  # the last event was read before
                event = self._buffer.popleft() if self._buffer else None
                if event is None:
                    future = loop.create_future()
                    self._async_waiters.append((loop, future))
            if event is None:
                await future
                continue
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> RequestResult:
        """Wait for the end and return everything the request made.

        Raises
        ------
        TimeoutError
            The request did not finish within ``timeout`` seconds.
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        with self._lock:
            last = self._last  # the finishing event: set before _finished
            text, token_ids = "".join(self._text), list(self._token_ids)
        usage = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                 "total_tokens": last.prompt_tokens + last.completion_tokens}
        return RequestResult(self.request_id, text, token_ids, last.finish_reason, last.error, usage)

    def cancel(self) -> None:
        """End the request (thread-safe, idempotent): its KV blocks are freed at the engine's
        next step and its last event has ``finish_reason`` ``"cancelled"``. No effect once finished."""
        if not self._finished.is_set():
            self._cancel()

    def __repr__(self) -> str:
        state = self._last.finish_reason if self._last is not None and self._last.finish_reason else "running"
        return f"RequestHandle({self.request_id!r}, expert={self.expert!r}, {state})"


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and to be recomputed
    RUNNING = "running"  # admitted: its expert held, its tokens (partly) in the KV cache
    FINISHED = "finished"


class Request:
    """One request's state, owned by the engine loop.

    ``tokens`` is the prompt followed by the tokens generated so far; the first
    ``num_computed`` of them are in the KV cache. A step feeds the next chunk of the rest;
    when the cache then holds them all, the last position's logits give the next token.
    Preemption frees the cache and sets ``num_computed`` to 0: the request is recomputed
    from its tokens, and its generator and text stream carry on where they were.
    """

    def __init__(self, request_id: str, sequence: int, expert: str | None, prompt: list[int],
                 params: SamplingParams, tokenizer: SharedTokenizer, handle: RequestHandle,
                 claim: Any = None) -> None:
        self.request_id = request_id
        self.sequence = sequence  # the KV cache's key for this request (ids may repeat)
        self.expert = expert
        self.params = params
        self.prompt_tokens = len(prompt)
        self.tokens = list(prompt)
        self.largest_prompt_token = max(prompt)
        self.num_computed = 0
        self.completion_tokens = 0  # sampled, an ending EOS included
        self.status = RequestStatus.WAITING
        # EOS and the chat template's end of turn end the request unless it ignores them
        self.stop_token_ids: frozenset[int] = frozenset() if params.ignore_eos else tokenizer.stop_token_ids
        self.generator: torch.Generator | None = params.generator()
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop_strings = StopStrings(params.stop) if params.stop else None
        self.hidden_tokens: dict[int, str] = tokenizer.hidden_tokens  # matched by stop strings, never shown
        self.handle = handle
        self.error: str | None = None  # why the admission gate refused it
        # The store's claim on the expert, from submission to the end (a removal is refused
        # meanwhile), and its hold while running (the expert stays resident); None for the base.
        self.claim = claim
        self.hold: Any = None

    def release_claim(self) -> None:
        """End the claim (idempotent, thread-safe: a cancel ends it at once)."""
        if self.claim is not None:
            self.claim.release()

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def chunk(self, size: int) -> list[int]:
        """The next ``size`` tokens the cache does not hold yet."""
        return self.tokens[self.num_computed:self.num_computed + size]

    def event(self, text: str, token_ids: list[int], finish_reason: str | None = None,
              error: str | None = None) -> None:
        """Stream an event to the handle."""
        self.handle._push(RequestEvent(text, token_ids, finish_reason, error, time.monotonic(),
                                       self.prompt_tokens, self.completion_tokens))
