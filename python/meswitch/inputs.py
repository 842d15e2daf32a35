"""JSON inputs (a model's ``config.json``, ``.jsonl`` text sets) read with errors naming file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_text(path: str | os.PathLike[str]) -> str:
    """The UTF-8 text of ``path``; a file that is not UTF-8 is a ``ValueError`` naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start})") from None


def read_model_config(directory: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """The text of ``directory/config.json`` and the JSON object it holds.

    Raises
    ------
    FileNotFoundError
        The directory has no ``config.json``.
    ValueError
        The file is not UTF-8, not valid JSON, or not a JSON object; the message names it.
    """
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    text = read_text(path)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    if not isinstance(config, dict):  # bad file content: a ValueError, as for invalid JSON
        found = type(config).__name__
        raise ValueError(f"{path}: not a JSON object (found {found}); a model config is one")  # noqa: TRY004
    return text, config


def read_jsonl_records(path: str | os.PathLike[str], text: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for every non-blank line of a ``.jsonl`` file, each a JSON object.

    Parameters
    ----------
    path
        The file; named in every error.
    text
        Its content when already read (otherwise it is read as UTF-8).

    Raises
    ------
    ValueError
        A line that is not valid JSON or not a JSON object: ``PATH:LINE: what``.
    """
    if text is None:
        text = read_text(path)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):  # bad file content: a ValueError, as for invalid JSON
            raise ValueError(f"{path}:{number}: not a JSON object")  # noqa: TRY004
        yield number, record


def string_field(record: dict[str, Any], field: str, path: str | os.PathLike[str], number: int) -> str:
    """``record[field]``, which must be present and a string; errors name file, line and field."""
    if field not in record:
        raise ValueError(f"{path}:{number}: missing field '{field}'")
    value = record[field]
    if not isinstance(value, str):
        found = type(value).__name__
        raise ValueError(f"{path}:{number}: field '{field}' is {found}, not a string")  # noqa: TRY004
    return value
