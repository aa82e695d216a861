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
* a job whose task the reaper itself sent (re-queued, re-sent, or at start-up) is watched: if it
  is still ``queued`` with the ``queued_at`` of that send after ``requeue_check_seconds``, nobody
  took the message, and it is sent again, the wait doubling up to ``requeue_after_seconds``. So
  a lost message costs seconds, not the 5-minute window meant for jobs that only wait their turn.
  A job whose ``queued_at`` moved was claimed by someone else (a GPU-waiting task's re-send loop,
  another reaper) and is no longer watched;
* a cancelled job's leftover checkpoints and adapter on this machine are removed.

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
from loraforge.worker import artefacts

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
    # Sent again because a task the reaper sent was not taken in time.
    resent: list[str] = field(default_factory=list)


@dataclass
class _Watch:
    """A job whose task the reaper sent: the ``queued_at`` it left, when to look, the next wait."""

    queued_at: int | None
    due: float
    delay: float


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


def queued_stamps(sessions: sessionmaker[Session], job_ids: list[str]) -> dict[str, int | None]:
    """``queued_at`` of those of ``job_ids`` that are still ``queued``."""
    if not job_ids:
        return {}
    with session_scope(sessions) as session:
        rows = session.execute(
            select(Job.id, Job.queued_at).where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED.value)
        )
        return dict(rows.tuples().all())


def claim_untaken(sessions: sessionmaker[Session], job_id: str, seen: int | None) -> int | None:
    """Claim a watched job for a re-send: move its ``queued_at`` on from ``seen``.

    Returns:
        The new ``queued_at``, or None: the job left ``queued`` or someone else claimed it.
    """
    stamp = max(now(), (seen or 0) + 1)  # strictly later: two reapers never both claim one send
    with session_scope(sessions) as session:
        return stamp if restamp_queued(session, job_id, seen, stamp) else None


def validating(sessions: sessionmaker[Session], older_than: float | None) -> list[str]:
    """Jobs still in ``validating_files`` (created more than ``older_than`` seconds ago)."""
    with session_scope(sessions) as session:
        stmt = select(Job.id).where(Job.status == JobStatus.VALIDATING_FILES.value)
        if older_than is not None:
            stmt = stmt.where(Job.created_at < now() - int(older_than))
        return list(session.execute(stmt).scalars())


def sweep_cancelled(settings: Settings, sessions: sessionmaker[Session]) -> list[str]:
    """Remove checkpoints (and adapters) left on this machine by cancelled or deleted jobs."""
    root = settings.runs_dir
    candidates = (
        [p.name for p in root.iterdir() if (p / artefacts.CHECKPOINTS).is_dir()] if root.is_dir() else []
    )
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
        self._watched: dict[str, _Watch] = {}
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
        report.resent = self._claim_untaken(clock)
        sent = report.requeued + report.redispatched + report.resent
        # Read before sending: a worker that takes the task at once may move ``queued_at`` itself.
        stamps = queued_stamps(self.sessions, sent)
        for job_id in sent:
            self.train(job_id)
        self._watch(sent, stamps, clock)
        for job_id in report.revalidated:
            self.validate(job_id)
        if startup or clock - self._last_sweep >= SWEEP_SECONDS:
            self._last_sweep = clock
            report.swept = sweep_cancelled(self.settings, self.sessions)
        return report

    def _claim_untaken(self, clock: float) -> list[str]:
        """Watched jobs whose task nobody took in time, claimed for a re-send."""
        due = [job_id for job_id, watch in self._watched.items() if watch.due <= clock]
        stamps = queued_stamps(self.sessions, due)
        claimed = []
        for job_id in due:
            watch = self._watched.pop(job_id)
            if job_id not in stamps or stamps[job_id] != watch.queued_at:
                continue  # taken (no longer queued), or claimed by another sender
            if claim_untaken(self.sessions, job_id, watch.queued_at) is None:
                continue
            log.warning("job %s: its task was not taken within %.0f s; sending it again", job_id, watch.delay)
            claimed.append(job_id)
            # Keep the doubled wait for the next look (``_watch`` reads it back).
            self._watched[job_id] = _Watch(None, clock, min(2 * watch.delay, self._longest_wait()))
        return claimed

    def _longest_wait(self) -> float:
        return max(self.settings.requeue_after_seconds, self.settings.requeue_check_seconds)

    def _watch(self, sent: list[str], stamps: dict[str, int | None], clock: float) -> None:
        """Look again at each job just sent once its wait is over (module docstring)."""
        for job_id in sent:
            if job_id not in stamps:
                self._watched.pop(job_id, None)  # already taken
                continue
            previous = self._watched.get(job_id)
            delay = previous.delay if previous is not None else self.settings.requeue_check_seconds
            self._watched[job_id] = _Watch(stamps[job_id], clock + delay, delay)

    def reconcile(self) -> ReapReport:
        """The startup pass (also run when the service starts a worker)."""
        report = self.run_once(startup=True)
        log.info("reaper start-up reconciliation: %s", report)
        return report

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.reaper_interval_seconds):
            try:
                report = self.run_once()
                if report.requeued or report.paused or report.redispatched or report.resent or report.swept:
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
