"""Package attributes imported on first use, so importing a package costs nothing up front."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, table: dict[str, tuple[str, str]], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving ``name`` to ``getattr(import_module(module), attribute)``.

    ``table`` maps each name to its ``(module, attribute)``; a resolved value is stored in
    ``namespace`` (the package's globals) so later lookups skip the hook.
    """

    def __getattr__(name: str) -> Any:
        if name in table:
            module_name, attribute = table[name]
            value = getattr(importlib.import_module(module_name), attribute)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
