"""Webhook endpoints of an organization: create, read, list, update, delete, rotate, test.

Raises domain errors; knows no HTTP framework (``api/routes/webhook_endpoints.py`` is the edge).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from loraforge.db.models import Organization, WebhookDelivery, WebhookDeliveryAttempt, WebhookEndpoint
from loraforge.db.pagination import paginate
from loraforge.errors import InvalidRequestError, NotFoundError
from loraforge.ids import new_id, now
from loraforge.webhooks import JOB_EVENT_TYPES, egress
from loraforge.webhooks.delivery import AttemptResult, active_secrets, post_signed_async
from loraforge.webhooks.outbox import event_payload
from loraforge.webhooks.signing import new_secret

log = logging.getLogger(__name__)

# How long the old secret keeps signing after rotate_secret(keep_old_secret_active_for_24_hours=True).
ROTATION_GRACE_SECONDS = 24 * 3600


NOT_ALLOWED = (
    "Webhook URLs must point at public internet addresses, and this URL's host is not one (or "
    "resolves to one that is not). An operator can allow internal receivers with "
    "LORAFORGE_WEBHOOK_ALLOWED_HOSTS."
)


def check_url(url: str, policy: egress.EgressPolicy) -> str:
    """``url`` if it is an absolute http(s) URL whose host resolves to allowed addresses.

    OpenAI requires HTTPS; a self-hosted service also allows plain HTTP. A host that does not
    resolve now is accepted (its DNS may not exist yet): every delivery checks again. The
    answer never says what a name resolved to (that would map the internal network).

    Raises:
        InvalidRequestError: not an absolute http(s) URL (``invalid_url``), or a destination
            that is not allowed (``webhook_url_not_allowed``).
    """
    try:
        egress.parse(url)
    except egress.DestinationRefused:
        raise InvalidRequestError(
            f"Invalid url '{egress.redact(url)}': expected an absolute http(s) URL.",
            param="url",
            code="invalid_url",
        ) from None
    try:
        egress.check(url, policy)
    except egress.Unresolvable:
        pass
    except egress.DestinationRefused as exc:
        log.info("refused webhook URL %s: %s", egress.redact(url), exc.reason)
        raise InvalidRequestError(NOT_ALLOWED, param="url", code="webhook_url_not_allowed") from None
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
    session: Session,
    org: Organization,
    *,
    name: str,
    url: str,
    event_types: list[str],
    policy: egress.EgressPolicy,
) -> WebhookEndpoint:
    """Register ``url`` (checked against ``policy``) for ``event_types`` with a fresh ``whsec_``
    signing secret."""
    stamp = now()
    endpoint = WebhookEndpoint(
        id=new_id("we_"),
        org_id=org.id,
        name=name,
        url=check_url(url, policy),
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
    policy: egress.EgressPolicy,
) -> WebhookEndpoint:
    """Change the given fields (a new URL checked against ``policy``); ``updated_at`` moves only
    if something actually changed."""
    endpoint = get_endpoint(session, org, endpoint_id)
    changes: dict[str, object] = {}
    if name is not None and name != endpoint.name:
        changes["name"] = name
    if url is not None and url != endpoint.url:
        changes["url"] = check_url(url, policy)
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


@dataclass(frozen=True)
class SampleEvent:
    """A sample event ready to send to one endpoint (``POST .../test``)."""

    endpoint_id: str
    url: str
    event_type: str
    event_id: str
    delivery_id: str
    payload: str
    signing_secrets: list[str]


def prepare_test(session: Session, org: Organization, endpoint_id: str, event_type: str) -> SampleEvent:
    """The sample ``event_type`` event for the org's endpoint ``endpoint_id``.

    Raises:
        NotFoundError: no such endpoint.
        InvalidRequestError: ``event_type`` is not one this service sends.
    """
    endpoint = get_endpoint(session, org, endpoint_id)
    check_event_types([event_type])
    event_id, delivery_id = new_id("evt_"), new_id("msg_")
    return SampleEvent(
        endpoint_id=endpoint.id,
        url=endpoint.url,
        event_type=event_type,
        event_id=event_id,
        delivery_id=delivery_id,
        payload=event_payload(event_id, event_type, now(), new_id("ftjob-")),
        signing_secrets=active_secrets(endpoint, time.time()),
    )


async def send_test(event: SampleEvent, policy: egress.EgressPolicy, *, timeout: float) -> AttemptResult:
    """Deliver ``event`` now: one attempt, no retries, at most ``timeout`` seconds, on the
    caller's event loop (no thread waits on the receiver)."""
    return await post_signed_async(
        event.url, event.delivery_id, event.payload, event.signing_secrets, timeout, policy
    )


def record_test(
    session: Session,
    org: Organization,
    event: SampleEvent,
    started: float,
    result: AttemptResult,
    timeout: float,
) -> None:
    """Record a test delivery that got an HTTP answer, like any other delivery and its attempt.

    Raises:
        InvalidRequestError: no HTTP answer. The message is the same whatever went wrong
            (refused, timed out, not resolvable, not allowed): telling those apart would make
            ``test`` a scanner of what the API's network can reach.
    """
    if result.status_code is None:
        log.info("webhook test %s got no answer: %s", event.delivery_id, result.error)
        raise InvalidRequestError(
            f"Could not deliver the test event: the endpoint gave no HTTP answer within {timeout:g} s, "
            "or its host does not resolve to an allowed public address.",
            param="url",
            code="webhook_unreachable",
        )
    session.add(
        WebhookDelivery(
            id=event.delivery_id,
            event_id=event.event_id,
            event_type=event.event_type,
            org_id=org.id,
            endpoint_id=event.endpoint_id,
            payload=event.payload,
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
            delivery_id=event.delivery_id,
            attempt=1,
            started_at=started,
            duration_ms=result.duration_ms,
            status_code=result.status_code,
            error=result.error,
            response_excerpt=result.excerpt,
        )
    )
    session.flush()
