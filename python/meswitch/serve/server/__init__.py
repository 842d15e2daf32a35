"""The OpenAI-compatible server over the engine (``meswitch serve``, FastAPI + uvicorn).

``app.py`` (routes), ``protocol.py`` (request and response models), ``completions.py``
(requests through the engine, plain and streamed), ``catalog.py`` (models served, ``auto``
routing, experts added and removed at run time), ``chat.py`` (chat templates), ``errors.py``,
``auth.py``, ``metrics.py`` (Prometheus), ``launch.py`` and ``cli.py`` (start and stop),
``bundled.py`` (the bundled family's cache).
"""
