"""Where experts live: the expert store and its tiers (disk, host and, on CUDA builds, device).

``ExpertStore`` (the binding of ``include/meswitch/store.hpp``) holds the compressed experts
of one base within byte budgets, loads and evicts them, and leases them to the model;
``DeviceTier`` keeps experts on the GPU under the same eviction rule; ``plan_capacity``
counts how many experts fit beside a base (``meswitch plan``). Names are imported on first
use, so importing the package costs nothing.
"""

from __future__ import annotations

from meswitch.lazy import lazy_getattr

_LAZY = {
    "ExpertStore": ("meswitch.store.expert_store", "ExpertStore"),
    "HeldExpert": ("meswitch.store.expert_store", "HeldExpert"),
    "DeviceTier": ("meswitch.store.device_tier", "DeviceTier"),
    "ExpertFormat": ("meswitch.store.capacity", "ExpertFormat"),
    "plan_capacity": ("meswitch.store.capacity", "plan_capacity"),
}

__all__ = list(_LAZY)

__getattr__ = lazy_getattr("meswitch.store", _LAZY, globals())
