"""Operating the API: liveness, readiness and Prometheus metrics (``loraforge.ops``).

Not under ``/v1`` and without an API key: probes and scrapers are infrastructure, not tenants.
Nothing here names a tenant's objects; keep ``/metrics`` off the public internet all the same.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loraforge.api.deps import ServicesDep
from loraforge.api.schemas.common import HealthStatus
from loraforge.ops.api_metrics import ApiMetrics
from loraforge.ops.readiness import Readiness, readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> HealthStatus:
    """Liveness: the process answers (no dependency is checked)."""
    return HealthStatus()


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(services: ServicesDep) -> JSONResponse:
    """Readiness: database, broker, object store, a live worker per pool, an engine per base model."""
    report = await readiness(services.settings, services.sessions, services.engines)
    return JSONResponse(report.model_dump(), status_code=200 if report.status == "ok" else 503)


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, services: ServicesDep) -> Response:
    """Prometheus metrics: request latency by route, and jobs, queues and workers from the database."""
    registry: ApiMetrics = request.app.state.metrics
    return Response(registry.render(services.settings, services.sessions), media_type=CONTENT_TYPE_LATEST)
