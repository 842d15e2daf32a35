"""meswitch: many fine-tuned LLM experts served from one base model.

The compiled core (``meswitch._core``) is imported on first use, so pure-Python
parts (evaluation, the tiny expert family) import without it.
"""

from __future__ import annotations

from meswitch.lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "FormatError": ("meswitch._core", "FormatError"),
    "TierFull": ("meswitch._core", "TierFull"),
    "open_checkpoint": ("meswitch.checkpoint", "open_checkpoint"),
    "Checkpoint": ("meswitch.checkpoint", "Checkpoint"),
    "save_file": ("meswitch.checkpoint", "save_file"),
    "Router": ("meswitch.route.router", "Router"),
}

__all__ = ["__version__", *_LAZY]

__getattr__ = lazy_getattr("meswitch", _LAZY, globals())
