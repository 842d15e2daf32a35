"""Serving many experts of one base: the engine (``serve.engine``) and the OpenAI server (``serve.server``).

The experts themselves are held by :class:`meswitch.store.ExpertStore`. ``MultiExpertModel`` runs one forward over a flattened batch whose
sequences belong to different experts (paged KV cache, fused delta kernels); ``Engine``
batches many concurrent requests continuously over that model (``SamplingParams``,
``RequestHandle``, ``RequestEvent``); ``generate`` answers one request alone. Names are
imported on first use, so importing the package costs nothing.
"""

from __future__ import annotations

from meswitch.lazy import lazy_getattr

_LAZY = {
    "MultiExpertModel": ("meswitch.serve.engine.model_runner", "MultiExpertModel"),
    "SequenceInput": ("meswitch.serve.engine.model_runner", "SequenceInput"),
    "PagedKVCache": ("meswitch.serve.engine.kv_cache", "PagedKVCache"),
    "KVCacheFull": ("meswitch.serve.engine.kv_cache", "KVCacheFull"),
    "generate": ("meswitch.serve.engine.generate", "generate"),
    "Engine": ("meswitch.serve.engine.engine", "Engine"),
    "EngineError": ("meswitch.serve.engine.engine", "EngineError"),
    "PromptTooLong": ("meswitch.serve.engine.engine", "PromptTooLong"),
    "ExpertUnavailable": ("meswitch.serve.engine.engine", "ExpertUnavailable"),
    "SamplingParams": ("meswitch.serve.engine.sampling", "SamplingParams"),
    "RequestHandle": ("meswitch.serve.engine.request", "RequestHandle"),
    "RequestEvent": ("meswitch.serve.engine.request", "RequestEvent"),
    "RequestResult": ("meswitch.serve.engine.request", "RequestResult"),
}

__all__ = list(_LAZY)

__getattr__ = lazy_getattr("meswitch.serve", _LAZY, globals())
