"""Response headers that protect the web platform and the API's answers in a browser.

Every response gets ``X-Content-Type-Options: nosniff`` (a downloaded training file is never
run as a script or page), ``X-Frame-Options: DENY`` and ``Referrer-Policy: no-referrer``. The
web pages (``/`` and ``/static``) get the platform's Content-Security-Policy
(``web.content_security_policy``); every other answer (JSON, downloads) ``default-src 'none'``:
none of them is a page that should load anything. Swagger UI and ReDoc, when the operator turns
them on (``LORAFORGE_API_DOCS``), load their scripts from a CDN and are left without a policy.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraforge.web import content_security_policy

_ALWAYS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}
_NOT_A_PAGE = "default-src 'none'; frame-ancestors 'none'"
_DOCS_PATHS = ("/docs", "/redoc")


class SecurityHeadersMiddleware:
    """Add the headers above to every HTTP response (pure ASGI: streaming bodies pass through)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.page_policy = content_security_policy()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == "/" or path.startswith("/static/"):
            policy: str | None = self.page_policy
        elif path.startswith(_DOCS_PATHS):
            policy = None
        else:
            policy = _NOT_A_PAGE

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _ALWAYS.items():
                    headers.setdefault(name, value)
                if policy is not None:
                    headers.setdefault("content-security-policy", policy)
            await send(message)

        await self.app(scope, receive, with_headers)
