"""One delivery attempt: sign, POST, record the attempt, schedule the retry.

A delivery moves ``pending`` -> ``queued`` (the sweeper sent its task) -> ``delivering`` (this
attempt runs) -> ``succeeded``, or back to ``pending`` with an exponential back-off, or
``failed`` after ``webhook_max_attempts``; ``cancelled`` if its endpoint was deleted. Every state
change is a conditional UPDATE, so a duplicated task makes no second attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.models import WebhookDelivery, WebhookDeliveryAttempt, WebhookEndpoint
from loraforge.db.session import session_scope
from loraforge.settings import Settings
from loraforge.webhooks import egress
from loraforge.webhooks.signing import signed_headers

log = logging.getLogger(__name__)

USER_AGENT = "loraforge-webhooks/0.1"
# A lease outlives the HTTP timeout by this much before the sweeper assumes the attempt died.
_LEASE_SLACK_SECONDS = 30.0
_EXCERPT_CHARS = 1024


@dataclass(frozen=True)
class AttemptResult:
    """What the receiver did with one POST."""

    status_code: int | None
    error: str | None
    excerpt: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        # Standard Webhooks: any 2xx acknowledges; 3xx is not followed and counts as a failure.
        return self.status_code is not None and 200 <= self.status_code < 300


def active_secrets(endpoint: WebhookEndpoint, at: float) -> list[str]:
    """The secrets to sign with: the current one, plus the previous one during its grace period."""
    found = [endpoint.signing_secret]
    if endpoint.previous_signing_secret and (endpoint.previous_secret_expires_at or 0) > at:
        found.append(endpoint.previous_signing_secret)
    return found


def _headers(webhook_id: str, body: str, signing_secrets: list[str]) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        **signed_headers(webhook_id, int(time.time()), body, signing_secrets),
    }


def _answered(response: httpx.Response, started: float) -> AttemptResult:
    error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
    elapsed = int((time.monotonic() - started) * 1000)
    return AttemptResult(response.status_code, error, response.text[:_EXCERPT_CHARS], elapsed)


def _failed(error: str, started: float) -> AttemptResult:
    # Only the kind of failure is kept: an exception's text can carry the URL (and so any
    # credentials in it), and the detail is what made ``test`` a port scanner.
    return AttemptResult(None, error[:_EXCERPT_CHARS], None, int((time.monotonic() - started) * 1000))


def post_signed(
    url: str,
    webhook_id: str,
    body: str,
    signing_secrets: list[str],
    timeout: float,
    policy: egress.EgressPolicy,
) -> AttemptResult:
    """POST ``body`` to ``url`` with fresh Standard Webhooks headers; never raises for HTTP trouble.

    The host is resolved and checked against ``policy`` now, at delivery (its DNS may have
    changed since the URL was registered), and the connection goes to the address checked.
    """
    started = time.monotonic()
    try:
        target = egress.check(url, policy, timeout=min(timeout, egress.RESOLVE_TIMEOUT_SECONDS))
    except egress.DestinationRefused as exc:
        return _failed(f"destination refused: {exc.reason}", started)
    pinned, host, extensions = target.pinned()
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False) as client:
            response = client.post(
                pinned,
                content=body.encode(),
                headers={**_headers(webhook_id, body, signing_secrets), **host},
                extensions=extensions,
            )
    except httpx.HTTPError as exc:
        return _failed(type(exc).__name__, started)
    return _answered(response, started)


async def post_signed_async(
    url: str,
    webhook_id: str,
    body: str,
    signing_secrets: list[str],
    timeout: float,
    policy: egress.EgressPolicy,
) -> AttemptResult:
    """:func:`post_signed` for the API's event loop (the ``test`` call): no thread is held while
    the receiver takes its time, and the whole attempt is bounded by ``timeout``."""
    started = time.monotonic()
    try:
        target = await egress.check_async(url, policy, timeout=min(timeout, egress.RESOLVE_TIMEOUT_SECONDS))
    except egress.DestinationRefused as exc:
        return _failed(f"destination refused: {exc.reason}", started)
    pinned, host, extensions = target.pinned()
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            response = await asyncio.wait_for(
                client.post(
                    pinned,
                    content=body.encode(),
                    headers={**_headers(webhook_id, body, signing_secrets), **host},
                    extensions=extensions,
                ),
                timeout,
            )
    except (httpx.HTTPError, TimeoutError) as exc:
        return _failed(type(exc).__name__, started)
    return _answered(response, started)


def backoff_seconds(settings: Settings, attempts: int) -> float:
    """Delay before retry number ``attempts`` (1 after the first failure): base * 2**(n-1), capped."""
    return float(
        min(settings.webhook_retry_base_seconds * 2 ** (attempts - 1), settings.webhook_retry_max_seconds)
    )


def _claim(session: Session, delivery_id: str, lease_until: float) -> bool:
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "queued")
        .values(status="delivering", lease_until=lease_until)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def deliver(settings: Settings, sessions: sessionmaker[Session], delivery_id: str) -> str | None:
    """Make one attempt of a queued delivery and record it.

    The HTTP call runs outside any transaction: a slow receiver must not hold a database lock.

    Args:
        settings: back-off and timeout settings.
        sessions: database sessions.
        delivery_id: the ``webhook_deliveries`` row (``webhook-id``).

    Returns:
        The delivery's new status, or None if it was not ``queued`` (another task has it, or it
        is already done): duplicated tasks are harmless.
    """
    with session_scope(sessions) as session:
        if not _claim(
            session, delivery_id, time.time() + settings.webhook_timeout_seconds + _LEASE_SLACK_SECONDS
        ):
            return None
        delivery = session.execute(
            select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
        ).scalar_one()
        endpoint = session.execute(
            select(WebhookEndpoint).where(WebhookEndpoint.id == delivery.endpoint_id)
        ).scalar_one()
        if endpoint.deleted_at is not None:
            delivery.status, delivery.lease_until = "cancelled", None
            return delivery.status
        url, body, attempt = endpoint.url, delivery.payload, delivery.attempts + 1
        signing = active_secrets(endpoint, time.time())

    started_at = time.time()
    policy = egress.EgressPolicy.of(settings.webhook_allowed_hosts)
    result = post_signed(url, delivery_id, body, signing, settings.webhook_timeout_seconds, policy)
    return _record(settings, sessions, delivery_id, attempt, started_at, result)


def _record(
    settings: Settings,
    sessions: sessionmaker[Session],
    delivery_id: str,
    attempt: int,
    started_at: float,
    result: AttemptResult,
) -> str:
    with session_scope(sessions) as session:
        session.add(
            WebhookDeliveryAttempt(
                delivery_id=delivery_id,
                attempt=attempt,
                started_at=started_at,
                duration_ms=result.duration_ms,
                status_code=result.status_code,
                error=result.error,
                response_excerpt=result.excerpt,
            )
        )
        values: dict[str, object] = {
            "attempts": attempt,
            "lease_until": None,
            "last_status_code": result.status_code,
            "last_error": result.error,
        }
        if result.ok:
            values.update(status="succeeded", delivered_at=int(time.time()))
        elif attempt >= settings.webhook_max_attempts:
            values.update(status="failed")
        else:
            values.update(status="pending", next_attempt_at=time.time() + backoff_seconds(settings, attempt))
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "delivering")
            .values(**values)
        )
    status = str(values["status"])
    log.info(
        "webhook %s attempt %d: %s (%s)", delivery_id, attempt, status, result.error or result.status_code
    )
    return status
