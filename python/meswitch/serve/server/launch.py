"""Put a server together from paths (store, model, engine, router, app) and run it on a socket.

``meswitch serve`` (``cli.py``) is :func:`open_service` + :func:`bind` + :func:`run`; a test or
a benchmark that wants the server in its own process uses the same pieces.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The KV cache's default byte budget (keys and values of every layer, in the base's dtype).
DEFAULT_KV_CACHE_BYTES = 256 << 20


@dataclass
class Service:
    """A running engine over its store and model, with the router and the app serving them.

    ``close()`` stops the engine (pending requests end with ``finish_reason`` "abort").
    """

    store: Any
    model: Any
    engine: Any
    router: Any
    app: Any
    experts: list[str] = field(default_factory=list)

    def close(self) -> None:
        """Stop the engine's loop."""
        self.engine.close()


def open_router(path: str | os.PathLike[str] | None, experts: Sequence[str]) -> tuple[Any, str]:
    """The router for ``auto`` and a line saying which, for ``--router PATH`` (None: the bundled one).

    The bundled router is used only when the served experts include every expert it routes
    to; otherwise ``auto`` is not offered. A router given by path must fit the experts.

    Raises
    ------
    meswitch.FormatError
        ``path`` is not a router, or routes to experts not served (the message names them).
    """
    from meswitch import _core
    from meswitch.route.router import Router

    if path is not None:
        router = Router(path, experts=experts)
        return router, f"router {router.path}: {', '.join(router.labels)} (fallback {router.fallback})"
    try:
        router = Router(None, experts=experts)
    except _core.FormatError:
        return None, "no router (the bundled one routes to experts not served): model 'auto' is not offered"
    return router, f"bundled router: {', '.join(router.labels)} (fallback {router.fallback})"


def open_service(base: str | os.PathLike[str], artifacts: Sequence[str | os.PathLike[str]], *,
                 router: str | os.PathLike[str] | None = None, host_budget: int | str = "8GB",
                 kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES, max_running: int = 32,
                 max_batch_tokens: int = 2048, api_key: str | None = None, dtype: str = "auto",
                 report: Any = print) -> Service:
    """Open the store, add the experts, load the base, start the engine and make the app.

    Parameters
    ----------
    base
        The base model directory.
    artifacts
        The ``NAME.meswitch`` artifact directories to serve.
    router
        A router directory, or None for the bundled one where it fits (see :func:`open_router`).
    host_budget
        The store's host-memory budget (bytes or a size such as ``"8GB"``).
    kv_cache_bytes
        The paged KV cache's budget in bytes.
    max_running, max_batch_tokens
        The engine's batch limits: sequences per forward, new tokens per forward.
    api_key
        Guards every ``/v1`` endpoint when set.
    dtype
        The dtype of the base's matrices and the KV cache: ``"auto"`` (the checkpoint's own)
        or a name in :data:`meswitch.serve.engine.base_weights.DTYPE_NAMES`.
    report
        Where progress lines go.

    Raises
    ------
    meswitch.FormatError
        An artifact is malformed or was compressed against another base; the router does not fit.
    ValueError
        Two artifacts of one name, a reserved name, a bad budget, a dtype not accepted.
    """
    from meswitch.serve.engine.engine import Engine
    from meswitch.serve.engine.model_runner import MultiExpertModel
    from meswitch.serve.server.app import create_app
    from meswitch.serve.server.catalog import check_expert_name, manifest_name
    from meswitch.store.expert_store import ExpertStore

    store = ExpertStore(base, host_budget=host_budget)
    names = []
    for artifact in artifacts:
        name = manifest_name(Path(artifact))
        try:
            check_expert_name(name)
        except ValueError as error:
            raise ValueError(f"{artifact}: {error}") from None
        if name is not None and name in names:
            raise ValueError(f"{artifact}: a second expert named '{name}'")
        names.append(store.add(artifact))
        report(f"expert {names[-1]}: {artifact}")
    chosen_router, router_line = open_router(router, names)
    report(router_line)
    report(f"loading base {base}")
    model = MultiExpertModel(base, store, kv_cache_bytes=kv_cache_bytes, dtype=dtype)
    report(f"base held in {str(model.dtype).removeprefix('torch.')}, KV cache {model.cache.num_blocks} blocks "
           f"of {model.cache.block_size} tokens")
    engine = Engine(model, store, max_running=max_running, max_batch_tokens=max_batch_tokens)
    engine.start()
    try:
        app = create_app(engine, store, chosen_router, api_key=api_key,
                         context_length=model.config.max_position_embeddings)
    except BaseException:
        engine.close()
        raise
    return Service(store, model, engine, chosen_router, app, names)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one).

    Bound here rather than by uvicorn so that a port in use is a one-line error before the
    model loads, and so that the URL printed carries the port actually bound.

    Raises
    ------
    OSError
        The address cannot be bound (the message names it).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://HOST:PORT`` of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_server(app: Any, *, log_level: str = "warning", access_log: bool = False) -> Any:
    """A ``uvicorn.Server`` for ``app``; ``server.run(sockets=[bind(...)])`` serves until told to stop."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5,
                            lifespan="off")
    return uvicorn.Server(config)


def serve_until_stopped(server: Any, sock: socket.socket) -> int | None:
    """Run ``server`` on ``sock`` until SIGINT or SIGTERM; returns the signal that stopped it (None: none).

    uvicorn stops gracefully on either signal and then raises it again for the handler that
    was in place before it started, which by default would kill the process (SIGTERM) or
    raise ``KeyboardInterrupt`` (SIGINT) before the engine is closed. The handler in place
    here only records the signal, so the caller closes the engine and exits normally.
    """
    received: list[int] = []
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda sig, frame: received.append(sig)) for sig in handled}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return received[0] if received else None


__all__ = ["DEFAULT_KV_CACHE_BYTES", "Service", "bind", "open_router", "open_service", "serve_until_stopped",
           "url_of", "uvicorn_server"]
