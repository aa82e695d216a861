"""The one job state machine. Every change is a conditional UPDATE (so the API and a worker
racing on the same job cannot both win) plus an event row (so a job never changes silently)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from loraforge.contracts.job_error import JobError
from loraforge.db.models import Job, JobEvent
from loraforge.ids import new_id, now
from loraforge.webhooks import outbox


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

# from -> allowed targets. RUNNING -> QUEUED is a re-queue after a lost worker.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.VALIDATING_FILES: frozenset({JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED, JobStatus.PAUSED}
    ),
    JobStatus.PAUSED: frozenset({JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED}),
}


def sources_of(target: JobStatus) -> list[str]:
    """The states from which ``target`` may be entered."""
    return [src.value for src, targets in TRANSITIONS.items() if target in targets]


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",  # noqa: A002 - OpenAI's field name
    data: dict[str, Any] | None = None,
) -> JobEvent:
    event = JobEvent(
        id=new_id("ftevent-"),
        job_id=job_id,
        created_at=now(),
        level=level,
        type=type,
        message=message,
        data=data if data is not None else {},
    )
    session.add(event)
    return event


def add_event_once(session: Session, job_id: str, message: str, *, level: str = "info") -> bool:
    """Add ``message`` unless it is already the job's latest event (a condition that persists).

    For what is re-checked on every re-send (a job kept queued because no pool fits it): the
    user sees it once per episode, not once per re-send; once something else happened to the
    job (another event), a recurrence is reported again.

    Returns:
        True when the event was added.
    """
    session.flush()  # an event added earlier in this transaction counts too
    latest = session.execute(
        select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.seq.desc()).limit(1)
    ).scalar_one_or_none()
    if latest == message:
        return False
    add_event(session, job_id, message, level=level)
    return True


def transition(
    session: Session,
    job_id: str,
    target: JobStatus,
    message: str,
    *,
    level: str = "info",
    expect: dict[str, Any] | None = None,
    event_data: dict[str, Any] | None = None,
    **fields: Any,
) -> bool:
    """Move ``job_id`` to ``target`` if its current state allows it; record ``message``.

    Args:
        expect: further column values the row must have for the change to happen, e.g.
            ``{"worker_id": wid}`` so that only the lease holder moves a running job on.
        event_data: the ``data`` of the event row.
        fields: other columns to set in the same UPDATE (``fine_tuned_model``, ``error``, …).

    Returns:
        True if this call made the change; False if the job was in a state that does not allow it
        (e.g. it was cancelled meanwhile) or did not match ``expect``.
    """
    values: dict[str, Any] = {"status": target.value, **fields}
    if target in TERMINAL:
        values.setdefault("finished_at", now())
        values.setdefault("estimated_finish", None)
    if target == JobStatus.QUEUED:
        values.setdefault("queued_at", now())
    if target != JobStatus.RUNNING:
        # Only a running job holds a lease; anything else releases it.
        values.setdefault("worker_id", None)
    conditions = [Job.id == job_id, Job.status.in_(sources_of(target))]
    for column, value in (expect or {}).items():
        attr = getattr(Job, column)
        conditions.append(attr.is_(None) if value is None else attr == value)
    result = session.execute(
        update(Job).where(*conditions).values(**values).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    add_event(session, job_id, message, level=level, data=event_data)
    if target in TERMINAL:
        # Webhooks owed for this change commit (or roll back) with it: the outbox.
        outbox.record_job_event(session, job_id, target.value, values["finished_at"])
    session.flush()
    return True


def fail(
    session: Session,
    job_id: str,
    error: JobError,
    *,
    expect: dict[str, Any] | None = None,
    **fields: Any,
) -> bool:
    """Move ``job_id`` to ``failed`` with ``error``: the one way a job fails.

    The job's ``error`` column, its "The job failed: …" event (level ``error``) and the webhook
    outbox row commit together, like every :func:`transition`; ``error`` is stored with all three
    keys whatever the cause, so a client reads every failure the same way.

    Args:
        session: the caller's transaction (the caller commits).
        job_id: the job.
        error: why it failed.
        expect: further column values the row must have, e.g. ``{"worker_id": wid}`` so that only
            the lease holder fails a running job.
        fields: other columns to set in the same UPDATE (``preflight``, …).

    Returns:
        True if this call failed the job; False if it was in a state that cannot fail (it finished
        or was cancelled meanwhile) or did not match ``expect``: nothing was written.
    """
    return transition(
        session,
        job_id,
        JobStatus.FAILED,
        f"The job failed: {error.message}",
        level="error",
        expect=expect,
        error=error.model_dump(),
        **fields,
    )


def restamp_queued(session: Session, job_id: str, expected: int | None, stamp: int) -> bool:
    """Move a queued job's ``queued_at`` from ``expected`` to ``stamp``, if both still hold.

    The compare-and-set that decides which sender may (re-)send a queued job's task: the reaper's
    re-send of stale jobs and a GPU-waiting task's re-send loop both claim the job this way, so
    two of them never send for the same ``queued_at``.

    Returns:
        True if this call moved it; False if the job left ``queued`` or someone else moved it.
    """
    same = Job.queued_at.is_(None) if expected is None else Job.queued_at == expected
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value, same)
        .values(queued_at=stamp)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]
