"""How the kernels' callers give a compressed delta: its stored pieces, bits, group size and shape.

A delta is a mapping of its pieces (names ending in ``codes``, ``scales``, ... as
``_core.DELTA_PIECES`` lists them, plus ``bits`` and ``group_size``) or an ``(artifact,
weight)`` pair; :mod:`meswitch.ops` (CPU) and :mod:`meswitch.cuda` (GPU) both read it here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meswitch import _core

#: The stored pieces of a compressed delta, in their stored order (from the C++ type).
PIECES = tuple(piece for piece, _ in _core.DELTA_PIECES)


def delta_pieces(delta: Any, bits: int | None, group_size: int | None) -> tuple[list[Any], int, int]:
    """The five arrays, bits and group size of ``delta`` (a mapping or ``(artifact, weight)``)."""
    entry: Mapping[str, Any] = {}
    if isinstance(delta, tuple) and len(delta) == 2 and hasattr(delta[0], "stored"):
        artifact, weight = delta
        entry = artifact.tensors[weight]
        if entry.get("kind") != "delta":
            raise ValueError(f"tensor '{weight}' is stored as '{entry.get('kind')}', not as a delta")
        arrays = [artifact.stored(f"{weight}.{key}") for key in PIECES]
    elif isinstance(delta, Mapping):
        entry = delta
        arrays = []
        for key in PIECES:
            matches = [name for name in delta if name == key or str(name).endswith("." + key)]
            if len(matches) != 1:
                found = matches or "none"
                raise ValueError(f"delta pieces: expected exactly one '{key}' entry, found {found}")
            arrays.append(delta[matches[0]])
    else:
        kind = type(delta).__name__
        raise TypeError(f"delta must be a mapping of pieces or an (artifact, weight) pair, got {kind}")
    bits = bits if bits is not None else entry.get("bits")
    group_size = group_size if group_size is not None else entry.get("group_size")
    if bits is None or group_size is None:
        raise ValueError("bits and group_size are required (pass them or include them in the delta mapping)")
    return arrays, int(bits), int(group_size)


def delta_info(delta: Any, arrays: list[Any], bits: int) -> tuple[int, int, str]:
    """``(rows, cols, name)`` of a delta given as :func:`delta_pieces` takes it."""
    rows = int(arrays[0].shape[0])
    if isinstance(delta, tuple) and len(delta) == 2 and hasattr(delta[0], "stored"):
        entry, name = delta[0].tensors[delta[1]], str(delta[1])
    else:
        entry, name = delta, ""
    cols = entry.get("cols")
    # words per row hold whole codes for every width the GPU takes (cols a multiple of 64)
    return rows, int(cols) if cols is not None else int(arrays[0].shape[1]) * 32 // bits, name
