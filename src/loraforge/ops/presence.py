"""Which worker processes are alive, and which train pools they serve: one row each in the
database (``worker_heartbeats``), renewed every ``heartbeat_seconds``.

Why rows rather than asking Celery (``inspect ping``): a broadcast waits for its timeout to hear
every worker (a second or more, on every ``/readyz``), the filesystem broker answers it only on
one machine, and a worker busy in a long task still beats here. The database is already shared
by every process of a deployment, whatever the broker.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.models import WorkerHeartbeat
from loraforge.db.session import session_scope
from loraforge.ids import now
from loraforge.settings import Settings

log = logging.getLogger(__name__)

# Rows this much older than their last beat are deleted by any beating worker (dead workers).
FORGET_AFTER_SECONDS = 3600


def live_after(settings: Settings) -> float:
    """A worker is live while its last beat is younger than this (three missed beats, at least 15 s:
    a beat delayed by a busy database must not flip readiness)."""
    return max(3 * settings.heartbeat_seconds, 15.0)


def beat(sessions: sessionmaker[Session], worker_id: str, pools: list[str], started_at: int) -> None:
    """Write this worker's row (insert or renew), and forget long-dead workers."""
    stamp = now()
    with session_scope(sessions) as session:
        renewed = session.execute(
            update(WorkerHeartbeat)
            .where(WorkerHeartbeat.worker_id == worker_id)
            .values(beat_at=stamp, pools=pools)
            .execution_options(synchronize_session=False)
        )
        if renewed.rowcount == 0:  # type: ignore[attr-defined]
            session.add(
                WorkerHeartbeat(
                    worker_id=worker_id,
                    hostname=socket.gethostname(),
                    pools=pools,
                    started_at=started_at,
                    beat_at=stamp,
                )
            )
        session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.beat_at < stamp - FORGET_AFTER_SECONDS))


def forget(sessions: sessionmaker[Session], worker_id: str) -> None:
    """Remove this worker's row (it is stopping cleanly: readiness sees it gone at once)."""
    with session_scope(sessions) as session:
        session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == worker_id))


@dataclass(frozen=True)
class LiveWorker:
    """A worker whose last beat is recent enough."""

    worker_id: str
    hostname: str
    pools: list[str]
    beat_at: int


def live_workers(settings: Settings, sessions: sessionmaker[Session]) -> list[LiveWorker]:
    """The workers that beat within :func:`live_after`."""
    cutoff = now() - int(live_after(settings))
    with session_scope(sessions) as session:
        rows = session.execute(select(WorkerHeartbeat).where(WorkerHeartbeat.beat_at >= cutoff)).scalars()
        return [LiveWorker(r.worker_id, r.hostname, list(r.pools or []), r.beat_at) for r in rows]


class PresenceBeat:
    """A daemon thread that renews this worker's row every ``heartbeat_seconds``."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], worker_id: str) -> None:
        self.settings, self.sessions, self.worker_id = settings, sessions, worker_id
        self.pools: list[str] = []
        self.started_at = now()
        self._stop = threading.Event()

    def _loop(self) -> None:
        while True:
            try:
                beat(self.sessions, self.worker_id, self.pools, self.started_at)
            except Exception:  # noqa: BLE001 - a database hiccup must not end the heartbeat
                log.exception("worker heartbeat failed")
            if self._stop.wait(self.settings.heartbeat_seconds):
                return

    def start(self, pools: list[str]) -> threading.Thread:
        """Beat now and then every ``heartbeat_seconds``, in a daemon thread.

        Args:
            pools: the train pools this worker serves (the queues it consumes).
        """
        self.pools = pools
        thread = threading.Thread(target=self._loop, name="loraforge-presence", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop beating and remove the row."""
        self._stop.set()
        try:
            forget(self.sessions, self.worker_id)
        except Exception:  # noqa: BLE001 - the row then ages out
            log.exception("could not remove the worker heartbeat")
