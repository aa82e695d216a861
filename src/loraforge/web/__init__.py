"""The web platform: static pages served by the API process at ``/`` (no build step, no CDN).

The pages are plain HTML + ES modules (``static/js``) with vendored Preact, htm and uPlot
(``static/vendor``); they talk to the same OpenAI-shaped ``/v1`` API as the SDK, with the API key
the user signs in with.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"

# The shell must never be cached: it names the module files, which change between releases.
_NO_CACHE = {"cache-control": "no-cache"}


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
