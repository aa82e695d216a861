"""Whether a queued job can start on this worker now: GPU leases, and waiting for them.

A cuda job needs ``plan.num_gpus`` GPUs of its pool that no other trainer on this host uses
(``worker/gpu_leases.py``). When they are not free the job stays ``queued`` and its train task is
sent again with a countdown (``gpu_wait_seconds``) instead of blocking a worker slot: a slot held
by a waiting job would stall validations and CPU jobs, and a waiting GPU job may wait for hours.

Re-sending must not multiply messages (the reaper and worker start-up also send a queued job's
task, and each copy that finds the GPUs busy would otherwise start its own chain of re-sends).
So the chain is owned through ``queued_at``: a copy that waits moves ``queued_at`` forward with a
compare-and-set from the value it knows (its ``wait_token``, or for a fresh message the value it
reads) and passes the new value on. Whoever moved it last owns the chain; a copy whose
compare-and-set fails drops itself. Moving ``queued_at`` forward also tells the reaper the job's
message is alive, so it does not re-dispatch a waiting job; if the chain dies with its worker,
``queued_at`` stops moving and the reaper re-sends after ``requeue_after_seconds``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loraforge.contracts.job_error import JobError
from loraforge.db.models import Job
from loraforge.db.session import session_scope
from loraforge.ids import now
from loraforge.jobs import placement
from loraforge.jobs.state import JobStatus, add_event_once, fail, restamp_queued
from loraforge.planner.pools import pool_device_ids, resolve_pools
from loraforge.settings import Settings, TrainPool
from loraforge.worker.gpu_leases import GpuLease, try_acquire

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admission:
    """The answer: start (with the lease, None when no GPU is needed) or wait."""

    wait: bool = False
    lease: GpuLease | None = None


def _candidates(pool: TrainPool | None, count: int) -> tuple[str, ...]:
    if pool is None or pool.device != "cuda":
        # A pool this worker's configuration does not name (dispatch keeps such a job queued, but
        # this message was already on a queue the worker consumes): lease the GPUs it sees.
        pool = TrainPool(name="unlisted", device="cuda", count=count, memory_gib=1)
    return pool_device_ids(pool)


def _lease_error(sessions: sessionmaker[Session], job_id: str, exc: Exception) -> Admission:
    """An unexpected error while leasing: the job stays queued and is retried (a host problem).

    Why not fail the job: a lock file that cannot be opened or locked (a full disk, permissions,
    an NFS lock daemon that is down) is this host's fault, not the job's, and heals once the
    operator fixes it; the re-send after ``gpu_wait_seconds`` retries. The user sees why once.
    """
    log.error("job %s: could not lease GPUs on this host (retried): %r", job_id, exc, exc_info=exc)
    with session_scope(sessions) as session:
        add_event_once(
            session,
            job_id,
            f"Waiting: this worker could not lease GPUs ({type(exc).__name__}: {exc}); the job stays "
            "queued and is retried.",
            level="warn",
        )
    return Admission(wait=True)


def admit(settings: Settings, sessions: sessionmaker[Session], job_id: str) -> Admission:
    """Lease the GPUs the job's plan needs, if it needs any.

    Args:
        settings: ``home`` (lock files) and the pools.
        sessions: the database.
        job_id: a job whose train task this worker is running.

    Returns:
        ``Admission(lease=...)`` to start (the caller holds the lease for the trainer's life and
        releases it), ``Admission()`` to start without GPUs (a CPU plan, or a job that is not
        queued: the caller's start finds that out), ``Admission(wait=True)`` when the GPUs are
        busy, when leasing failed unexpectedly (:func:`_lease_error`), or when the plan no longer
        fits its pool (more GPUs or memory than the pool has now): the re-send goes through
        dispatch, which plans the job again (``jobs/placement.py``) rather than failing or running
        it into an OOM. A plan that matches the configuration but needs more GPUs than this
        host has fails the job (it can never start here) and answers ``Admission()``.
    """
    with session_scope(sessions) as session:
        status, plan = session.execute(select(Job.status, Job.plan).where(Job.id == job_id)).one()
    if status != JobStatus.QUEUED.value or not plan or plan.get("device") != "cuda":
        return Admission()
    pools = resolve_pools(settings)
    pool = next((p for p in pools if p.name == plan.get("pool")), None)
    if pool is not None and placement.stale_reason(plan, pools) is not None:
        log.info("job %s: its plan no longer fits pool %s; planned again at its re-send", job_id, pool.name)
        return Admission(wait=True)
    count = max(int(plan.get("num_gpus") or 1), 1)
    candidates = _candidates(pool, count)
    try:
        lease = try_acquire(settings.home, candidates, count)
    except ValueError as exc:
        with session_scope(sessions) as session:
            error = JobError(code="training_error", message=f"This worker cannot run the job's plan: {exc}.")
            fail(session, job_id, error)
        return Admission()
    except Exception as exc:  # noqa: BLE001 - any lease failure is the host's: see _lease_error
        return _lease_error(sessions, job_id, exc)
    if lease is None:
        log.info("job %s waits for %d free GPU(s) of %s", job_id, count, list(candidates))
        return Admission(wait=True)
    return Admission(lease=lease)


def keep_waiting(sessions: sessionmaker[Session], job_id: str, wait_token: int | None) -> int | None:
    """Claim the job's wait chain before re-sending its task (module docstring).

    Args:
        sessions: the database.
        job_id: the waiting job.
        wait_token: the ``queued_at`` this copy of the task set last; None for a fresh message.

    Returns:
        The token to send with the re-sent task, or None: the job is no longer queued, or
        another copy of its task owns the chain (this copy must not re-send).
    """
    with session_scope(sessions) as session:
        row = session.execute(select(Job.status, Job.queued_at).where(Job.id == job_id)).one_or_none()
        if row is None or row.status != JobStatus.QUEUED.value:
            return None
        expected = row.queued_at if wait_token is None else wait_token
        if row.queued_at != expected:
            return None
        # Strictly increasing even within one second, so two copies never hold the same token.
        token = max(now(), (expected or 0) + 1)
        return token if restamp_queued(session, job_id, expected, token) else None
