"""Webhook endpoints of an organization: create, read, list, update, delete, rotate, test.

Raises domain errors; knows no HTTP framework (``api/routes/webhook_endpoints.py`` is the edge).
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from loraforge.db.models import Organization, WebhookDelivery, WebhookDeliveryAttempt, WebhookEndpoint
from loraforge.db.pagination import paginate
from loraforge.errors import InvalidRequestError, NotFoundError
from loraforge.ids import new_id, now
from loraforge.webhooks import JOB_EVENT_TYPES
from loraforge.webhooks.delivery import AttemptResult, active_secrets, post_signed
from loraforge.webhooks.outbox import event_payload
from loraforge.webhooks.signing import new_secret

# How long the old secret keeps signing after rotate_secret(keep_old_secret_active_for_24_hours=True).
ROTATION_GRACE_SECONDS = 24 * 3600


def check_url(url: str) -> str:
    """``url`` if it is an absolute http(s) URL.

    OpenAI requires HTTPS; a self-hosted service also allows plain HTTP (receivers on a private
    network or the same machine).

    Raises:
        InvalidRequestError: not an absolute http(s) URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequestError(f"Invalid url '{url}': expected an absolute http(s) URL.", param="url")
    return url


def check_event_types(event_types: list[str]) -> list[str]:
    """The distinct event types, in order, if every one is emitted by this service.

    Raises:
        InvalidRequestError: empty, or a type this service never sends.
    """
    if not event_types:
        raise InvalidRequestError(
            "event_types must name at least one event type.", param="event_types", code="invalid_event_type"
        )
    unknown = [t for t in event_types if t not in JOB_EVENT_TYPES]
    if unknown:
        raise InvalidRequestError(
            f"Unsupported event type(s): {', '.join(unknown)}. Supported: {', '.join(JOB_EVENT_TYPES)}.",
            param="event_types",
            code="invalid_event_type",
        )
    return list(dict.fromkeys(event_types))


def create_endpoint(
    session: Session, org: Organization, *, name: str, url: str, event_types: list[str]
) -> WebhookEndpoint:
    """Register ``url`` for ``event_types`` with a fresh ``whsec_`` signing secret."""
    stamp = now()
    endpoint = WebhookEndpoint(
        id=new_id("we_"),
        org_id=org.id,
        name=name,
        url=check_url(url),
        event_types=check_event_types(event_types),
        signing_secret=new_secret(),
        created_at=stamp,
        updated_at=stamp,
    )
    session.add(endpoint)
    session.flush()
    return endpoint


def get_endpoint(session: Session, org: Organization, endpoint_id: str) -> WebhookEndpoint:
    """The org's live endpoint ``endpoint_id``.

    Raises:
        NotFoundError: unknown, deleted, or another organization's.
    """
    endpoint = session.execute(
        select(WebhookEndpoint).where(
            WebhookEndpoint.id == endpoint_id,
            WebhookEndpoint.org_id == org.id,
            WebhookEndpoint.deleted_at.is_(None),
        )
    ).scalar_one_or_none()
    if endpoint is None:
        raise NotFoundError(
            f"No webhook endpoint found with id '{endpoint_id}'.", param="webhook_endpoint_id"
        )
    return endpoint


def list_endpoints(
    session: Session, org: Organization, *, after: str | None, limit: int
) -> tuple[list[WebhookEndpoint], bool]:
    """One page of the org's live endpoints, newest first."""
    stmt = select(WebhookEndpoint).where(
        WebhookEndpoint.org_id == org.id, WebhookEndpoint.deleted_at.is_(None)
    )
    return paginate(session, stmt, WebhookEndpoint, after=after, limit=limit)


def update_endpoint(
    session: Session,
    org: Organization,
    endpoint_id: str,
    *,
    name: str | None = None,
    url: str | None = None,
    event_types: list[str] | None = None,
) -> WebhookEndpoint:
    """Change the given fields; ``updated_at`` moves only if something actually changed."""
    endpoint = get_endpoint(session, org, endpoint_id)
    changes: dict[str, object] = {}
    if name is not None and name != endpoint.name:
        changes["name"] = name
    if url is not None and url != endpoint.url:
        changes["url"] = check_url(url)
    if event_types is not None:
        checked = check_event_types(event_types)
        if checked != endpoint.event_types:
            changes["event_types"] = checked
    for field, value in changes.items():
        setattr(endpoint, field, value)
    if changes:
        endpoint.updated_at = now()
    session.flush()
    return endpoint


def delete_endpoint(session: Session, org: Organization, endpoint_id: str) -> WebhookEndpoint:
    """Delete the endpoint; its undelivered events are cancelled, its history kept."""
    endpoint = get_endpoint(session, org, endpoint_id)
    endpoint.deleted_at = now()
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint.id, WebhookDelivery.status == "pending")
        .values(status="cancelled")
    )
    session.flush()
    return endpoint


def rotate_secret(
    session: Session, org: Organization, endpoint_id: str, *, keep_old_for_24_hours: bool = False
) -> WebhookEndpoint:
    """Issue a new signing secret. With ``keep_old_for_24_hours`` deliveries carry a signature
    with each secret for 24 h (receivers accept any matching ``v1,`` entry)."""
    endpoint = get_endpoint(session, org, endpoint_id)
    stamp = now()
    if keep_old_for_24_hours:
        endpoint.previous_signing_secret = endpoint.signing_secret
        endpoint.previous_secret_expires_at = stamp + ROTATION_GRACE_SECONDS
    else:
        endpoint.previous_signing_secret = None
        endpoint.previous_secret_expires_at = None
    endpoint.signing_secret = new_secret()
    endpoint.updated_at = stamp
    session.flush()
    return endpoint


def send_test(
    session: Session, org: Organization, endpoint_id: str, event_type: str, *, timeout: float
) -> AttemptResult:
    """Deliver a sample ``event_type`` event to the endpoint now (one attempt, no retries).

    A delivery that got an HTTP answer is recorded like any other, with its attempt.

    Raises:
        InvalidRequestError: ``event_type`` is not one this service sends, or the receiver could
            not be reached (no HTTP status to report).
    """
    endpoint = get_endpoint(session, org, endpoint_id)
    check_event_types([event_type])
    event_id, delivery_id = new_id("evt_"), new_id("msg_")
    payload = event_payload(event_id, event_type, now(), new_id("ftjob-"))
    started = time.time()
    result = post_signed(endpoint.url, delivery_id, payload, active_secrets(endpoint, started), timeout)
    if result.status_code is None:
        raise InvalidRequestError(
            f"Could not deliver the test event to {endpoint.url}: {result.error}",
            param="url",
            code="webhook_unreachable",
        )
    session.add(
        WebhookDelivery(
            id=delivery_id,
            event_id=event_id,
            event_type=event_type,
            org_id=org.id,
            endpoint_id=endpoint.id,
            payload=payload,
            status="succeeded" if result.ok else "failed",
            attempts=1,
            next_attempt_at=started,
            last_status_code=result.status_code,
            last_error=result.error,
            created_at=int(started),
            delivered_at=now() if result.ok else None,
        )
    )
    session.flush()
    session.add(
        WebhookDeliveryAttempt(
            delivery_id=delivery_id,
            attempt=1,
            started_at=started,
            duration_ms=result.duration_ms,
            status_code=result.status_code,
            error=result.error,
            response_excerpt=result.excerpt,
        )
    )
    session.flush()
    return result
