"""Module attributes imported on first use, so packages import light."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(module: str, table: dict[str, tuple[str, str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving ``table``: attribute name -> (module, attribute there).

    Each value is imported on first access and cached in ``module``'s globals.
    """

    def getattr_(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        module_name, attribute = table[name]
        value = getattr(importlib.import_module(module_name), attribute)
        vars(importlib.import_module(module))[name] = value
        return value

    return getattr_
