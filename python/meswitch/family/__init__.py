"""The tiny expert family: a small Llama base model with chat, math and code experts.

The models live in ``tiny/`` next to this file and the held-out evaluation data in
``heldout/``; ``python -m meswitch.family.train`` regenerates both.
"""

from __future__ import annotations

from pathlib import Path

EXPERTS = ("chat", "math", "code")


def family_dir() -> Path:
    """Return the directory holding the packaged tiny family (``base/``, ``chat/``, ``math/``, ``code/``)."""
    return Path(__file__).resolve().parent / "tiny"


def heldout_dir() -> Path:
    """Return the directory holding the held-out ``{chat,math,code}.jsonl`` files."""
    return Path(__file__).resolve().parent / "heldout"


__all__ = ["EXPERTS", "family_dir", "heldout_dir"]
