"""``/v1/chat/completions`` and ``/v1/completions``: a request through the engine, answered whole or streamed.

A request is validated (``protocol.py``), its model chosen (``catalog.py``: a name, ``base``,
or the router's pick for ``auto``), its prompt built (chat: the expert's own template,
``chat.py``) and submitted to the engine, which claims the expert in the store for the
request's lifetime and batches it with every other request in flight. Building and
submitting run on a worker thread, never on the event loop: they read the expert's
tokenizer from disk on its first use, run the chat template and tokenize (under the
tokenizer's lock, ``tokenizer.py``, shared with every other thread that encodes with it). The answer is either one JSON body once the engine finishes
or a server-sent event stream in OpenAI's chunk format ending with ``data: [DONE]``; both
name the expert in the ``model`` field and the ``x-meswitch-expert`` header.

A client that goes away takes its request with it: the stream (or, for a plain request,
a watcher on the connection) cancels the engine request, whose KV blocks the engine frees
at its next step, and the expert is released.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from meswitch.serve.engine.tokenizer import SharedTokenizer
from meswitch.serve.server.catalog import Choice, ModelCatalog
from meswitch.serve.server.chat import chat_prompt_tokens
from meswitch.serve.server.errors import APIError, error_body
from meswitch.serve.server.metrics import RequestTimer, ServerMetrics
from meswitch.serve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    Usage,
    new_id,
    now,
)

#: The response header naming the expert that answered.
EXPERT_HEADER = "x-meswitch-expert"
#: OpenAI's default ``max_tokens`` of a text completion (a chat completion's is the rest of the context).
COMPLETION_MAX_TOKENS = 16


@dataclass
class ServingContext:
    """What the endpoints share: the engine, the served models, the metrics, the context length."""

    engine: Any
    catalog: ModelCatalog
    metrics: ServerMetrics
    context_length: int


@dataclass
class _Outcome:
    """One prompt's answer, collected whole."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


# -- engine submission --------------------------------------------------------------------------


def _sampling_params(request: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> Any:
    from meswitch.serve.engine.sampling import SamplingParams

    try:
        return SamplingParams(max_tokens=max_tokens,
                              temperature=1.0 if request.temperature is None else request.temperature,
                              top_p=1.0 if request.top_p is None else request.top_p,
                              top_k=request.top_k or 0, seed=request.seed, stop=request.stop_strings(),
                              ignore_eos=request.ignore_eos)
    except ValueError as error:  # "field: problem"
        message = str(error)
        field = message.partition(":")[0] if ":" in message else None
        raise APIError(400, message, param=field, code="invalid_value") from None


def _submit_all(context: ServingContext, choice: Choice, prompts: Sequence[tuple[str | list[int], str]],
                params: Any, handles: list[Any]) -> None:
    """Submit each ``(prompt, field)`` to the engine, appending its handle to ``handles``.

    Blocking (tokenizes; may read the tokenizer from disk): for a worker thread. The caller
    owns ``handles`` and cancels them if anything fails, also after a refusal here.
    """
    from meswitch.serve.engine.engine import PromptTooLong

    for prompt, field in prompts:
        with _engine_errors(choice):
            try:
                handles.append(context.engine.submit(choice.expert, prompt, params))
            except PromptTooLong as error:
                raise APIError(400, f"{field}: {_about_prompt(error)}", param=field,
                               code="context_length_exceeded") from None
            except ValueError as error:
                raise APIError(400, f"{field}: {_about_prompt(error)}", param=field,
                               code="invalid_value") from None


async def _submitted(work: Callable[[list[Any]], None]) -> list[Any]:
    """The handles ``work`` submits on a worker thread; on any failure (or cancellation) they are
    cancelled (each ends its claim on the expert at once)."""
    handles: list[Any] = []
    try:
        await run_in_threadpool(work, handles)
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    return handles


def _prompt_field(prompts: Sequence[Any], index: int) -> str:
    """The request field of prompt ``index``: ``prompt``, or ``prompt.N`` in a list of them."""
    return "prompt" if len(prompts) == 1 else f"prompt.{index}"


def _tokenizer(context: ServingContext, choice: Choice) -> SharedTokenizer:
    with _engine_errors(choice):
        return context.engine.tokenizer(choice.expert)


@contextmanager
def _engine_errors(choice: Choice) -> Iterator[None]:
    """The engine's refusals as API errors: an expert it does not know is a 404; the others (an
    expert whose tokenizer cannot be read, an engine that is closing) a 503 naming the cause."""
    from meswitch.serve.engine.engine import EngineError, ExpertUnavailable

    try:
        yield
    except ExpertUnavailable as error:
        raise APIError(404, f"the model '{choice.model}' is not available: {error}", param="model",
                       code="model_not_found") from None
    except EngineError as error:
        raise APIError(503, f"the model '{choice.model}' cannot serve requests: {error}",
                       code="model_unavailable") from None


def _about_prompt(error: Exception) -> str:
    """The engine's message without its own ``prompt:`` (the caller names the request's field)."""
    return str(error).removeprefix("prompt: ")


async def _collect(handle: Any, timer: RequestTimer) -> _Outcome:
    text: list[str] = []
    event = None
    async for event in handle.aevents():
        timer.tokens(len(event.token_ids), event.time)
        text.append(event.text)
    if event is None or event.finish_reason is None:
        raise APIError(500, "the engine ended the request without a finish reason", code="internal_error")
    timer.finish(event.finish_reason, event.prompt_tokens, event.completion_tokens, event.time)
    if event.finish_reason == "error":
        raise APIError(500, f"the request failed: {event.error}", code="generation_failed")
    if event.finish_reason not in ("stop", "length"):  # "abort": the engine is closing
        raise APIError(503, f"the request was ended ({event.finish_reason}): the server is shutting down",
                       code="aborted")
    return _Outcome("".join(text), event.finish_reason, event.prompt_tokens, event.completion_tokens)


async def _until_disconnected(receive: Receive) -> None:
    """Return when the client has closed the connection (the body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _collect_all(request: Request, handles: Sequence[Any], timers: Sequence[RequestTimer]) -> list[_Outcome]:
    """Every prompt's answer; cancels them all when the client leaves first."""
    work = asyncio.ensure_future(asyncio.gather(*(_collect(h, t) for h, t in zip(handles, timers))))
    watcher = asyncio.ensure_future(_until_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
        for handle in handles:  # all of them when one failed; a finished one is left as it is
            handle.cancel()
    if work not in done:  # the client left first
        for timer in timers:
            timer.cancelled()
        raise APIError(499, "the client closed the connection", code="client_closed")
    return work.result()


class _EngineStream(StreamingResponse):
    """A stream whose ``on_close`` runs however it ends: finished, client gone, or server stopping.

    Starlette cancels a stream's task when the client disconnects, possibly before the body's
    generator ever ran (its ``finally`` would then never run); the cleanup is here instead.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, media_type="text/event-stream", **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(payload: Any) -> str:
    """One server-sent event; a chunk's ``usage`` appears only where it is set (OpenAI's usage chunk)."""
    if hasattr(payload, "model_dump_json"):
        data = payload.model_dump_json(exclude={"usage"} if getattr(payload, "usage", 0) is None else None)
    else:
        data = json.dumps(payload)
    return f"data: {data}\n\n"


async def _merged(handles: Sequence[Any]) -> AsyncIterator[tuple[int, Any]]:
    """``(index, event)`` of several requests' event streams as they come."""
    if len(handles) == 1:
        async for event in handles[0].aevents():
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, handle: Any) -> None:
        async for event in handle.aevents():
            await queue.put((index, event))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            index, event = await queue.get()
            if event.finish_reason is not None:
                remaining -= 1
            yield index, event
    finally:
        for task in tasks:
            task.cancel()


def _stream_error(message: str, code: str) -> str:
    return _sse(error_body(500, message, code=code))


# -- the handlers ---------------------------------------------------------------------------------


class Completions:
    """The two generation endpoints over a :class:`ServingContext`."""

    def __init__(self, context: ServingContext) -> None:
        self.context = context

    def _accepted(self, choice: Choice, endpoint: str) -> None:
        """Count a request the engine took (one refused at submission is counted by its status)."""
        self.context.metrics.requests.labels(choice.model, endpoint).inc()
        if choice.route is not None:
            self.context.metrics.routed.labels(choice.model, str(choice.route.fallback).lower()).inc()

    def _release(self, handles: Sequence[Any], timers: Sequence[RequestTimer]) -> Callable[[], None]:
        def close() -> None:
            for handle, timer in zip(handles, timers):
                handle.cancel()  # idempotent; frees the KV blocks of one still running
                timer.cancelled()

        return close

    async def chat(self, request: Request, body: ChatCompletionRequest) -> Any:
        """``POST /v1/chat/completions``."""
        received = time.monotonic()
        context = self.context
        messages = [m.model_dump() for m in body.messages]
        choice = context.catalog.choose(body.model, messages)

        def submit(handles: list[Any]) -> None:
            prompt = chat_prompt_tokens(_tokenizer(context, choice), body.messages)
            limit = body.token_limit()
            max_tokens = limit if limit is not None else max(1, context.context_length - len(prompt))
            _submit_all(context, choice, [(prompt, "messages")], _sampling_params(body, max_tokens), handles)

        handles = await _submitted(submit)
        self._accepted(choice, "chat")
        timer = RequestTimer(context.metrics, choice.model, received)
        headers = {EXPERT_HEADER: choice.model}
        response_id, created = new_id("chatcmpl"), now()
        if body.stream:
            return _EngineStream(self._chat_stream(handles[0], timer, body, choice, response_id, created),
                                 self._release(handles, [timer]), headers=headers)
        (outcome,) = await _collect_all(request, handles, [timer])
        response = ChatCompletion(
            id=response_id, created=created, model=choice.model,
            choices=[ChatChoice(index=0, message=AssistantMessage(content=outcome.text),
                                finish_reason=outcome.finish_reason)],
            usage=Usage.of(outcome.prompt_tokens, outcome.completion_tokens))
        return JSONResponse(response.model_dump(), headers=headers)

    async def _chat_stream(self, handle: Any, timer: RequestTimer, body: ChatCompletionRequest, choice: Choice,
                           response_id: str, created: int) -> AsyncIterator[str]:
        def chunk(delta: Delta, finish: str | None = None) -> str:
            return _sse(ChatCompletionChunk(id=response_id, created=created, model=choice.model,
                                            choices=[ChatChunkChoice(index=0, delta=delta, finish_reason=finish)]))

        yield chunk(Delta(role="assistant", content=""))
        async for _, event in _merged([handle]):
            timer.tokens(len(event.token_ids), event.time)
            if event.text:
                yield chunk(Delta(content=event.text))
            if event.finish_reason is None:
                continue
            timer.finish(event.finish_reason, event.prompt_tokens, event.completion_tokens, event.time)
            if event.finish_reason not in ("stop", "length"):
                yield _stream_error(f"the request failed: {event.error or event.finish_reason}", "generation_failed")
                break
            yield chunk(Delta(), event.finish_reason)
            if body.include_usage:
                yield _sse(ChatCompletionChunk(id=response_id, created=created, model=choice.model, choices=[],
                                               usage=Usage.of(event.prompt_tokens, event.completion_tokens)))
        yield "data: [DONE]\n\n"

    async def completion(self, request: Request, body: CompletionRequest) -> Any:
        """``POST /v1/completions``."""
        received = time.monotonic()
        context = self.context
        prompts = body.prompts()
        if body.model == "auto" and (len(prompts) != 1 or not isinstance(prompts[0], str)):
            raise APIError(400, "prompt: model 'auto' routes one text prompt per request (not token ids or a list)",
                           param="prompt")
        choice = context.catalog.choose(body.model, prompts[0] if isinstance(prompts[0], str) else None)

        def submit(handles: list[Any]) -> None:
            params = _sampling_params(body, body.max_tokens or COMPLETION_MAX_TOKENS)
            if any(not isinstance(p, str) for p in prompts):
                self._check_token_ids(choice, prompts)
            _submit_all(context, choice, [(p, _prompt_field(prompts, i)) for i, p in enumerate(prompts)], params,
                        handles)

        handles = await _submitted(submit)
        self._accepted(choice, "completions")
        timers = [RequestTimer(context.metrics, choice.model, received) for _ in handles]
        headers = {EXPERT_HEADER: choice.model}
        response_id, created = new_id("cmpl"), now()
        if body.stream:
            return _EngineStream(self._completion_stream(handles, timers, body, choice, response_id, created),
                                 self._release(handles, timers), headers=headers)
        outcomes = await _collect_all(request, handles, timers)
        response = Completion(
            id=response_id, created=created, model=choice.model,
            choices=[CompletionChoice(index=i, text=o.text, finish_reason=o.finish_reason)
                     for i, o in enumerate(outcomes)],
            usage=Usage.of(sum(o.prompt_tokens for o in outcomes), sum(o.completion_tokens for o in outcomes)))
        return JSONResponse(response.model_dump(), headers=headers)

    def _check_token_ids(self, choice: Choice, prompts: Sequence[str | list[int]]) -> None:
        vocabulary = len(_tokenizer(self.context, choice))
        for index, prompt in enumerate(prompts):
            bad = [t for t in prompt if not 0 <= t < vocabulary] if isinstance(prompt, list) else []
            if bad:
                field = _prompt_field(prompts, index)
                raise APIError(400, f"{field}: token id {bad[0]} is outside the vocabulary of '{choice.model}' "
                                    f"({vocabulary} tokens)", param=field, code="invalid_value")

    async def _completion_stream(self, handles: Sequence[Any], timers: Sequence[RequestTimer],
                                 body: CompletionRequest, choice: Choice, response_id: str,
                                 created: int) -> AsyncIterator[str]:
        def chunk(index: int, text: str, finish: str | None = None) -> str:
            return _sse(Completion(id=response_id, created=created, model=choice.model,
                                   choices=[CompletionChoice(index=index, text=text, finish_reason=finish)]))

        prompt_tokens = completion_tokens = 0
        async for index, event in _merged(handles):
            timers[index].tokens(len(event.token_ids), event.time)
            if event.finish_reason is None:
                if event.text:
                    yield chunk(index, event.text)
                continue
            timers[index].finish(event.finish_reason, event.prompt_tokens, event.completion_tokens, event.time)
            if event.finish_reason not in ("stop", "length"):
                yield _stream_error(f"the request failed: {event.error or event.finish_reason}", "generation_failed")
                break
            yield chunk(index, event.text, event.finish_reason)
            prompt_tokens += event.prompt_tokens
            completion_tokens += event.completion_tokens
        else:
            if body.include_usage:
                yield _sse(Completion(id=response_id, created=created, model=choice.model, choices=[],
                                      usage=Usage.of(prompt_tokens, completion_tokens)))
        yield "data: [DONE]\n\n"


__all__ = ["COMPLETION_MAX_TOKENS", "EXPERT_HEADER", "Completions", "ServingContext"]
