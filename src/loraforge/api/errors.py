"""The one mapping from errors to OpenAI's envelope ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraforge.errors import LoraforgeError

log = logging.getLogger(__name__)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _loc_to_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    # pydantic unions add the member name (e.g. "int", "literal['auto']") to the location.
    parts = [
        p
        for p in parts
        if not p.startswith(("literal[", "constrained-", "function-"))
        and p not in ("int", "float", "str", "bool", "dict", "list")
    ]
    return ".".join(parts) or None


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
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "Invalid request"}
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "Invalid request"))
    if first.get("type") == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "json_invalid":
        msg = "We could not parse the JSON body of your request."
        param = None
    else:
        msg = f"Invalid value for '{param}': {msg}" if param else msg
    return JSONResponse(error_body(msg, "invalid_request_error", param, None), status_code=400)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "Request failed"
    if exc.status_code == 404:
        message = "Unknown request URL. Please check the URL and method."
    return JSONResponse(
        error_body(message, "invalid_request_error", None, None),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(
        error_body("The server had an error while processing your request.", "server_error"),
        status_code=500,
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LoraforgeError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
