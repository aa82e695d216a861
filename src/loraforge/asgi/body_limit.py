"""Refuse a request body over a byte limit before it is parsed, with a 413 in OpenAI's envelope.

Starlette (and FastAPI's ``max_body_size``) can limit bodies too, but its refusal outside a route
is a plain-text 413, not the envelope every client of this service parses, and it cannot exempt
the upload routes, which have larger limits of their own. Add this middleware before the app's
others (so it is the innermost): a ``BaseHTTPMiddleware`` between it and the routes would wrap
its refusal in an exception group that FastAPI turns into a 400.

A declared ``Content-Length`` over the limit is refused before anything is read; a chunked body
is counted as it arrives and refused once it passes the limit (by the route's error handler when
a route was reading it). A refused declared body is read and thrown away (never buffered) up to
:data:`DRAIN_CAP_BYTES` before the 413 goes out, because a server that closes the connection
while the client is still sending makes the client see a reset instead of the 413 (and the
``openai`` SDK would retry the request).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraforge.contracts.envelope import error_body

# Past this much, the connection is closed instead of read to the end.
DRAIN_CAP_BYTES = 256 * 1024 * 1024
CODE = "request_too_large"


def _message(limit: int) -> str:
    return (
        f"The request body is larger than this server's limit of {limit} bytes "
        "(LORAFORGE_MAX_REQUEST_BYTES). Send a smaller request."
    )


class _TooLarge(HTTPException):
    # An HTTPException so that FastAPI's body parsing lets it through (it turns other errors
    # into a 400); the apps' handlers answer it with its message and code.
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=_message(limit))
        self.param = None
        self.code = CODE


def too_large_body(limit: int) -> bytes:
    """The 413 envelope for a body over ``limit`` bytes."""
    return json.dumps(error_body(_message(limit), "invalid_request_error", None, CODE)).encode()


class BodyLimitMiddleware:
    """Limit every HTTP request body to ``limit`` bytes, except on paths ``exempt`` says have
    their own limit (uploads).

    Args:
        app: the wrapped ASGI app.
        limit: the most bytes a body may have.
        exempt: ``exempt(method, path)`` is true for requests the limit does not apply to.
    """

    def __init__(self, app: ASGIApp, *, limit: int, exempt: Callable[[str, str], bool] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.exempt and self.exempt(scope["method"], scope["path"])):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await self._refuse(receive, send, already=0)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if started:  # a streaming response had begun: nothing sensible left to send
                raise
            await self._refuse(receive, send, already=seen)

    async def _refuse(self, receive: Receive, send: Send, *, already: int) -> None:
        more = True
        while more and already <= DRAIN_CAP_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                break
            already += len(message.get("body", b""))
            more = bool(message.get("more_body"))
        body = too_large_body(self.limit)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if more:  # gave up reading: tell the client the connection ends here
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
