"""The reaper: finds work that a dead worker lost, in the database (the source of truth).

Celery does not redeliver a task whose worker was SIGKILLed (FACTS_CPU §5), and the filesystem
broker drops a message its consumer had fetched. So every worker runs a :class:`Reaper` thread:

* a ``running`` job whose lease (``heartbeat_at``) is older than ``lease_timeout_seconds`` goes
  back to ``queued`` (or to ``paused`` when a pause was pending) and its train task is sent again;
  the next run resumes from the job's newest checkpoint. The change is a conditional UPDATE on
  the old ``worker_id`` and ``heartbeat_at``, so two reapers never both re-queue it, and the old
  worker, if it was only slow, sees it lost the lease and stops its trainer;
* a ``queued`` job nobody started for ``requeue_after_seconds`` has its task sent again (a
  duplicate is harmless: only one task wins ``queued -> running``);
* a cancelled job's leftover checkpoints and adapter, on this machine and in the blob store, are
  removed.

At worker start, :meth:`Reaper.reconcile` also re-sends every queued and validating job's task
(messages held by a dead worker are gone).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.models import Job
from loraforge.db.session import session_scope
from loraforge.ids import now
from loraforge.jobs.state import JobStatus, restamp_queued, transition
from loraforge.settings import Settings
from loraforge.storage import CHECKPOINTS, open_store
from loraforge.worker import artefacts
from loraforge.worker.legacy import adopt_legacy_adapters

log = logging.getLogger(__name__)

Send = Callable[[str], None]
# Leftovers of cancelled jobs are looked for at most this often (it lists the runs directory).
SWEEP_SECONDS = 60.0


@dataclass
class ReapReport:
    """What one reaper pass did (job ids)."""

    requeued: list[str] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)
    revalidated: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)


def reap_stale(settings: Settings, sessions: sessionmaker[Session]) -> tuple[list[str], list[str]]:
    """Take running jobs with a lapsed lease away from their worker.

    Args:
        settings: ``lease_timeout_seconds``.
        sessions: the database.

    Returns:
        The ids re-queued (their train task must be sent) and the ids moved to ``paused``.
    """
    cutoff = now() - int(settings.lease_timeout_seconds)
    with session_scope(sessions) as session:
        stale = session.execute(
            select(Job.id, Job.worker_id, Job.heartbeat_at, Job.pause_requested).where(
                Job.status == JobStatus.RUNNING.value,
                or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
            )
        ).all()
    requeued: list[str] = []
    paused: list[str] = []
    for job_id, owner, beat, pause in stale:
        target = JobStatus.PAUSED if pause else JobStatus.QUEUED
        message = f"The worker running this job ({owner}) stopped responding; " + (
            "paused, as requested" if pause else "re-queued to resume from its last checkpoint"
        )
        with session_scope(sessions) as session:
            ok = transition(
                session,
                job_id,
                target,
                message,
                level="warn",
                expect={"worker_id": owner, "heartbeat_at": beat},
                event_data={"worker_id": owner},
                pause_requested=False,
                estimated_finish=None,
            )
        if ok:
            (paused if pause else requeued).append(job_id)
            log.warning("job %s: lease of %s lapsed; %s", job_id, owner, target.value)
    return requeued, paused


def claim_unstarted(sessions: sessionmaker[Session], older_than: float | None) -> list[str]:
    """Queued jobs to send again: all of them (``older_than`` None) or those waiting that long.

    ``queued_at`` is bumped so the next pass waits again before another duplicate.
    """
    stamp = now()
    with session_scope(sessions) as session:
        stmt = select(Job.id, Job.queued_at).where(Job.status == JobStatus.QUEUED.value)
        if older_than is not None:
            stmt = stmt.where(or_(Job.queued_at.is_(None), Job.queued_at < stamp - int(older_than)))
        claimed = []
        for job_id, queued_at in session.execute(stmt).all():
            if restamp_queued(session, job_id, queued_at, stamp):
                claimed.append(job_id)
    return claimed


def validating(sessions: sessionmaker[Session], older_than: float | None) -> list[str]:
    """Jobs still in ``validating_files`` (created more than ``older_than`` seconds ago)."""
    with session_scope(sessions) as session:
        stmt = select(Job.id).where(Job.status == JobStatus.VALIDATING_FILES.value)
        if older_than is not None:
            stmt = stmt.where(Job.created_at < now() - int(older_than))
        return list(session.execute(stmt).scalars())


def sweep_cancelled(settings: Settings, sessions: sessionmaker[Session]) -> list[str]:
    """Remove checkpoints (and adapters) left on this machine or in the store by cancelled or
    deleted jobs (e.g. a paused job cancelled while no worker ran it)."""
    root = settings.runs_dir
    local = [p.name for p in root.iterdir() if (p / artefacts.CHECKPOINTS).is_dir()] if root.is_dir() else []
    candidates = sorted({*local, *open_store(settings).names(CHECKPOINTS)})
    if not candidates:
        return []
    with session_scope(sessions) as session:
        status = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(candidates))).all())
    swept = [
        jid for jid in candidates if status.get(jid, JobStatus.CANCELLED.value) == JobStatus.CANCELLED.value
    ]
    for job_id in swept:
        artefacts.remove_job_artefacts(settings, sessions, job_id)
    return swept


class Reaper:
    """Runs the passes above once at worker start and then every ``reaper_interval_seconds``."""

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], *, train: Send, validate: Send
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.train = train
        self.validate = validate
        self._revalidated: dict[str, float] = {}
        self._last_sweep = float("-inf")
        self._stop = threading.Event()

    def run_once(self, startup: bool = False) -> ReapReport:
        """One pass; at startup every queued/validating job's task is sent again.

        Returns:
            What was done.
        """
        report = ReapReport()
        report.requeued, report.paused = reap_stale(self.settings, self.sessions)
        window = None if startup else self.settings.requeue_after_seconds
        report.redispatched = claim_unstarted(self.sessions, window)
        clock = time.monotonic()
        for job_id in validating(self.sessions, window):
            last = self._revalidated.get(job_id)
            if startup or last is None or clock - last >= self.settings.requeue_after_seconds:
                self._revalidated[job_id] = clock
                report.revalidated.append(job_id)
        for job_id in report.requeued + report.redispatched:
            self.train(job_id)
        for job_id in report.revalidated:
            self.validate(job_id)
        if startup or clock - self._last_sweep >= SWEEP_SECONDS:
            self._last_sweep = clock
            report.swept = sweep_cancelled(self.settings, self.sessions)
        return report

    def reconcile(self) -> ReapReport:
        """The startup pass (also run when the service starts a worker).

        Adapters this machine trained before the object store existed are moved into it first
        (``worker/legacy.py``), so the engines, which load only from the store, can serve them.
        """
        try:
            adopt_legacy_adapters(self.settings, self.sessions)
        except Exception:  # noqa: BLE001 - retried at the next start; the reaper must run
            log.exception("moving this disk's older adapters into the store failed")
        report = self.run_once(startup=True)
        log.info("reaper start-up reconciliation: %s", report)
        return report

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.reaper_interval_seconds):
            try:
                report = self.run_once()
                if report.requeued or report.paused or report.redispatched or report.swept:
                    log.info("reaper: %s", report)
            except Exception:  # noqa: BLE001 - the reaper must outlive a database hiccup
                log.exception("reaper pass failed")

    def start(self) -> threading.Thread:
        """Start the periodic passes in a daemon thread (after one :meth:`reconcile`).

        Returns:
            The thread.
        """
        try:
            self.reconcile()
        except Exception:  # noqa: BLE001
            log.exception("reaper start-up reconciliation failed")
        thread = threading.Thread(target=self._loop, name="loraforge-reaper", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Ask the thread to end after its current pass."""
        self._stop.set()
