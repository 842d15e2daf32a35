"""Errors as OpenAI-style JSON bodies with the right status.

Every error the server answers has the body ``{"error": {"message", "type", "param",
"code"}}``: a request that fails validation is a 400 (not FastAPI's 422) whose ``param``
names the field, e.g. ``messages.0.role``, and whose message starts with it; a malformed
JSON body is a 400 too; an unknown path is a 404; anything unexpected is a 500 whose
message names the exception, and the server goes on serving.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from meswitch.serve.server.protocol import ErrorBody, ErrorDetail

logger = logging.getLogger("meswitch.serve")

class APIError(Exception):
    """An error answered as ``status`` with an OpenAI-style body.

    Parameters
    ----------
    status
        The HTTP status.
    message
        What went wrong, for the client.
    param
        The request field at fault, if one is.
    code
        A machine-readable code (``model_not_found``, ``invalid_api_key`` ...).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body of the response."""
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body for ``status``: type ``invalid_request_error`` for the client's faults, else ``server_error``."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    detail = ErrorDetail(message=message, type=kind, param=param, code=code)
    return ErrorBody(error=detail).model_dump()


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    """``error`` as a response."""
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _field(location: Sequence[Any]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages.0.role"``; pydantic's union branch names dropped."""
    parts = [str(part) for part in location[1:] if not _is_union_branch(part)] if location else []
    return ".".join(parts) or None


def _is_union_branch(part: Any) -> bool:
    # pydantic names the union member it tried (``str``, ``list[int]``, ``function-after[...]``)
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none")
                                      or "[" in part or part.startswith("function-"))


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """One 400 for pydantic's validation ``errors``: the first field at fault, named."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    kind = first.get("type", "")
    if kind == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON{f' ({reason})' if reason else ''}",
                        code="invalid_json")
    field = _field(first.get("loc", ()))
    if kind == "missing" and field is None:
        return APIError(400, "the request needs a JSON body", code="invalid_request")
    if field is None and (kind == "model_attributes_type" or kind.endswith("_type")):
        return APIError(400, "the request body must be a JSON object (sent as Content-Type: application/json)",
                        code="invalid_json")
    alternatives = _union_alternatives(first, errors)
    if len(alternatives) > 1:  # a field of several forms (content, prompt, stop): say what each one wanted
        shown = [f"{_field(e['loc'])}: {_message(e)}" for e in alternatives[:4]]
        return APIError(400, "; or ".join(dict.fromkeys(shown)), param=field, code="invalid_value")
    return APIError(400, f"{field}: {_message(first)}" if field else _message(first), param=field,
                    code="invalid_value")


def _message(error: dict[str, Any]) -> str:
    if error.get("type") == "extra_forbidden":
        return "unknown field (not supported by this server)"
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


def _union_alternatives(first: dict[str, Any], errors: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The errors of every branch of the union ``first`` failed in (just ``first`` when it is no union)."""
    location = tuple(first.get("loc", ()))
    branch = next((i for i, part in enumerate(location) if _is_union_branch(part)), None)
    if branch is None:
        return [first]
    prefix = location[:branch]
    return [e for e in errors if tuple(e.get("loc", ()))[:branch] == prefix
            and len(e.get("loc", ())) > branch and _is_union_branch(e["loc"][branch])]


async def _on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(error.errors()))


async def _on_api_error(request: Request, error: APIError) -> JSONResponse:
    return error_response(error)


async def _on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    if error.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(error.detail)
    return error_response(APIError(error.status_code, message), headers=getattr(error, "headers", None))


async def _on_unexpected_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unexpected error answering %s %s", request.method, request.url.path)
    return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}", code="internal_error"))


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` in OpenAI's format (see the module docstring)."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)


__all__ = ["APIError", "error_body", "error_response", "install_error_handlers", "validation_error"]
