"""Serving many experts of one base: the expert store, the batched multi-expert model.

Names are imported on first use, so ``import meswitch.serve`` stays light.
"""

from __future__ import annotations

from meswitch._lazy import lazy_attributes

_LAZY = {
    "ExpertStore": ("meswitch.serve.store", "ExpertStore"),
    "HeldExpert": ("meswitch.serve.store", "HeldExpert"),
}

__all__ = list(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)
