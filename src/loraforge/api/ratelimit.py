"""The plans' request limits on ``/v1``, and a lock-out for addresses that guess keys.

For every ``/v1`` request with a bearer key, before any route runs:

1. An address that sent more than ``auth_failures_per_minute`` unknown keys in the last minute
   gets a 429 for every request with a key until the minute has passed, without the key being
   looked up: guessing stops paying (before, 100 wrong keys took 0.6 s and nothing slowed down).
2. The key is looked up (:class:`~loraforge.api.auth.KeyCache`). An unknown key is counted against
   its address and the request goes on to the route, whose dependency answers the 401.
3. The organization's requests in the current window are counted (requests/minute); over the
   limit, a 429 in OpenAI's envelope (``type: "requests"``, ``code: "rate_limit_exceeded"``)
   with ``Retry-After``, which the openai SDK waits before retrying.
4. It takes one of the organization's concurrent-request slots for as long as the response lasts
   (a chat stream included); with none free, a 429 with ``Retry-After: 1``.

Every response to an authenticated request carries OpenAI's ``x-ratelimit-limit-requests``,
``x-ratelimit-remaining-requests`` and ``x-ratelimit-reset-requests`` (when the org has a
requests/minute limit). A pure ASGI middleware, not ``BaseHTTPMiddleware``: it adds no task or
stream per request, and it holds the slot until the last byte of a streamed response.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraforge.api.auth import Caller
from loraforge.api.deps import CALLER_STATE, Services, bearer_key
from loraforge.api.throttle import Decision, Throttle, duration
from loraforge.contracts.envelope import error_body
from loraforge.errors import RateLimitError

Headers = list[tuple[bytes, bytes]]


async def _answer(send: Send, error: RateLimitError, headers: Headers) -> None:
    body = json.dumps(error_body(error.message, error.error_type, error.param, error.code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers") or []:
        if key == name:
            return str(value.decode("latin-1"))
    return ""


class RateLimitMiddleware:
    """See the module docstring. Reads the app's ``Services`` (built in the lifespan)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = bearer_key(_header(scope, b"authorization")) if scope["type"] == "http" else None
        services: Services | None = getattr(scope["app"].state, "services", None) if key else None
        if key is None or services is None or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        throttle = services.throttle
        address = (scope.get("client") or ("unknown", 0))[0]
        if throttle is not None and (wait := await throttle.auth_lockout(address)) is not None:
            error = RateLimitError(
                f"Too many requests with an incorrect API key from your address (more than "
                f"{throttle.auth_failures_per_minute} a minute); try again in {duration(wait)}.",
                code="too_many_authentication_failures",
            )
            await _answer(send, error, [(b"retry-after", str(int(wait + 0.999)).encode())])
            return
        caller = await services.keys.caller(key)
        if caller is None:
            if throttle is not None:
                await throttle.auth_failed(address)
            await self.app(scope, receive, send)  # the route's dependency answers the 401
            return
        scope.setdefault("state", {})[CALLER_STATE] = caller
        if throttle is None:
            await self.app(scope, receive, send)
            return
        await self._limited(scope, receive, send, throttle, caller)

    async def _limited(
        self, scope: Scope, receive: Receive, send: Send, throttle: Throttle, caller: Caller
    ) -> None:
        limits, org = caller.limits, caller.org
        headers: Headers = []
        rpm = limits.requests_per_minute
        if rpm is not None:
            if rpm <= 0:
                error = RateLimitError(
                    f"Your organization ({org.name}) may not make requests now (its limit is 0 "
                    "requests per minute). Contact the operator of this service."
                )
                await _answer(send, error, [(b"x-should-retry", b"false")])
                return
            decision = await throttle.hit_requests(org.id, rpm)
            headers = decision.headers() if decision is not None else []
            if decision is not None and not decision.allowed:
                await _answer(send, _over_rpm(org.name, rpm, decision), _retry(headers, decision.retry_after))
                return
        token = None
        if limits.max_concurrent_requests is not None:
            token = await throttle.slots.acquire(org.id, limits.max_concurrent_requests)
            if token is None:
                error = RateLimitError(
                    f"Your organization ({org.name}) has {limits.max_concurrent_requests} requests in "
                    "progress, the most its plan allows at once. Wait for one to finish and retry."
                )
                await _answer(send, error, _retry(headers, 1))
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and headers:
                message["headers"] = [*message.get("headers", []), *headers]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            if token is not None:
                await throttle.slots.release(org.id, token)


def _over_rpm(org_name: str, rpm: int, decision: Decision) -> RateLimitError:
    return RateLimitError(
        f"Rate limit reached for requests of your organization ({org_name}): limit {rpm} per "
        f"minute, {decision.limit} per window. Please try again in {duration(decision.reset_seconds)}."
    )


def _retry(headers: Headers, seconds: int) -> Headers:
    return [*headers, (b"retry-after", str(seconds).encode())]
