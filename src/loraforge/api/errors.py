"""The API's one mapping from errors to OpenAI's envelope ``{"error": {message, type, param, code}}``.

The envelope and the reading of a failed validation are ``loraforge.contracts.envelope``'s, shared
with the engine so both report the same ``param``; ``error_body`` is re-exported for the API's
middleware that answers before a route runs.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from loraforge.contracts.envelope import error_body, validation_error
from loraforge.errors import LoraforgeError

log = logging.getLogger(__name__)

# The ``code`` of errors Starlette raises itself (every error carries a code).
HTTP_CODES = {
    400: "invalid_request",
    404: "unknown_url",
    405: "method_not_allowed",
    413: "request_too_large",
}


async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LoraforgeError)
    headers = {"x-should-retry": "false"} if exc.status_code >= 500 else None
    return JSONResponse(
        error_body(exc.message, exc.error_type, exc.param, exc.code),
        status_code=exc.status_code,
        headers=headers,
    )


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    msg, param, code = validation_error(exc.errors())
    return JSONResponse(error_body(msg, "invalid_request_error", param, code), status_code=400)


def _allowed_methods(request: Request) -> str:
    # Starlette's 405 names the methods of the first route whose path matched; the URL's other
    # routes (GET and POST /v1/files are two) belong in ``Allow`` too. The OpenAPI document's
    # most specific path template for the URL says which (``/v1/models/{model}/export`` over
    # ``/v1/models/{model}``, whose ``model`` may hold slashes).
    best: tuple[int, dict[str, Any]] | None = None
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\\{[^/]*?\\\}", ".+", re.escape(template))
        if re.fullmatch(pattern, request.url.path):
            literal = len(re.sub(r"\{[^}]*\}", "", template))
            if best is None or literal > best[0]:
                best = (literal, operations)
    if best is not None:
        return ", ".join(method.upper() for method in best[1])
    allowed = []
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's own (unknown URL, wrong method, a body FastAPI could not parse) and
    # ``BadJSONValue``, which carries its own param and code.
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "Request failed"
    code = getattr(exc, "code", None) or HTTP_CODES.get(exc.status_code, "invalid_request")
    if exc.status_code == 404:
        message = "Unknown request URL. Please check the URL and method."
    headers = {k.lower(): v for k, v in (getattr(exc, "headers", None) or {}).items()}
    if exc.status_code == 405:
        message = "This URL does not accept that method. Please check the URL and method."
        headers["allow"] = _allowed_methods(request)
    return JSONResponse(
        error_body(message, "invalid_request_error", getattr(exc, "param", None), code),
        status_code=exc.status_code,
        headers=headers or None,
    )


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(
        error_body(
            "The server had an error while processing your request.", "server_error", None, "server_error"
        ),
        status_code=500,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Map domain errors, validation errors, HTTP errors and anything unexpected to the envelope."""
    app.add_exception_handler(LoraforgeError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


__all__ = ["error_body", "install_error_handlers"]
