"""The engine: requests batched continuously over one multi-expert model.

``engine.py`` (the step loop), ``request.py``, ``scheduler.py``, ``sampling.py``,
``detokenizer.py`` and ``tokenizer.py`` handle requests; ``model_runner.py`` runs one forward
over a batch whose sequences belong to different experts, with ``experts.py`` (an expert's
artifact applied to the model), ``base_weights.py`` and ``base_matmul.py`` (the 16-bit base),
``attention.py``, ``kv_cache.py`` and ``rope.py``; ``residency.py`` loads and holds the experts
the scheduler admits. The public names are re-exported by :mod:`meswitch.serve`.
"""
