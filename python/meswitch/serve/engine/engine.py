"""The serving engine: one loop thread stepping every request through batched forwards.

A step of the loop (nano-vllm's ``LLMEngine.step``):

1. take the requests submitted and the cancellations since the last step, and the
   expert loads that ended (:mod:`meswitch.serve.engine.residency`);
2. plan the forward (:mod:`meswitch.serve.engine.scheduler`): running requests continue, waiting
   ones join when their expert is held and the KV pool has their blocks, the newest
   running request is preempted when the pool runs out;
3. run one forward over every planned chunk, prefill and decode tokens together, each
   sequence with its own expert;
4. sample each sequence whose chunk reached its last token (:mod:`meswitch.serve.engine.sampling`),
   stream the new text (:mod:`meswitch.serve.engine.detokenizer`), end the requests that are done:
   their blocks return to the pool and their claim and hold on their expert end.

The per-step work outside the forward is proportional to the requests in the step, not
to their tokens. Whatever goes wrong for one request (its expert fails to load, its
sampling raises) ends that request with ``finish_reason`` ``"error"``; a forward that
raises is run again one sequence at a time, so only the sequence that causes it fails.
"""

from __future__ import annotations

import itertools
import logging
import operator
import threading
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from meswitch.serve.engine.model_runner import MultiExpertModel, SequenceInput
from meswitch.serve.engine.request import Request, RequestHandle, RequestStatus
from meswitch.serve.engine.residency import RETRY_SECONDS, ExpertResidency
from meswitch.serve.engine.sampling import SamplingParams, sample
from meswitch.serve.engine.scheduler import Admission, Scheduler, StepPlan
from meswitch.serve.engine.tokenizer import SharedTokenizer, load_tokenizer

LOGGER = logging.getLogger(__name__)


class EngineError(Exception):
    """A request the engine cannot take, or an engine that is closed."""


class PromptTooLong(EngineError, ValueError):
    """The prompt (with ``max_tokens``) exceeds the model's positions, or can never fit the KV pool."""


class ExpertUnavailable(EngineError, KeyError):
    """The model's expert source has no expert of that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Engine:
    """Continuous batching of requests for many experts of one base over one paged KV cache.

    Parameters
    ----------
    model
        The multi-expert model; its KV cache is the engine's pool (``model.cache``).
    store
        The model's expert store (``None``: taken from the model when its experts come
        from a store). Each request claims its expert in it from submission to its end, and
        holds it (resident) while running.
    max_running
        Sequences per forward at most.
    max_batch_tokens
        New tokens per forward at most; longer prefills are split over several steps.

    Raises
    ------
    ValueError
        A limit below 1, or a ``store`` that is not the model's expert source.

    Examples
    --------
    >>> with Engine(model) as engine:                                          # doctest: +SKIP
    ...     handle = engine.submit("math", "Tara has 12 shells.", SamplingParams(temperature=0))
    ...     for event in handle.events():
    ...         print(event.text, end="")
    """

    def __init__(self, model: MultiExpertModel, store: Any | None = None, *, max_running: int = 32,
                 max_batch_tokens: int = 2048) -> None:
        for name, value in (("max_running", max_running), ("max_batch_tokens", max_batch_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        source = model.experts.source if model.experts.is_store else None
        if store is not None and store is not source:
            raise ValueError("store: must be the expert store the model takes its experts from")
        self.model = model
        self.store = source
        self._wakeup = threading.Condition()
        self._signalled = False  # something arrived since the loop last looked
        self._inbox: deque[Request] = deque()
        self._cancels: deque[Request] = deque()
        self._live: dict[str, Request] = {}  # request id -> unfinished request
        self._sequences = itertools.count()
        self._residency = ExpertResidency(model, source, self._wake)
        self._scheduler = Scheduler(model.cache, model.free, self._gate, max_running=max_running,
                                    max_batch_tokens=max_batch_tokens)
        self._counters_lock = threading.Lock()
        self._finished_total = 0
        self._tokens_generated: dict[str | None, int] = {}
        self._prompt_tokens: dict[str | None, int] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._plan: StepPlan | None = None  # the step in progress, for the loop's last-resort handler

    # -- lifetime --------------------------------------------------------------------------

    def start(self) -> Engine:
        """Start the loop thread (idempotent)."""
        with self._wakeup:
            if self._closed:
                raise EngineError("the engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="meswitch-engine", daemon=True)
                self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop and end every unfinished request with ``finish_reason`` ``"abort"``.

        Waits at most ``timeout`` seconds for the step in progress (and a load in flight);
        idempotent.
        """
        with self._wakeup:
            if self._closed:
                return
            self._closed = True
            self._wakeup.notify_all()
        if self._thread is None:
            self._shutdown(timeout)
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            LOGGER.warning("the engine loop did not stop within %s s; it stops after its current step", timeout)

    def __enter__(self) -> Engine:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------------

    def tokenizer(self, expert: str | None) -> SharedTokenizer:
        """The tokenizer of ``expert`` (the base's for ``None``), read without loading the expert.

        Its first use reads files: call it (and :meth:`submit`) off an event loop.

        Raises
        ------
        ExpertUnavailable
            No such expert.
        EngineError
            Its artifact has no readable tokenizer (the message names the directory).
        """
        if expert is None:
            directory = self.model.base_dir
        else:
            self._check_known(expert)
            directory = self._residency.directory(expert) / "expert"
        try:
            return load_tokenizer(str(directory))
        except (OSError, ValueError) as error:
            raise EngineError(f"{'the base' if expert is None else repr(expert)}: no tokenizer can be read from "
                              f"{directory}: {error}") from error

    def _check_known(self, expert: str) -> None:
        if not self._residency.known(expert):
            known = ", ".join(self._residency.names()) or "none"
            raise ExpertUnavailable(f"unknown expert {expert!r}; known experts: {known}")

    def submit(self, expert: str | None, prompt: str | Sequence[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> RequestHandle:
        """Queue a request and return its handle; it runs once the loop admits it.

        Thread-safe. It tokenizes a text prompt, and reads the expert's tokenizer from disk
        on its first use, so an asyncio server calls it from a worker thread.

        Parameters
        ----------
        expert
            The expert's name, or ``None`` for the base alone.
        prompt
            Text (tokenized with that expert's tokenizer) or token ids.
        params
            How to sample (default :class:`SamplingParams` ()).
        request_id
            The request's id (a fresh one when ``None``); unique among unfinished requests.

        Raises
        ------
        ExpertUnavailable
            The model has no such expert.
        PromptTooLong
            The prompt plus ``max_tokens`` exceed the model's positions, or the prompt
            needs more KV blocks than the whole pool has (the message gives both numbers).
        ValueError
            An empty prompt, a token id out of range, a duplicate ``request_id``.
        EngineError
            The engine is closed.
        """
        if self._closed:
            raise EngineError("the engine is closed")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params: must be a SamplingParams, got {type(params).__name__}")
        tokenizer = self.tokenizer(expert)  # raises ExpertUnavailable for an unknown expert
        tokens = self._prompt_tokens_of(expert, prompt, tokenizer)
        self._check_fits(len(tokens), params)
        request_id = uuid.uuid4().hex if request_id is None else str(request_id)
        claim = self._claim(expert)
        try:
            with self._wakeup:
                if self._closed:
                    raise EngineError("the engine is closed")
                if request_id in self._live:
                    raise ValueError(f"request_id: {request_id!r} is already in flight")
                handle = RequestHandle(request_id, expert, len(tokens), cancel=lambda: self._cancel(request))
                request = Request(request_id, next(self._sequences), expert, tokens, params, tokenizer, handle, claim)
                self._live[request_id] = request
                self._inbox.append(request)
                self._signalled = True
                self._wakeup.notify_all()
        except BaseException:
            if claim is not None:
                claim.release()
            raise
        with self._counters_lock:
            self._prompt_tokens[expert] = self._prompt_tokens.get(expert, 0) + len(tokens)
        return handle

    def _claim(self, expert: str | None) -> Any:
        """The store's claim on ``expert`` for one request (``None`` for the base or a mapping's expert)."""
        if expert is None or self.store is None:
            return None
        try:
            return self.store.claim(expert)
        except RuntimeError as error:  # removed since the tokenizer was read, or being removed
            raise ExpertUnavailable(f"expert {expert!r} is not available: {error}") from None

    def _prompt_tokens_of(self, expert: str | None, prompt: str | Sequence[int],
                          tokenizer: SharedTokenizer) -> list[int]:
        if isinstance(prompt, str):
            tokens = tokenizer.encode(prompt)
            if not tokens:
                raise ValueError("prompt: the text encodes to no tokens")
            return tokens
        try:
            tokens = [operator.index(token) for token in prompt]
        except TypeError:
            raise ValueError("prompt: must be a string or a sequence of integer token ids") from None
        if not tokens:
            raise ValueError("prompt: empty")
        # An expert's vocabulary is known once it has been loaded; until then the admission checks it.
        vocab = self.model.config.vocab_size if expert is None else self._residency.vocab_size(expert)
        bad = next((token for token in tokens if token < 0 or (vocab is not None and token >= vocab)), None)
        if bad is not None:
            raise ValueError(f"prompt: token id {bad} is outside the vocabulary of "
                             f"{'the base' if expert is None else repr(expert)} ({vocab} tokens)")
        return tokens

    def _check_fits(self, prompt_tokens: int, params: SamplingParams) -> None:
        limit = self.model.config.max_position_embeddings
        if prompt_tokens + params.max_tokens > limit:
            raise PromptTooLong(f"the prompt's {prompt_tokens} tokens plus max_tokens {params.max_tokens} exceed the "
                                f"model's {limit} positions")
        cache = self.model.cache
        blocks = -(-prompt_tokens // cache.block_size)
        if blocks > cache.num_blocks:
            raise PromptTooLong(f"the prompt's {prompt_tokens} tokens need {blocks} KV blocks of "
                                f"{cache.block_size} tokens; the whole pool has {cache.num_blocks} "
                                f"({cache.num_blocks * cache.block_size} tokens)")

    def cancel(self, request_id: str) -> None:
        """Cancel the unfinished request ``request_id`` (no effect for an unknown or finished one)."""
        request = self._live.get(request_id)
        if request is not None:
            request.handle.cancel()

    def _cancel(self, request: Request) -> None:
        request.release_claim()  # at once: a removal of its expert need not wait for the next step
        with self._wakeup:
            self._cancels.append(request)
            self._signalled = True
            self._wakeup.notify_all()

    def stats(self) -> dict[str, Any]:
        """A snapshot: queue lengths, preemptions, KV blocks, finished requests, tokens per expert
        (keyed by expert name, ``None`` for the base)."""
        cache = self.model.cache
        with self._counters_lock:
            return {"waiting": len(self._scheduler.waiting) + len(self._inbox),
                    "running": len(self._scheduler.running),
                    "preempted_total": self._scheduler.preempted_total,
                    "kv_blocks_total": cache.num_blocks,
                    "kv_blocks_free": cache.free_blocks,
                    "requests_finished_total": self._finished_total,
                    "tokens_generated_total": dict(self._tokens_generated),
                    "prompt_tokens_total": dict(self._prompt_tokens)}

    # -- the loop --------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._wakeup:
            self._signalled = True
            self._wakeup.notify_all()

    def _run(self) -> None:
        try:
            while not self._closed:
                try:
                    busy = self._step()
                except Exception as error:
                    LOGGER.exception("engine step failed")
                    self._fail_step(error)
                    busy = False  # pause before the next try: a fault that repeats must not spin
                if not busy:
                    self._idle()
        finally:
            self._shutdown(timeout=5.0)

    def _idle(self) -> None:
        """Sleep until something arrives (or, with requests in the queues, a retry interval passes)."""
        with self._wakeup:
            if not self._signalled and not self._closed:
                queued = self._scheduler.waiting or self._scheduler.running
                self._wakeup.wait(RETRY_SECONDS if queued else None)
            self._signalled = False

    def _step(self) -> bool:
        """One step; whether it did anything (else the loop sleeps)."""
        with self._wakeup:
            arrived, self._inbox = self._inbox, deque()
            cancels, self._cancels = self._cancels, deque()
            self._signalled = False
        for request in arrived:
            self._scheduler.add(request)
        for request in cancels:
            self._finish(request, "cancelled")
        for expert, message in self._residency.poll():
            for request in [waiting for waiting in self._scheduler.waiting if waiting.expert == expert]:
                self._finish(request, "error", message)

        self._plan = plan = self._scheduler.schedule()
        for request in plan.preempted:
            self._residency.left(request)
        for request in plan.admitted:
            self._residency.admitted(request)
        for request in plan.rejected:
            self._finish(request, "error", request.error)
        for request in plan.exhausted:
            self._finish(request, "length", flush=True)
        if self._residency.has_spares:  # loaded for requests that have gone meanwhile
            self._residency.release_spares(request.expert for request in self._scheduler.waiting)
        if not plan.chunks:
            self._plan = None
            return bool(arrived or cancels or plan.rejected or plan.exhausted)

        rows = self._forward(plan.chunks)
        for (request, _), row in zip(plan.chunks, rows):
            if isinstance(row, Exception):
                self._finish(request, "error", _message(row))
            elif request.num_computed == request.num_tokens:  # else a prefill chunk with more to come
                try:
                    self._advance(request, row[-1])
                except Exception as error:
                    LOGGER.exception("request %s failed", request.request_id)
                    self._finish(request, "error", _message(error))
        self._plan = None
        return True

    def _gate(self, request: Request) -> Admission:
        admission = self._residency.gate(request.expert)
        if admission is Admission.READY and request.expert is not None:
            vocab = self._residency.vocab_size(request.expert)
            if vocab is not None and request.largest_prompt_token >= vocab:
                request.error = (f"prompt: token id {request.largest_prompt_token} is outside the vocabulary of "
                                 f"{request.expert!r} ({vocab} tokens)")
                return Admission.REJECT
        return admission

    def _forward(self, chunks: list[tuple[Request, int]]) -> list[torch.Tensor | Exception]:
        """Logits of each chunk's last token, or the exception that chunk's sequence raised."""
        inputs = [SequenceInput(request.sequence, request.expert, request.chunk(size)) for request, size in chunks]
        try:
            rows: list[torch.Tensor | Exception] = list(self.model.forward(inputs, last_only=True))
        except Exception as error:  # noqa: BLE001 - find the sequence that raises
            if len(chunks) == 1:
                return [error]
            LOGGER.warning("a forward of %d sequences raised (%s); running them one at a time", len(chunks), error)
            return self._forward_one_by_one(chunks)
        for request, size in chunks:
            request.num_computed += size
        return rows

    def _forward_one_by_one(self, chunks: list[tuple[Request, int]]) -> list[torch.Tensor | Exception]:
        """Each chunk's sequence alone, over its whole prefix: the failed forward may have left
        its cache entries half written, so every sequence starts again from a clean cache."""
        targets = [request.num_computed + size for request, size in chunks]
        for request, _ in chunks:
            self.model.free(request.sequence)
            request.num_computed = 0
        rows: list[torch.Tensor | Exception] = []
        for (request, _), target in zip(chunks, targets):
            try:
                item = SequenceInput(request.sequence, request.expert, request.tokens[:target])
                rows.append(self.model.forward([item], last_only=True)[0])
                request.num_computed = target
            except Exception as error:  # noqa: BLE001 - this sequence's own failure
                self.model.free(request.sequence)
                rows.append(error)
        return rows

    def _advance(self, request: Request, logits: torch.Tensor) -> None:
        """Sample the request's next token and stream it, or end the request."""
        token = sample(logits, request.params, request.generator)
        request.completion_tokens += 1
        with self._counters_lock:
            self._tokens_generated[request.expert] = self._tokens_generated.get(request.expert, 0) + 1
        if token in request.stop_token_ids:
            self._finish(request, "stop", flush=True)
            return
        request.tokens.append(token)
        text = request.detokenizer.push(token)
        if request.stop_strings is not None:
            text, stopped = request.stop_strings.feed(text)
            hidden = request.hidden_tokens.get(token)
            if hidden is not None and not stopped:  # a special token: matched, never shown
                more, stopped = request.stop_strings.feed(hidden, shown=False)
                text += more
            if stopped:
                self._finish(request, "stop", text=text, token_ids=[token])
                return
        if request.completion_tokens >= request.params.max_tokens:
            self._finish(request, "length", text=text, token_ids=[token], flush=True)
            return
        request.event(text, [token])

    def _finish(self, request: Request, reason: str, error: str | None = None, *, text: str = "",
                token_ids: Sequence[int] = (), flush: bool = False) -> None:
        """End ``request``: out of its queue, blocks freed, its hold and claim ended, last event sent."""
        if request.finished:
            return
        if flush:  # the output ended: what was held back is text after all
            tail = request.detokenizer.flush()
            if request.stop_strings is not None:
                tail, stopped = request.stop_strings.feed(tail)
                tail += "" if stopped else request.stop_strings.flush()
            text += tail
        running = request.status is RequestStatus.RUNNING
        self._scheduler.remove(request)
        if running:
            self._residency.left(request)
        request.release_claim()
        request.status = RequestStatus.FINISHED
        self._live.pop(request.request_id, None)
        with self._counters_lock:
            self._finished_total += 1
        request.event(text, list(token_ids), reason, error)

    def _fail_step(self, error: Exception) -> None:
        """After an unexpected failure of the engine's own code: end the requests of that step."""
        plan, self._plan = self._plan, None
        for request, _ in plan.chunks if plan is not None else ():
            if request.finished:
                continue
            try:
                self._finish(request, "error", f"internal error: {_message(error)}")
            except Exception:
                LOGGER.exception("ending request %s", request.request_id)

    def _shutdown(self, timeout: float) -> None:
        """End every unfinished request with "abort" and release every hold."""
        with self._wakeup:
            arrived, self._inbox = self._inbox, deque()
            self._cancels.clear()
        for request in arrived:
            self._scheduler.add(request)
        for request in [*self._scheduler.running, *self._scheduler.waiting]:
            try:
                self._finish(request, "abort", "the engine was closed")
            except Exception:
                LOGGER.exception("aborting request %s", request.request_id)
        self._residency.close(timeout)


def _message(error: BaseException) -> str:
    return str(error) or type(error).__name__
