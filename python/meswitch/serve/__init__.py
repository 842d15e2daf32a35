"""Serving many experts of one base: the expert store, the batched multi-expert model, the engine.

``ExpertStore`` holds compressed experts within byte budgets and moves them between disk
and host memory; ``MultiExpertModel`` runs one forward over a flattened batch whose
sequences belong to different experts (paged KV cache, fused delta kernels); ``Engine``
batches many concurrent requests continuously over that model (``SamplingParams``,
``RequestHandle``, ``RequestEvent``); ``generate`` answers one request alone. Names are
imported on first use, so importing the package costs nothing.
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
    "Engine": ("meswitch.serve.engine", "Engine"),
    "EngineError": ("meswitch.serve.engine", "EngineError"),
    "PromptTooLong": ("meswitch.serve.engine", "PromptTooLong"),
    "ExpertUnavailable": ("meswitch.serve.engine", "ExpertUnavailable"),
    "SamplingParams": ("meswitch.serve.sampling", "SamplingParams"),
    "RequestHandle": ("meswitch.serve.request", "RequestHandle"),
    "RequestEvent": ("meswitch.serve.request", "RequestEvent"),
    "RequestResult": ("meswitch.serve.request", "RequestResult"),
}

__all__ = list(_LAZY)

__getattr__ = lazy_getattr("meswitch.serve", _LAZY, globals())
