"""The outbox: a job's terminal transition writes its webhook deliveries in the same transaction.

Why an outbox: the job change and "a webhook is owed" commit or roll back together, whichever
process made the change (the API cancels jobs, the worker finishes them). Nothing is sent from
here; committed rows are picked up by :mod:`loraforge.webhooks.sweeper` in the worker.
"""

from __future__ import annotations

import json
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from loraforge.db.models import Job, WebhookDelivery, WebhookEndpoint
from loraforge.ids import new_id, now


def event_payload(event_id: str, event_type: str, created_at: int, object_id: str) -> str:
    """The thin event body OpenAI sends (OPENAI_CONTRACT.md §7.1), as the exact text to sign.

    Args:
        event_id: ``evt_…``, shared by every endpoint that receives this event.
        event_type: e.g. ``fine_tuning.job.succeeded``.
        created_at: when the job reached that state (Unix seconds).
        object_id: the job id, ``data.id``.
    """
    body = {
        "id": event_id,
        "object": "event",
        "type": event_type,
        "created_at": created_at,
        "data": {"id": object_id},
    }
    return json.dumps(body, separators=(",", ":"))


def subscribed_endpoints(session: Session, org_id: str, event_type: str) -> list[WebhookEndpoint]:
    """The org's live endpoints that subscribed to ``event_type``."""
    rows = session.execute(
        select(WebhookEndpoint).where(WebhookEndpoint.org_id == org_id, WebhookEndpoint.deleted_at.is_(None))
    ).scalars()
    return [endpoint for endpoint in rows if event_type in (endpoint.event_types or [])]


def add_deliveries(
    session: Session, org_id: str, event_type: str, object_id: str, created_at: int
) -> list[WebhookDelivery]:
    """Queue one event for every subscribed endpoint of ``org_id`` (in the caller's transaction).

    Returns:
        The new deliveries (none if no endpoint subscribed).
    """
    endpoints = subscribed_endpoints(session, org_id, event_type)
    if not endpoints:
        return []
    event_id = new_id("evt_")
    payload = event_payload(event_id, event_type, created_at, object_id)
    deliveries = [
        WebhookDelivery(
            id=new_id("msg_"),
            event_id=event_id,
            event_type=event_type,
            org_id=org_id,
            endpoint_id=endpoint.id,
            payload=payload,
            status="pending",
            attempts=0,
            next_attempt_at=time.time(),
            created_at=now(),
        )
        for endpoint in endpoints
    ]
    session.add_all(deliveries)
    return deliveries


def record_job_event(session: Session, job_id: str, status: str, finished_at: int) -> None:
    """Hook for ``jobs.state.transition``: the job ``job_id`` just became ``status`` (terminal).

    Args:
        session: the transaction that changed the job's status.
        job_id: the job.
        status: ``succeeded``, ``failed`` or ``cancelled``.
        finished_at: the moment of the change, the event's ``created_at``.
    """
    org_id = session.execute(select(Job.org_id).where(Job.id == job_id)).scalar_one()
    add_deliveries(session, org_id, f"fine_tuning.job.{status}", job_id, finished_at)
