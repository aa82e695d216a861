"""The web platform: static pages served by the API process at ``/`` (no build step, no CDN).

The pages are plain HTML + ES modules (``static/js``) with vendored Preact, htm and uPlot
(``static/vendor``); they talk to the same OpenAI-shaped ``/v1`` API as the SDK, with the API key
the user signs in with.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"

_IMPORT_MAP = re.compile(r'<script type="importmap">(.*?)</script>', re.DOTALL)

# The shell must never be cached: it names the module files, which change between releases.
_NO_CACHE = {"cache-control": "no-cache"}


@cache
def content_security_policy() -> str:
    """The Content-Security-Policy the pages work under: everything from this origin only.

    The one inline script, the page's import map (browsers take no external import maps yet),
    is allowed by its hash, taken from ``index.html`` itself so the two cannot drift apart.
    Styles set from scripts (Preact's ``style`` objects, uPlot) go through the CSSOM, which
    ``style-src 'self'`` allows; the favicon is a ``data:`` URL.
    """
    shell = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(m.encode()).digest()).decode() + "'"
        for m in _IMPORT_MAP.findall(shell)
    )
    return (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )


def mount_web(app: FastAPI) -> None:
    """Serve the platform: ``GET /`` is the page shell, ``/static/*`` its assets.

    Only ``/`` and ``/static`` are claimed, so every other path (``/v1/*`` included) keeps the
    API's OpenAI error envelope for unknown URLs.

    Args:
        app: the API application to add the routes to.
    """

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=_NO_CACHE)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
