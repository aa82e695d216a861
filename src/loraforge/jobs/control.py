"""Pause and resume (OpenAI's ``POST /fine_tuning/jobs/{id}/pause`` and ``/resume``).

* A ``queued`` job is paused at once (its pending train task finds it paused and does nothing).
* A ``running`` job gets ``pause_requested``: its worker asks the trainer for a checkpoint at the
  next step boundary, the trainer exits (freeing the accelerator), and the worker marks the job
  ``paused``. Until then the job still reads ``running`` (an event says a pause is pending).
* Resume moves ``paused`` back to ``queued`` and sends the train task to the job's pool (planned
  again first if that pool is gone); the run continues from the pause checkpoint, ending with the
  same total steps.

Raises domain errors; knows no HTTP.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from loraforge.contracts.dispatch import Dispatcher
from loraforge.db.models import Job, Organization
from loraforge.errors import InvalidRequestError
from loraforge.jobs import placement
from loraforge.jobs.service import get_job
from loraforge.jobs.state import JobStatus, add_event, transition
from loraforge.settings import Settings


def _not_allowed(job: Job, action: str, allowed: str, code: str) -> InvalidRequestError:
    # 400, not 409: the SDK retries 409 and the answer would not change.
    return InvalidRequestError(
        f"Job {job.id} is {job.status}; only {allowed} jobs can be {action}.",
        param="fine_tuning_job_id",
        code=code,
    )


def pause_job(session: Session, org: Organization, job_id: str) -> Job:
    """Pause a queued job now, or ask a running job's worker to checkpoint and stop.

    Pausing a paused job (or one whose pause is pending) returns it unchanged.

    Raises:
        NotFoundError: no such job for this org.
        InvalidRequestError: the job is validating its files or has finished.
    """
    for _ in range(2):  # the job may start between our read and our update: look again once
        job = get_job(session, org, job_id)
        status = JobStatus(job.status)
        if status == JobStatus.PAUSED or (status == JobStatus.RUNNING and job.pause_requested):
            return job
        if status == JobStatus.QUEUED:
            if transition(
                session,
                job_id,
                JobStatus.PAUSED,
                "Fine-tuning job paused before it started",
                expect={"status": JobStatus.QUEUED.value},
            ):
                break
        elif status == JobStatus.RUNNING:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
                .values(pause_requested=True)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                add_event(session, job_id, "Pausing: saving a checkpoint, then freeing the accelerator")
                break
        else:
            raise _not_allowed(job, "paused", "queued or running", "job_not_pausable")
        session.expire(job)
    session.flush()
    session.refresh(job)
    return job


def resume_job(
    session: Session, settings: Settings, org: Organization, job_id: str, dispatcher: Dispatcher
) -> Job:
    """Move a paused job back to ``queued``, commit, and send its train task to its pool.

    Args:
        session: the request's session; committed here.
        settings: the worker pools (a job whose pool is gone is planned again).
        org: the caller's organization.
        job_id: the paused job.
        dispatcher: where the train task goes.

    Returns:
        The job, ``queued``. Nothing is sent when its pool is gone and no configured pool fits it
        now (it stays queued, with a warning event) or, without any plan, it was failed instead
        (``jobs/placement.py``).

    Raises:
        NotFoundError: no such job for this org.
        InvalidRequestError: the job is not paused (a pending pause is reported as such).
    """
    job = _requeue(session, org, job_id)
    pool = placement.dispatch_pool(settings, session, job)
    # Commit before sending: the worker that picks the task up must find the job queued.
    session.commit()
    session.refresh(job)
    if pool is not None:
        dispatcher.train_job(job.id, pool)
    return job


def _requeue(session: Session, org: Organization, job_id: str) -> Job:
    """``paused`` -> ``queued``, or the reason it cannot be."""
    job = get_job(session, org, job_id)
    if job.status == JobStatus.RUNNING.value and job.pause_requested:
        raise InvalidRequestError(
            f"Job {job_id} is still pausing (saving its checkpoint); resume it once its status is paused.",
            param="fine_tuning_job_id",
            code="job_not_resumable",
        )
    if job.status != JobStatus.PAUSED.value or not transition(
        session, job_id, JobStatus.QUEUED, "Fine-tuning job resumed"
    ):
        session.refresh(job)
        raise _not_allowed(job, "resumed", "paused", "job_not_resumable")
    session.flush()
    session.refresh(job)
    return job
