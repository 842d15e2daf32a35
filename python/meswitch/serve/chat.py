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
from typing import Any

from meswitch.serve.protocol import ChatMessage


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def plain_prompt(messages: Sequence[ChatMessage]) -> str:
    """The plain fallback format (see the module docstring)."""
    return "".join(f"{message.text()}\n" for message in messages)


def chat_prompt_tokens(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
    """The token ids of ``messages`` prompted for the assistant's next turn.

    Parameters
    ----------
    tokenizer
        The expert's HF tokenizer.
    messages
        The conversation so far.

    Returns
    -------
    list of int
        With a chat template: ``apply_chat_template(..., add_generation_prompt=True)``;
        without: the plain format. Either way tokenized without adding special tokens
        again (a template writes the ones it wants).
    """
    if has_chat_template(tokenizer):
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(plain_prompt(messages))["input_ids"])


__all__ = ["chat_prompt_tokens", "has_chat_template", "plain_prompt"]
