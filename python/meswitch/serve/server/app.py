"""The OpenAI-compatible HTTP server: a FastAPI app over an engine, its expert store and a router.

Endpoints (with an API key set, every ``/v1`` one wants ``Authorization: Bearer KEY``):

=============================  ===========================================================
``POST /v1/chat/completions``  chat, plain or streamed (``completions.py``)
``POST /v1/completions``       text completion, plain or streamed
``GET  /v1/models``            each expert, ``auto`` (with a router) and ``base``
``POST /v1/experts``           ``{"path": "NAME.meswitch"}``: serve one more expert (201, its card)
``DELETE /v1/experts/{name}``  stop serving it (409 while requests use it)
``GET  /health``               200 ``{"status": "ok", ...}`` while the engine runs
``GET  /metrics``              Prometheus text format (``metrics.py``)
=============================  ===========================================================

Errors are OpenAI-style JSON bodies (``errors.py``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meswitch import __version__
from meswitch.serve.server.auth import require_api_key
from meswitch.serve.server.catalog import ModelCatalog
from meswitch.serve.server.completions import Completions, ServingContext
from meswitch.serve.server.errors import install_error_handlers
from meswitch.serve.server.metrics import ServerMetrics
from meswitch.serve.server.protocol import (
    AddExpertRequest,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)


class _CountErrors:
    """ASGI middleware counting every response of status >= 400 in ``meswitch_request_errors_total``.

    Plain ASGI, not Starlette's ``BaseHTTPMiddleware``, which would buffer streams and hide a
    client's disconnect from them.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.request_errors.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def _context_length(engine: Any) -> int:
    model = getattr(engine, "model", None)
    config = getattr(model, "config", None)
    length = getattr(config, "max_position_embeddings", None)
    if not isinstance(length, int):
        raise TypeError("context_length: the engine's model does not say its context length; pass it")
    return length


def create_app(engine: Any, store: Any, router: Any = None, *, api_key: str | None = None,
               context_length: int | None = None) -> FastAPI:
    """The server's ASGI app.

    Parameters
    ----------
    engine
        A started :class:`meswitch.serve.engine.engine.Engine` over ``store``; the app does not
        close it (whoever made it does, after the server stops).
    store
        The engine's :class:`~meswitch.store.expert_store.ExpertStore`: the experts served, added
        and removed at run time.
    router
        A :class:`~meswitch.route.router.Router` for ``model: "auto"``, or None.
    api_key
        When set, every ``/v1`` endpoint wants ``Authorization: Bearer api_key``.
    context_length
        The model's context in tokens (default: the engine model's ``max_position_embeddings``);
        a chat request without ``max_tokens`` may generate up to it.

    Returns
    -------
    fastapi.FastAPI
    """
    catalog = ModelCatalog(store, router)
    metrics = ServerMetrics(engine.stats, store.memory_report)
    context = ServingContext(engine, catalog, metrics,
                             context_length if context_length is not None else _context_length(engine))
    completions = Completions(context)

    app = FastAPI(title="meswitch", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.meswitch = context
    install_error_handlers(app)
    app.add_middleware(_CountErrors, metrics=metrics)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key(api_key))])

    @v1.post("/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
        return await completions.chat(request, body)

    @v1.post("/completions")
    async def text_completions(request: Request, body: CompletionRequest) -> Any:
        return await completions.completion(request, body)

    @v1.get("/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=created) for name, created in catalog.models()])

    @v1.post("/experts", status_code=201)
    async def add_expert(body: AddExpertRequest) -> ModelCard:
        name = await run_in_threadpool(catalog.add, body.path)  # the store checks the artifact against the base
        created = dict(catalog.models())[name]
        return ModelCard(id=name, created=created)

    @v1.delete("/experts/{name}")
    async def remove_expert(name: str) -> JSONResponse:
        await run_in_threadpool(catalog.remove, name)  # the store frees the expert's memory
        return JSONResponse({"id": name, "object": "model", "deleted": True})

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = engine.stats()
        return JSONResponse({"status": "ok", "experts": catalog.experts(), "waiting": stats["waiting"],
                             "running": stats["running"]})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


__all__ = ["create_app"]
