"""Command-line argument types and the parser every ``meswitch`` subcommand uses.

A user error ends in one line on stderr, ``meswitch SUBCOMMAND: error: WHAT``, and a
non-zero exit status: 2 when the command line itself is wrong (an unknown flag, a bad
value, a path that does not exist), 1 when the inputs it names cannot be used (a
malformed file, models that do not match). The types below reject bad values while
the command line is parsed, so the message names the flag.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

#: Exit status of a command line that is wrong.
USAGE_ERROR = 2
#: Exit status of inputs that cannot be used.
INPUT_ERROR = 1


class UsageError(Exception):
    """A combination of arguments that is wrong although each one parsed (exit status 2)."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``PROG: error: MESSAGE``.

    argparse prints the usage before the error; the usage is one ``--help`` away and
    would bury the one thing that went wrong. Subparsers inherit the class.
    """

    def error(self, message: str) -> NoReturn:
        # "argument --bits: ..." -> "--bits: ...": the flag is what the user typed.
        message = message.removeprefix("argument ")
        self.exit(USAGE_ERROR, f"{self.prog}: error: {one_line(message)}\n")


def one_line(message: str) -> str:
    """``message`` with its line breaks folded into spaces (every error is one line)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _number(text: str, kind: Callable[[str], float]) -> float:
    try:
        value = kind(text)
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number within ``[low, high]`` (no upper bound when ``high`` is None)."""

    def parse(text: str) -> int:
        value = int(_number(text, int))
        if value < low or (high is not None and value > high):
            wanted = f">= {low}" if high is None else f"within {low}-{high}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {wanted}")
        return value

    parse.__name__ = "integer"
    return parse


def choice_of(*values: int) -> Callable[[str], int]:
    """An argparse type: one of the whole numbers ``values``."""

    def parse(text: str) -> int:
        value = int(_number(text, int))
        if value not in values:
            listed = ", ".join(str(v) for v in values[:-1]) + f" or {values[-1]}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {listed}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number within ``[low, high]`` (``(low, high]`` with ``low_open``)."""

    def parse(text: str) -> float:
        value = float(_number(text, float))
        if value < low or (low_open and value == low) or (high is not None and value > high):
            if high is None:
                wanted = f"> {low:g}" if low_open else f">= {low:g}"
            else:
                wanted = f"within {'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{text!r} must be {wanted}")
        return value

    parse.__name__ = "number"
    return parse


positive_int = int_in(1)

#: Decimal and binary units; a bare K, M or G is refused as ambiguous.
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_salient(text: str) -> tuple[float, int | None]:
    """Read a salient setting as ``(salient, salient_channels)`` for :class:`CompressionSettings`.

    ``"1%"`` -> ``(0.01, None)``, ``"100%"`` -> ``(1.0, None)`` (every channel),
    ``"8"`` -> ``(0.0, 8)`` (eight channels). A percentage lies within [0, 100];
    a count is a whole number >= 0.

    Raises
    ------
    ValueError
        For anything else (``"nan"``, ``"inf"``, ``"-1"``, ``"0.5"``, ``"150%"``).
    """
    text = text.strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise ValueError(f"{text!r} is not a percentage such as '1%'") from None
        if not math.isfinite(percent):
            raise ValueError(f"{text!r} is not a finite number")
        if not 0 <= percent <= 100:
            raise ValueError(f"{text!r} must be within 0%-100%")
        return percent / 100, None
    try:
        count = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{text!r} is not a finite number") from None
        raise ValueError(f"{text!r} is neither a percentage such as '1%' nor a whole number of channels") from None
    if count < 0:
        raise ValueError(f"{text!r} must be >= 0 channels")
    return 0.0, count


def parse_size(text: str) -> int:
    """Bytes from ``"134217728"``, ``"64MB"`` (64 * 10^6), ``"64MiB"`` (64 * 2^20), ``"1GiB"`` ...

    Raises
    ------
    ValueError
        Not a size, an unknown unit, or not a positive whole number of bytes.
    """
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size (bytes, or a number with KB, MB, GB, KiB, MiB, GiB)")
    value = float(match.group(1)) * _SIZE_UNITS[unit]
    if value < 1 or value != int(value):
        raise ValueError(f"{text!r} is not a positive whole number of bytes")
    return int(value)


def size(text: str) -> int:
    """An argparse type: :func:`parse_size`."""
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def size_or_zero(text: str) -> int:
    """An argparse type: ``"0"`` or a size (:func:`parse_size`)."""
    return 0 if text.strip() == "0" else size(text)


def salient(text: str) -> tuple[float, int | None]:
    """An argparse type: ``"1%"`` -> ``(0.01, None)``, ``"8"`` -> ``(0.0, 8)``; see ``parse_salient``."""
    try:
        return parse_salient(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def existing_path(text: str) -> str:
    """An argparse type: a file or directory that exists."""
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return text


def existing_dir(text: str) -> str:
    """An argparse type: a directory that exists."""
    existing_path(text)
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return text


def existing_file(text: str) -> str:
    """An argparse type: a regular file that exists."""
    existing_path(text)
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a file")
    return text


def report_error(prog: str, error: BaseException) -> None:
    """Print ``error`` as the one line ``PROG: error: MESSAGE`` on stderr."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        message = f"{error.filename}: {error.strerror}"  # not "[Errno 2] No such file ...: 'x'"
    else:
        message = one_line(str(error)) or type(error).__name__
    sys.stderr.write(f"{prog}: error: {one_line(message)}\n")
    sys.stderr.flush()


__all__ = ["INPUT_ERROR", "USAGE_ERROR", "OneLineArgumentParser", "UsageError", "choice_of", "existing_dir",
           "existing_file", "existing_path", "float_in", "int_in", "one_line", "parse_size", "positive_int",
           "report_error", "salient", "size"]
