"""A request's text as its tokens arrive: whole characters only, stop strings held back.

Byte-level tokenizers split a multi-byte UTF-8 character over several tokens, so decoding
each token alone would stream broken characters (U+FFFD). :class:`IncrementalDetokenizer`
decodes a short window instead (the tokens since the last text it released, after the
ones before that as context) and releases new text only once it no longer ends in an
incomplete character. Each token costs one decode of that window, never of the whole
output; the released pieces concatenate to ``tokenizer.decode(all tokens)``.

:class:`StopStrings` then holds back any tail of that text that could still grow into a
stop string, and cuts the text where one appears.

**Special tokens are matched, not shown.** The text a request returns never contains a
special token (``<|end|>``, ``<|endoftext|>``: decoding skips them, as transformers'
``skip_special_tokens=True`` does), but stop strings are matched against the text with
each special token written out (:attr:`~meswitch.serve.engine.tokenizer.SharedTokenizer.hidden_tokens`).
So ``stop=["<|end|>"]`` ends a request at that token, and ``stop=["Bye<|end|>"]`` at the
text ``Bye`` followed by it; either way the text returned ends just before the match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: What a tokenizer decodes an incomplete UTF-8 sequence to.
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """The text of a growing token list, released in whole characters.

    Parameters
    ----------
    tokenizer
        A :class:`~meswitch.serve.engine.tokenizer.SharedTokenizer` (its ``decode`` skips special tokens).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._prefix = 0  # window start: the tokens of the last released text, for context
        self._read = 0  # tokens up to here are released as text

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    def push(self, token: int) -> str:
        """Add ``token``; return the new text it completes (``""`` while a character is incomplete)."""
        self.tokens.append(token)
        prefix_text = self._decode(self.tokens[self._prefix:self._read])
        text = self._decode(self.tokens[self._prefix:])
        if len(text) <= len(prefix_text) or text.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return text[len(prefix_text):]

    def flush(self) -> str:
        """The text of the tokens not released yet, incomplete characters as U+FFFD (at the end)."""
        prefix_text = self._decode(self.tokens[self._prefix:self._read])
        text = self._decode(self.tokens[self._prefix:])
        self._prefix = self._read = len(self.tokens)
        return text[len(prefix_text):]


class StopStrings:
    """Releases text up to the first stop string, holding back what could still begin one.

    No text released ever contains the start of a stop string occurrence: any suffix that
    is a prefix of a stop string waits for the next text. So each search looks only at the
    text held back plus the new text, a few characters. Text fed with ``shown=False`` (a
    special token's) is matched like any other but never released.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._held = ""
        self._shown: list[bool] = []  # per held character: released as text, or only matched

    def feed(self, text: str, *, shown: bool = True) -> tuple[str, bool]:
        """Add ``text``; return the text safe to release and whether a stop string appeared.

        After a stop, the released text ends just before it and nothing more comes.
        """
        held = self._held + text
        mask = self._shown + [shown] * len(text)
        found = [index for index in (held.find(stop) for stop in self.stops) if index >= 0]
        if found:
            self._held, self._shown = "", []
            return _visible(held[:min(found)], mask), True
        keep = 0
        for size in range(min(len(held), max(map(len, self.stops), default=1) - 1), 0, -1):
            if any(stop.startswith(held[-size:]) for stop in self.stops):
                keep = size
                break
        cut = len(held) - keep
        self._held, self._shown = held[cut:], mask[cut:]
        return _visible(held[:cut], mask), False

    def flush(self) -> str:
        """The text held back (the output ended without completing a stop string)."""
        held, mask = self._held, self._shown
        self._held, self._shown = "", []
        return _visible(held, mask)


def _visible(text: str, shown: Sequence[bool]) -> str:
    """The characters of ``text`` marked shown (``shown`` may run past its end)."""
    if all(shown[:len(text)]):
        return text
    return "".join(character for character, keep in zip(text, shown) if keep)
