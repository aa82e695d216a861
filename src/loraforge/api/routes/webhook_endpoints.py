"""``/v1/webhook_endpoints`` (create, list, retrieve, update, delete, rotate_secret, test) and
``/v1/webhook_event_types``: where an organization receives signed job events."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool

from loraforge.api.deps import OrgDep, Services, ServicesDep, SessionDep
from loraforge.api.idempotency import idempotency
from loraforge.api.schemas.webhooks import (
    DeleteWebhookEndpointResponse,
    ListWebhookEndpointsResponse,
    ListWebhookEventTypesResponse,
    RotateSecretParams,
    WebhookEndpoint,
    WebhookEndpointCreate,
    WebhookEndpointTestResult,
    WebhookEndpointUpdate,
    WebhookEndpointWithSecret,
    WebhookTestParams,
    webhook_endpoint_public,
    webhook_endpoint_with_secret,
)
from loraforge.asgi import StrictJSONRoute
from loraforge.db.session import session_scope
from loraforge.webhooks import JOB_EVENT_TYPES, egress, endpoints

router = APIRouter(tags=["webhooks"], route_class=StrictJSONRoute)


def _policy(services: Services) -> egress.EgressPolicy:
    return egress.EgressPolicy.of(services.settings.webhook_allowed_hosts)


@router.post("/webhook_endpoints", dependencies=[Depends(idempotency)])
def create_webhook_endpoint(
    services: ServicesDep, session: SessionDep, org: OrgDep, params: WebhookEndpointCreate
) -> WebhookEndpointWithSecret:
    """Register a URL; the response is the only one that shows the signing secret."""
    endpoint = endpoints.create_endpoint(
        session,
        org,
        name=params.name,
        url=params.url,
        event_types=params.event_types,
        policy=_policy(services),
    )
    return webhook_endpoint_with_secret(endpoint)


@router.get("/webhook_endpoints")
def list_webhook_endpoints(
    session: SessionDep,
    org: OrgDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ListWebhookEndpointsResponse:
    """The organization's endpoints, newest first."""
    rows, has_more = endpoints.list_endpoints(session, org, after=after, limit=limit)
    return ListWebhookEndpointsResponse.of([webhook_endpoint_public(e) for e in rows], has_more)


@router.get("/webhook_endpoints/{webhook_endpoint_id}")
def retrieve_webhook_endpoint(session: SessionDep, org: OrgDep, webhook_endpoint_id: str) -> WebhookEndpoint:
    """Retrieve an endpoint (secret masked)."""
    return webhook_endpoint_public(endpoints.get_endpoint(session, org, webhook_endpoint_id))


@router.post("/webhook_endpoints/{webhook_endpoint_id}")
def update_webhook_endpoint(
    services: ServicesDep,
    session: SessionDep,
    org: OrgDep,
    webhook_endpoint_id: str,
    params: WebhookEndpointUpdate,
) -> WebhookEndpoint:
    """Change an endpoint's name, URL or event types."""
    endpoint = endpoints.update_endpoint(
        session,
        org,
        webhook_endpoint_id,
        name=params.name,
        url=params.url,
        event_types=params.event_types,
        policy=_policy(services),
    )
    return webhook_endpoint_public(endpoint)


@router.delete("/webhook_endpoints/{webhook_endpoint_id}")
def delete_webhook_endpoint(
    session: SessionDep, org: OrgDep, webhook_endpoint_id: str
) -> DeleteWebhookEndpointResponse:
    """Delete an endpoint; events not yet delivered to it are dropped."""
    endpoint = endpoints.delete_endpoint(session, org, webhook_endpoint_id)
    return DeleteWebhookEndpointResponse(id=endpoint.id, deleted=True)


@router.post("/webhook_endpoints/{webhook_endpoint_id}/rotate_secret")
def rotate_webhook_secret(
    session: SessionDep, org: OrgDep, webhook_endpoint_id: str, params: RotateSecretParams | None = None
) -> WebhookEndpointWithSecret:
    """Issue a new signing secret (optionally keep signing with the old one for 24 h)."""
    keep = bool(params and params.keep_old_secret_active_for_24_hours)
    endpoint = endpoints.rotate_secret(session, org, webhook_endpoint_id, keep_old_for_24_hours=keep)
    return webhook_endpoint_with_secret(endpoint)


@router.post("/webhook_endpoints/{webhook_endpoint_id}/test")
async def test_webhook_endpoint(
    services: ServicesDep, org: OrgDep, webhook_endpoint_id: str, params: WebhookTestParams
) -> WebhookEndpointTestResult:
    """Send a sample signed event now and report the receiver's HTTP status.

    Async on purpose: the request waits for the receiver on the event loop, so slow receivers
    cannot take the thread pool every other request needs; the database work runs on it briefly.
    """
    timeout = services.settings.webhook_test_timeout_seconds

    def prepare() -> endpoints.SampleEvent:
        with session_scope(services.sessions) as session:
            return endpoints.prepare_test(session, org, webhook_endpoint_id, params.event_type)

    event = await run_in_threadpool(prepare)
    started = time.time()
    result = await endpoints.send_test(event, _policy(services), timeout=timeout)

    def record() -> None:
        with session_scope(services.sessions) as session:
            endpoints.record_test(session, org, event, started, result, timeout)

    await run_in_threadpool(record)
    # record_test raises when no HTTP status came back.
    assert result.status_code is not None
    return WebhookEndpointTestResult(
        event_type=params.event_type,
        status_code=result.status_code,
        success=result.ok,
        webhook_endpoint_id=webhook_endpoint_id,
    )


@router.get("/webhook_event_types")
def list_webhook_event_types(org: OrgDep) -> ListWebhookEventTypesResponse:
    """The event types this service sends."""
    return ListWebhookEventTypesResponse(data=list(JOB_EVENT_TYPES))
