"""The batch reaper: sends a batch again when the worker running it stopped.

Every worker runs one (a thread, like ``worker/reaper.py``'s for jobs), once at start and then
every ``reaper_interval_seconds``. A batch is stranded when its lease is older than
``lease_timeout_seconds`` (its worker died on another host, or its task was lost in the broker), or
at once when its worker was a process of this host that no longer runs (``loraforge serve``
restarted its worker). The batch gets a new ``dispatch_token`` in a conditional UPDATE, so two
reapers never both send it, and a task of the old worker, if it was only slow, stops.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.batches.status import UNFINISHED
from loraforge.db.models import Batch
from loraforge.db.session import session_scope
from loraforge.ids import now
from loraforge.settings import Settings

log = logging.getLogger(__name__)


def _dead_here(owner: str | None) -> bool:
    """``owner`` (``host:pid``) is a process of this host that no longer runs."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def stranded(settings: Settings, sessions: sessionmaker[Session]) -> list[tuple[str, int]]:
    """Unfinished batches whose worker stopped (module docstring), each given a new token.

    Returns:
        ``(batch id, token)`` of each task to send.
    """
    cutoff = now() - int(settings.lease_timeout_seconds)
    with session_scope(sessions) as session:
        rows = session.execute(
            select(Batch.id, Batch.dispatch_token, Batch.worker_id, Batch.heartbeat_at).where(
                Batch.status.in_(UNFINISHED)
            )
        ).all()
    sent: list[tuple[str, int]] = []
    for batch_id, token, owner, beat in rows:
        if not (beat is None or beat < cutoff or _dead_here(owner)):
            continue
        with session_scope(sessions) as session:
            moved = session.execute(
                update(Batch)
                .where(
                    Batch.id == batch_id,
                    Batch.dispatch_token == token,
                    or_(Batch.worker_id.is_(None), Batch.worker_id == owner),
                )
                .values(dispatch_token=token + 1, heartbeat_at=now(), worker_id=None)
            ).rowcount  # type: ignore[attr-defined]
        if moved:
            log.warning("batch %s: its worker (%s) stopped; sending it again", batch_id, owner)
            sent.append((batch_id, token + 1))
    return sent


class BatchReaper:
    """Sends stranded batches again: once at worker start, then every ``reaper_interval_seconds``."""

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], send: Callable[[str, int], None]
    ) -> None:
        self.settings, self.sessions, self.send = settings, sessions, send
        self._stop = threading.Event()

    def run_once(self) -> list[tuple[str, int]]:
        """One pass; returns what was sent."""
        sent = stranded(self.settings, self.sessions)
        for batch_id, token in sent:
            self.send(batch_id, token)
        return sent

    def _loop(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - must outlive a database hiccup
                log.exception("batch reaper pass failed")
            if self._stop.wait(self.settings.reaper_interval_seconds):
                return

    def start(self) -> threading.Thread:
        """Run the passes in a daemon thread."""
        thread = threading.Thread(target=self._loop, name="loraforge-batch-reaper", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """End the thread after its current pass."""
        self._stop.set()


__all__ = ["BatchReaper", "stranded"]
