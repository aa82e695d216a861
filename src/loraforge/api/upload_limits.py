"""Refuse an upload whose ``Content-Length`` is over its limit before its body is read.

A pure ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``) wraps
every request of every route in a task group and a memory stream, which under load cost more
than the routes themselves. The services count the bytes they store too (a request may have no
``Content-Length``, or lie).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from loraforge.contracts.envelope import error_body


class ContentLengthLimit:
    """413 in the envelope for a POST to a path ``matches`` accepts whose body is over ``limit``.

    Args:
        app: the wrapped app.
        matches: which paths the limit applies to.
        limit: the most bytes the body may have.
        message: the error message.
        param: the error's ``param``.
    """

    def __init__(
        self, app: ASGIApp, *, matches: Callable[[str], bool], limit: int, message: str, param: str
    ) -> None:
        self.app = app
        self.matches = matches
        self.limit = limit
        self.body = json.dumps(error_body(message, "invalid_request_error", param, "file_too_large")).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self.matches(scope["path"]):
            length = next((v for k, v in scope.get("headers") or [] if k == b"content-length"), b"")
            if length.isdigit() and int(length) > self.limit:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 413,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(self.body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": self.body})
                return
        await self.app(scope, receive, send)
