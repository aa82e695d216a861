"""The sweeper: a small thread in each worker process that hands due deliveries to Celery.

Why a poller rather than an ``after_commit`` hook: deliveries are written by whichever process
changes a job (the API cancels, the worker finishes), and the database is the source of truth
(DESIGN.md: Celery loses a task whose worker is SIGKILLed). Polling the outbox makes the first
attempt, every back-off retry, and the recovery of a lost task the same code path, needs no
broker connection in the API, and costs one indexed query per ``webhook_poll_seconds``. The
price is up to one poll interval of latency.

Each due row is claimed by a conditional UPDATE before its task is sent, so several workers
sweeping the same database never dispatch the same attempt twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.models import WebhookDelivery
from loraforge.db.session import session_scope
from loraforge.settings import Settings

log = logging.getLogger(__name__)

_BATCH = 100


def _due(at: float) -> ColumnElement[bool]:
    # Pending and due, or claimed but the claim lapsed (task lost, or worker died mid-attempt).
    return or_(
        and_(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= at),
        and_(WebhookDelivery.status.in_(("queued", "delivering")), WebhookDelivery.lease_until < at),
    )


def dispatch_due(
    settings: Settings, sessions: sessionmaker[Session], send: Callable[[str], None]
) -> list[str]:
    """Claim every due delivery and ``send`` its id (to the ``loraforge.deliver_webhook`` task).

    Args:
        settings: ``webhook_requeue_seconds`` bounds how long a sent task may wait to start.
        sessions: database sessions.
        send: enqueues one delivery id; if it raises, the row goes back to ``pending``.

    Returns:
        The ids sent.
    """
    at = time.time()
    with session_scope(sessions) as session:
        ids = list(
            session.execute(
                select(WebhookDelivery.id).where(_due(at)).order_by(WebhookDelivery.seq).limit(_BATCH)
            ).scalars()
        )
    sent = []
    for delivery_id in ids:
        with session_scope(sessions) as session:
            claimed = session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, _due(at))
                .values(status="queued", lease_until=at + settings.webhook_requeue_seconds)
            ).rowcount  # type: ignore[attr-defined]
        if not claimed:
            continue  # another worker's sweeper took it
        try:
            send(delivery_id)
        except Exception:
            log.exception("could not enqueue webhook delivery %s; will retry", delivery_id)
            with session_scope(sessions) as session:
                session.execute(
                    update(WebhookDelivery)
                    .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "queued")
                    .values(status="pending", lease_until=None)
                )
            continue
        sent.append(delivery_id)
    return sent


class Sweeper:
    """Runs :func:`dispatch_due` every ``settings.webhook_poll_seconds`` on a daemon thread."""

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], send: Callable[[str], None]
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._send = send
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-sweeper", daemon=True)

    def start(self) -> None:
        """Start sweeping in the background."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the current sweep (waits up to ``timeout`` seconds)."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self._settings.webhook_poll_seconds):
            try:
                dispatch_due(self._settings, self._sessions, self._send)
            except Exception:  # a database hiccup must not kill the thread
                log.exception("webhook sweep failed")
