"""The API process: OpenAI's REST surface under ``/v1``. Never imports torch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import CapacityLimiter
from fastapi import APIRouter, FastAPI

from loraforge.api.auth import KeyCache
from loraforge.api.deps import Services
from loraforge.api.errors import install_error_handlers
from loraforge.api.idempotency import install_idempotency
from loraforge.api.openapi import install_openapi
from loraforge.api.ratelimit import RateLimitMiddleware
from loraforge.api.routes import (
    batches,
    chat_completions,
    files,
    fine_tuning_jobs,
    models,
    operations,
    organization,
    uploads,
    webhook_endpoints,
)
from loraforge.api.schemas.common import HealthStatus
from loraforge.api.security_headers import SecurityHeadersMiddleware
from loraforge.api.throttle import Throttle
from loraforge.api.upload_limits import ContentLengthLimit
from loraforge.asgi import BodyLimitMiddleware
from loraforge.catalog import load_catalog
from loraforge.contracts.dispatch import Dispatcher
from loraforge.db.session import make_engine, make_read_sessionmaker, make_sessionmaker, migrate
from loraforge.engines import EngineFleet
from loraforge.ops.api_metrics import ApiMetrics
from loraforge.ops.metrics import RequestTimer
from loraforge.settings import Settings, get_settings
from loraforge.storage import open_store
from loraforge.web import mount_web

# Threads that commit request sessions (``deps.get_session``), as many as the routes' pool has.
_COMMIT_THREADS = 40
# Multipart framing and the form fields come on top of the file itself.
_MULTIPART_SLACK = 64 * 1024


def create_app(settings: Settings, dispatcher: Dispatcher | None = None) -> FastAPI:
    """Build the API app. ``dispatcher`` defaults to Celery on ``settings.broker_url``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        migrate(settings)
        engine = make_engine(settings)
        if dispatcher is None:
            from loraforge.queue.dispatch import CeleryDispatcher

            chosen: Dispatcher = CeleryDispatcher(settings)
        else:
            chosen = dispatcher
        sessions = make_sessionmaker(engine)
        app.state.services = Services(
            settings=settings,
            sessions=sessions,
            catalog=load_catalog(settings.models_config),
            blobs=open_store(settings),
            dispatcher=chosen,
            engines=EngineFleet.from_settings(settings),
            keys=KeyCache(sessions, settings.auth_cache_seconds),
            # Built here, on the event loop its Redis connections belong to.
            throttle=Throttle.from_settings(settings),
            commit_threads=CapacityLimiter(_COMMIT_THREADS),
            read_sessions=make_read_sessionmaker(engine),
        )
        yield
        await app.state.services.engines.aclose()
        if app.state.services.throttle is not None:
            await app.state.services.throttle.aclose()
        engine.dispose()

    docs = settings.api_docs  # Swagger UI and ReDoc load from a CDN: off unless asked for
    app = FastAPI(
        title="loraforge",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    install_error_handlers(app)
    # Added first, so innermost: the middlewares below do not read bodies, and the app's
    # routes read through this one directly (BaseHTTPMiddleware would wrap its 413 in a
    # task group's exception group).
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes, exempt=_has_own_limit)
    install_idempotency(app)
    uploads.install_part_limit(app)
    # Refuse an oversized upload before its body is read (the route also counts bytes).
    app.add_middleware(
        ContentLengthLimit,
        matches="/v1/files".__eq__,
        limit=settings.max_upload_bytes + _MULTIPART_SLACK,
        message=f"File is larger than the {settings.max_upload_bytes} byte limit for uploads.",
        param="file",
    )
    # The plans' request limits, around everything else that runs per request.
    app.add_middleware(RateLimitMiddleware)

    v1 = APIRouter(prefix="/v1")
    for module in (
        files,
        uploads,
        fine_tuning_jobs,
        models,
        chat_completions,
        batches,
        webhook_endpoints,
        organization,
    ):
        v1.include_router(module.router)
    app.include_router(v1)

    @app.get("/health", tags=["health"])
    def health() -> HealthStatus:
        return HealthStatus()

    # /healthz, /readyz, /metrics (``loraforge.ops``).
    app.include_router(operations.router)
    # The web platform at `/` (static pages calling /v1 with the user's key).
    mount_web(app)
    install_openapi(app)
    app.add_middleware(SecurityHeadersMiddleware)
    # Outermost, so every request is timed, refused ones included (and after the headers).
    app.state.metrics = ApiMetrics()
    app.add_middleware(RequestTimer, histogram=app.state.metrics.requests)
    return app


def _has_own_limit(method: str, path: str) -> bool:
    # Uploads are limited by size settings of their own (the middlewares above).
    return method == "POST" and (path == "/v1/files" or uploads.is_part_path(path))


def create_app_from_env() -> FastAPI:
    """The app for the environment's settings: the factory ``loraforge api --workers N`` gives
    uvicorn, which imports it in each worker process."""
    return create_app(get_settings())
