"""Chat messages to the prompt an expert reads: its own chat template, or a plain fallback.

An expert fine-tuned for chat ships a chat template (``chat_template.jinja`` or one in its
``tokenizer_config.json``; the compressor keeps both in the artifact's ``expert/``
directory) and is prompted through ``tokenizer.apply_chat_template`` with the generation
prompt added, exactly as transformers would prompt it.

An expert without one (a completion model such as the bundled math and code experts) gets
the **plain format**: the text of each message, in order, each followed by a newline,
with no role markers::

    {system}\\n{user}\\n{assistant}\\n{user}\\n

A completion model reads a conversation as running text; a single question ending in a
newline is the form the bundled math expert was trained on (question, newline, answer),
and a code prompt stays code. Role markers such as ``User:`` would be text these models
never saw. System and developer messages are part of the text like the others.
"""

from __future__ import annotations

from collections.abc import Sequence

from meswitch.serve.engine.tokenizer import SharedTokenizer
from meswitch.serve.server.protocol import ChatMessage


def plain_prompt(messages: Sequence[ChatMessage]) -> str:
    """The plain fallback format (see the module docstring)."""
    return "".join(f"{message.text()}\n" for message in messages)


def chat_prompt_tokens(tokenizer: SharedTokenizer, messages: Sequence[ChatMessage]) -> list[int]:
    """The token ids of ``messages`` prompted for the assistant's next turn.

    Reads no file but runs the template and the tokenizer: call it off the event loop.

    Parameters
    ----------
    tokenizer
        The expert's tokenizer.
    messages
        The conversation so far.

    Returns
    -------
    list of int
        With a chat template: the template's text with the generation prompt added,
        tokenized without adding special tokens again (the template writes the ones it
        wants); without: the plain format, tokenized as a text prompt is.
    """
    if tokenizer.has_chat_template:
        text = tokenizer.render_chat([{"role": m.role, "content": m.text()} for m in messages])
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(plain_prompt(messages))


__all__ = ["chat_prompt_tokens", "plain_prompt"]
