"""The Hugging Face tokenizers of the base and of each expert: loaded once per directory, shared by threads.

The rule for tokenizer use, the only one: a tokenizer is reached only through a
:class:`SharedTokenizer`, and every call into one of its Hugging Face objects holds that
object's lock. A fast tokenizer keeps its truncation and padding settings in its Rust core and each
call may change them for its own arguments, so two threads encoding at once can get each
other's settings (ids cut short) or a "borrowed" error. The server's worker threads encode
prompts and render chat templates while the engine thread decodes each new token. So a
:class:`SharedTokenizer` holds two copies of the tokenizer: one encodes (``lock``), one
decodes (``decode_lock``), and the engine thread's decoding never waits for an encode (a
long prompt takes its time: about 8 ms per 10 000 characters on the development VM). Both locks
are per directory: one expert's requests never wait for another's. Besides its
own methods, a :class:`SharedTokenizer` is called like the Hugging Face tokenizer (``t(text)``,
``t.decode(ids, skip_special_tokens=True)``, any other method or attribute), each call under
``lock``; several calls that must see one state go in one :meth:`SharedTokenizer.locked` block.

Loading reads files, so it happens on the thread that first asks (never the event loop),
one directory at a time; two threads asking for one directory at once load it once.

Also here, because it is read from the same files: the tokens that **end generation**
(:attr:`SharedTokenizer.stop_token_ids`): the tokenizer's EOS, every ``eos_token_id`` of
the directory's ``generation_config.json`` (an int or a list, as transformers writes it),
and the end-of-turn token(s) the chat template writes after an assistant message (such as
``<|end|>``, ``<|eot_id|>`` or ``<|im_end|>``), so a chat reply ends with its turn.
"""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Tokenizers kept loaded (least recently used beyond this are dropped; their users keep theirs).
CACHED_TOKENIZERS = 32
#: Content no conversation contains: marks where an assistant message's text ends in a rendered template.
_TURN_MARKER = "MESWITCH-END-OF-TURN-MARKER"


class SharedTokenizer:
    """One directory's Hugging Face tokenizer, safe to call from any thread (see the module docstring).

    Parameters
    ----------
    tokenizer
        The Hugging Face tokenizer; nothing else may call it afterwards (a copy of it decodes).
    directory
        Where it was read from (its ``generation_config.json`` is read from there too).

    Attributes
    ----------
    directory
        The directory.
    lock
        Held by every call into the encoding copy (encode, chat template, forwarded calls).
    decode_lock
        Held by every call into the decoding copy (:meth:`decode`).
    eos_token_id
        The tokenizer's end-of-sequence id (``None``: it has none).
    stop_token_ids
        The ids that end generation (see the module docstring).
    hidden_tokens
        ``{id: text}`` of the special tokens that decoding leaves out of the text; stop
        strings are matched against this text of theirs (:mod:`meswitch.serve.engine.detokenizer`).
    """

    def __init__(self, tokenizer: Any, directory: str | Path) -> None:
        self._tokenizer = tokenizer
        self.lock = threading.Lock()  # guards _tokenizer: encoding, templates, forwarded calls
        self._decoder = copy.deepcopy(tokenizer)
        self.decode_lock = threading.Lock()  # guards _decoder
        self.directory = Path(directory)
        self.eos_token_id: int | None = tokenizer.eos_token_id
        self._size = len(tokenizer)
        self.chat_template: str | None = getattr(tokenizer, "chat_template", None) or None
        self.hidden_tokens: dict[int, str] = {}
        for token in tokenizer.all_special_ids:
            text = tokenizer.decode([token], skip_special_tokens=False)
            if text and not tokenizer.decode([token], skip_special_tokens=True):
                self.hidden_tokens[token] = text
        ends = {self.eos_token_id, *generation_config_eos(self.directory), *self._end_of_turn_ids()}
        self.stop_token_ids: frozenset[int] = frozenset(token for token in ends if token is not None)

    def __len__(self) -> int:
        """Tokens in the vocabulary, added tokens included (ids are below this)."""
        return self._size

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer carries a chat template."""
        return self.chat_template is not None

    @contextmanager
    def locked(self) -> Iterator[Any]:
        """The Hugging Face tokenizer for a call this class does not wrap, the lock held in the block."""
        with self.lock:
            yield self._tokenizer

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The ids of ``text`` (the tokenizer's own special tokens added unless told not to)."""
        with self.lock:
            return list(self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, tokens: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of ``tokens``, special tokens left out unless told otherwise (never waits for an encode)."""
        with self.decode_lock:
            return self._decoder.decode(tokens, skip_special_tokens=skip_special_tokens)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The Hugging Face tokenizer's ``__call__`` (a ``BatchEncoding``), under the lock."""
        with self.lock:
            return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Any other attribute of the Hugging Face tokenizer, read under the lock; a method comes
        back wrapped so that its calls hold the lock too."""
        if name.startswith("_"):  # private state, and what copy/pickle probe for, is not forwarded
            raise AttributeError(name)
        with self.lock:
            value = getattr(self._tokenizer, name)
        if not callable(value):
            return value

        def locked_call(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                return value(*args, **kwargs)

        return locked_call

    def render_chat(self, conversation: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """``conversation`` through the chat template as text (raises ``ValueError`` without one)."""
        if self.chat_template is None:
            raise ValueError(f"{self.directory}: the tokenizer has no chat template")
        with self.lock:
            return self._tokenizer.apply_chat_template(list(conversation), tokenize=False,
                                                       add_generation_prompt=add_generation_prompt)

    def _end_of_turn_ids(self) -> list[int]:
        """The special tokens the chat template writes right after an assistant message's text."""
        if self.chat_template is None:
            return []
        conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _TURN_MARKER}]
        try:
            rendered = self.render_chat(conversation, add_generation_prompt=False)
        except Exception:  # noqa: BLE001 - a template that refuses this conversation names no end of turn
            return []
        _, marker, after = rendered.partition(_TURN_MARKER)
        ends = []
        for token in self.encode(after, add_special_tokens=False) if marker else []:
            if token not in self.hidden_tokens:
                break
            ends.append(token)
        return ends

    def __repr__(self) -> str:
        return f"SharedTokenizer({str(self.directory)!r}, {self._size} tokens)"


def generation_config_eos(directory: Path) -> list[int]:
    """The ``eos_token_id`` (one int or a list) of ``directory/generation_config.json``, if any.

    Raises
    ------
    ValueError
        The file is not JSON, or its ``eos_token_id`` is neither an int nor a list of ints.
    """
    path = directory / "generation_config.json"
    if not path.is_file():
        return []
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{path}: not a JSON object: {error}") from None
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(token, int) and not isinstance(token, bool) and token >= 0 for token in values):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {value!r}")
    return values


class _TokenizerCache:
    """Loaded tokenizers by directory, read one at a time.

    One at a time because transformers' lazy imports are not thread-safe: two threads
    reading their first tokenizers at once can fail with ``ImportError: cannot import name
    'AutoTokenizer'``. A thread finding its directory loaded meanwhile takes that one.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()  # guards _loaded, never held while a file is read
        self._reading = threading.Lock()  # held while a tokenizer is read
        self._loaded: OrderedDict[str, SharedTokenizer] = OrderedDict()

    def _cached(self, directory: str) -> SharedTokenizer | None:
        with self._lock:
            if directory in self._loaded:
                self._loaded.move_to_end(directory)
            return self._loaded.get(directory)

    def get(self, directory: str) -> SharedTokenizer:
        found = self._cached(directory)
        if found is not None:
            return found
        with self._reading:
            found = self._cached(directory)  # read by the thread this one waited for
            if found is not None:
                return found
            from transformers import AutoTokenizer

            shared = SharedTokenizer(AutoTokenizer.from_pretrained(directory), directory)
            with self._lock:  # published before the next reader looks
                self._loaded[directory] = shared
                while len(self._loaded) > self._size:
                    self._loaded.popitem(last=False)
        return shared


_CACHE = _TokenizerCache(CACHED_TOKENIZERS)


def load_tokenizer(directory: str | Path) -> SharedTokenizer:
    """The tokenizer in ``directory`` (a model directory, or an artifact's ``expert/``), loaded once.

    Reads files on the first call for a directory: call it off the event loop.

    Raises
    ------
    OSError, ValueError
        No tokenizer can be read there, or its ``generation_config.json`` is malformed.
    """
    return _CACHE.get(str(directory))


__all__ = ["CACHED_TOKENIZERS", "SharedTokenizer", "generation_config_eos", "load_tokenizer"]
