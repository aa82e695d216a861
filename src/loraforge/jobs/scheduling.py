"""Whether a queued job can start on this worker now: GPU leases, and waiting for them.

A cuda job needs ``plan.num_gpus`` GPUs of its pool that no other trainer on this host uses
(``jobs/gpu_leases.py``). When they are not free the job stays ``queued`` and its train task is
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

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.models import Job
from loraforge.db.session import session_scope
from loraforge.ids import now
from loraforge.jobs.gpu_leases import GpuLease, try_acquire
from loraforge.jobs.state import JobStatus, transition
from loraforge.planner.pools import pool_device_ids, resolve_pools
from loraforge.settings import Settings, TrainPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admission:
    """The answer: start (with the lease, None when no GPU is needed) or wait."""

    wait: bool = False
    lease: GpuLease | None = None


def _candidates(settings: Settings, plan: dict[str, object], count: int) -> tuple[str, ...]:
    pools = {p.name: p for p in resolve_pools(settings)}
    pool = pools.get(str(plan.get("pool")))
    if pool is None or pool.device != "cuda":
        # Dispatch re-plans a job whose pool is gone (jobs/planning.py); this is the worker that
        # consumed its queue anyway: lease from the GPUs this process sees.
        pool = TrainPool(name="unlisted", device="cuda", count=count, memory_gib=1)
    return pool_device_ids(pool)


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
        busy. A plan needing more GPUs than this host's pool has fails the job (it can never
        start here) and answers ``Admission()``.
    """
    with session_scope(sessions) as session:
        status, plan = session.execute(select(Job.status, Job.plan).where(Job.id == job_id)).one()
    if status != JobStatus.QUEUED.value or not plan or plan.get("device") != "cuda":
        return Admission()
    count = max(int(plan.get("num_gpus") or 1), 1)
    candidates = _candidates(settings, plan, count)
    try:
        lease = try_acquire(settings.home, candidates, count)
    except ValueError as exc:
        with session_scope(sessions) as session:
            message = f"This worker cannot run the job's plan: {exc}."
            transition(
                session,
                job_id,
                JobStatus.FAILED,
                f"The job failed: {message}",
                level="error",
                error={"code": "training_error", "message": message, "param": None},
            )
        return Admission()
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
        same = Job.queued_at.is_(None) if expected is None else Job.queued_at == expected
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value, same)
            .values(queued_at=token)
            .execution_options(synchronize_session=False)
        )
        return token if result.rowcount == 1 else None  # type: ignore[attr-defined]
