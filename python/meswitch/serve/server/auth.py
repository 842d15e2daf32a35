"""The API key: when one is set, every ``/v1`` endpoint wants ``Authorization: Bearer KEY``.

``/health`` and ``/metrics`` stay open (load balancers and Prometheus scrape them without
a key). The key is compared in constant time, so the time a wrong key takes to refuse
says nothing about how much of it was right.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request

from meswitch.serve.server.errors import APIError


def bearer_token(request: Request) -> str | None:
    """The token of the request's ``Authorization: Bearer TOKEN`` header, if it has one."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require_api_key(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency refusing (401) a request without ``api_key``; lets all through when it is None."""
    expected = None if api_key is None else api_key.encode("utf-8")

    async def check(request: Request) -> None:
        if expected is None:
            return
        token = bearer_token(request)
        if token is None:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.encode("utf-8"), expected):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    return check


__all__ = ["bearer_token", "require_api_key"]
