"""Serving many experts of one base: the expert store and the batched multi-expert model.

``ExpertStore`` holds compressed experts within byte budgets and moves them between disk
and host memory; ``MultiExpertModel`` runs one forward over a flattened batch whose
sequences belong to different experts (paged KV cache, fused delta kernels); ``generate``
answers one request. Names are imported on first use, so importing the package costs nothing.
"""

from __future__ import annotations

from meswitch.lazy import lazy_getattr

_LAZY = {
    "ExpertStore": ("meswitch.serve.store", "ExpertStore"),
    "HeldExpert": ("meswitch.serve.store", "HeldExpert"),
    "MultiExpertModel": ("meswitch.serve.model", "MultiExpertModel"),
    "SequenceInput": ("meswitch.serve.model", "SequenceInput"),
    "PagedKVCache": ("meswitch.serve.kv_cache", "PagedKVCache"),
    "KVCacheFull": ("meswitch.serve.kv_cache", "KVCacheFull"),
    "generate": ("meswitch.serve.generate", "generate"),
}

__all__ = list(_LAZY)

__getattr__ = lazy_getattr("meswitch.serve", _LAZY, globals())
