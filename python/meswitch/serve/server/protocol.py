"""The OpenAI HTTP protocol as typed models: requests in, responses and stream chunks out.

Requests are validated here, before anything reaches the engine, so a bad field is a 400
that names it (``errors.py`` turns pydantic's errors into OpenAI's error body). Unknown
fields are refused rather than ignored: a client asking for something this server does not
do (``logprobs``, ``tools``, penalties) hears so instead of getting a different answer.
Fields OpenAI defines that this server accepts only at their neutral value (``n`` = 1,
penalties 0, ``logprobs`` false, ``echo`` false) are checked the same way.

Responses follow OpenAI's wire format field for field, streaming included: a chat stream
opens with a chunk whose delta carries the role, sends content deltas, ends with a chunk
carrying ``finish_reason`` (and, with ``stream_options.include_usage``, a last chunk with no
choices and the usage) and then ``data: [DONE]``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

#: Stop strings a request may give (the engine's limit).
MAX_STOP_STRINGS = 4
#: Prompts one completions request may batch (each is a separate choice).
MAX_PROMPTS = 16


class _Request(BaseModel):
    """A request body: unknown fields are an error naming the field."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    """``stream_options``: with ``include_usage`` a last chunk carries the usage."""

    include_usage: bool = False


def _neutral(name: str, value: Any, neutral: Any) -> Any:
    if value is not None and value != neutral:
        raise ValueError(f"only {neutral!r} is supported (this server does not implement {name})")
    return value


class _SamplingFields(_Request):
    """The sampling fields chat and text completions share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, description="extension: sample among the k most likely; 0 = off")
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(default=False,
                             description="extension: generate max_tokens tokens, past end-of-text and end-of-turn")
    user: str | None = None  # OpenAI's end-user id: accepted, not used
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else (stop or [])
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(strings)}")
        if any(not s for s in strings):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("n")
    @classmethod
    def _check_n(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _check_penalty(cls, value: float | None, info: Any) -> float | None:
        return _neutral(info.field_name, value, 0)

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings as the engine takes them."""
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(_Request):
    """A text part of a message's content (the only kind of part served)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined by newlines)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _check_logprobs(cls, value: bool | None) -> bool | None:
        return _neutral("logprobs", value, False)

    def token_limit(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's newer name) or ``max_tokens``; None: up to the context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: ``prompt`` is a string, token ids, or a list of either."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: Any) -> Any:
        if prompt == "" or (isinstance(prompt, list) and any(p == "" or p == [] for p in prompt)):
            raise ValueError("must not be empty")
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("must not be an empty list")
            if isinstance(prompt[0], (str, list)) and len(prompt) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}")
        return prompt

    @field_validator("echo")
    @classmethod
    def _check_echo(cls, value: bool | None) -> bool | None:
        return _neutral("echo", value, False)

    @field_validator("logprobs")
    @classmethod
    def _check_logprobs(cls, value: int | None) -> int | None:
        return _neutral("logprobs", value, None)

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, value: int | None) -> int | None:
        return _neutral("best_of", value, 1)

    @field_validator("suffix")
    @classmethod
    def _check_suffix(cls, value: str | None) -> str | None:
        return _neutral("suffix", value, None)

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)


class AddExpertRequest(_Request):
    """``POST /v1/experts``: the ``NAME.meswitch`` artifact directory to serve."""

    path: str = Field(min_length=1)


# -- responses ---------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """A fresh response id such as ``chatcmpl-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """OpenAI's ``created``: seconds since the epoch."""
    return int(time.time())


class Usage(BaseModel):
    """Token counts of a response."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        """The usage of ``prompt_tokens`` in and ``completion_tokens`` out."""
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


FinishReason = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    """The reply of a chat completion."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    """The body of a (non-streaming) chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    """What a chat chunk adds; fields not set are left out of the JSON (OpenAI's final delta is ``{}``)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _only_set(self) -> dict[str, str]:
        return {key: value for key, value in (("role", self.role), ("content", self.content)) if value is not None}


class ChatChunkChoice(BaseModel):
    """One choice of a chat stream chunk."""

    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One ``data:`` event of a chat stream."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    """One choice of a text completion (also of its stream chunks)."""

    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    """The body of a text completion, and of each chunk of its stream (OpenAI uses the same object)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of ``/v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "meswitch"


class ModelList(BaseModel):
    """The body of ``/v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """The body of every error response: ``{"error": {...}}``."""

    error: ErrorDetail


__all__ = [
    "MAX_PROMPTS",
    "MAX_STOP_STRINGS",
    "AddExpertRequest",
    "AssistantMessage",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "Completion",
    "CompletionChoice",
    "CompletionRequest",
    "Delta",
    "ErrorBody",
    "ErrorDetail",
    "ModelCard",
    "ModelList",
    "StreamOptions",
    "TextPart",
    "Usage",
    "new_id",
    "now",
]
