"""The Hugging Face tokenizers of the base and of each expert, loaded once per directory."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=32)
def load_tokenizer(directory: str) -> Any:
    """The tokenizer in ``directory`` (a model directory, or an artifact's ``expert/``), loaded once."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
