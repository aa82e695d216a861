"""Create, read, list and cancel fine-tuning jobs. Raises domain errors; knows no HTTP."""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from loraforge.catalog import Catalog
from loraforge.db.models import FileRecord, FineTunedModel, Job, JobEvent, Organization
from loraforge.db.pagination import paginate
from loraforge.errors import InvalidRequestError, ModelNotFoundError, NotFoundError
from loraforge.ids import new_id, now
from loraforge.jobs.params import JobCreateParams
from loraforge.jobs.state import TERMINAL, JobStatus, add_event, transition


def _check_training_file(session: Session, org: Organization, file_id: str, param: str) -> FileRecord:
    record = session.execute(
        select(FileRecord).where(FileRecord.id == file_id, FileRecord.org_id == org.id)
    ).scalar_one_or_none()
    if record is None:
        raise InvalidRequestError(f"invalid {param}: {file_id} (no such file)", param=param)
    if record.purpose != "fine-tune":
        raise InvalidRequestError(
            f"invalid {param}: {file_id} has purpose '{record.purpose}', expected 'fine-tune'", param=param
        )
    if record.status == "error":
        raise InvalidRequestError(
            f"invalid {param}: {file_id} failed validation: {record.status_details}", param=param
        )
    return record


def resolve_base_model(session: Session, catalog: Catalog, org: Organization, model: str) -> str:
    """The public catalog id a job on ``model`` trains on.

    Raises:
        ModelNotFoundError: ``model`` is neither a catalog model nor one of the org's fine-tuned models.
    """
    entry = catalog.get(model)
    if entry is not None:
        return entry.id
    ftm = session.execute(
        select(FineTunedModel).where(FineTunedModel.id == model, FineTunedModel.org_id == org.id)
    ).scalar_one_or_none()
    if ftm is None:
        raise ModelNotFoundError(model)
    raise InvalidRequestError(
        "Continued fine-tuning from a fine-tuned model is not supported yet; use its base model "
        f"{ftm.base_model}.",
        param="model",
    )


def create_job(session: Session, catalog: Catalog, org: Organization, params: JobCreateParams) -> Job:
    """Validate ``params`` against the catalog and the org's files; store the job.

    The job starts in ``validating_files``; the caller enqueues its validation task after commit.
    """
    if params.method is not None and params.method.type != "supervised":
        raise InvalidRequestError(
            f"method.type '{params.method.type}' is not supported yet; use 'supervised'.",
            param="method.type",
        )
    base = resolve_base_model(session, catalog, org, params.model)
    _check_training_file(session, org, params.training_file, "training_file")
    if params.validation_file:
        _check_training_file(session, org, params.validation_file, "validation_file")

    hyper = params.requested_hyperparameters().model_dump()
    job = Job(
        id=new_id("ftjob-"),
        org_id=org.id,
        model=base,
        training_file=params.training_file,
        validation_file=params.validation_file,
        status=JobStatus.VALIDATING_FILES.value,
        method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
        hyperparameters=hyper,
        suffix=params.suffix,
        seed=params.seed if params.seed is not None else secrets.randbelow(2**31),
        user_metadata=params.metadata,
        created_at=now(),
        result_files=[],
    )
    session.add(job)
    session.flush()
    add_event(session, job.id, f"Created fine-tuning job: {job.id}")
    add_event(session, job.id, f"Validating training file: {job.training_file}")
    session.flush()
    return job


def get_job(session: Session, org: Organization, job_id: str) -> Job:
    """The org's job ``job_id``. Raises NotFoundError for unknown ids and other orgs' jobs."""
    job = session.execute(select(Job).where(Job.id == job_id, Job.org_id == org.id)).scalar_one_or_none()
    if job is None:
        raise NotFoundError(f"No fine-tuning job found with id '{job_id}'.", param="fine_tuning_job_id")
    return job


def list_jobs(
    session: Session, org: Organization, *, after: str | None, limit: int, metadata: dict[str, str]
) -> tuple[list[Job], bool]:
    stmt = select(Job).where(Job.org_id == org.id)
    if metadata:
        # JSON filtering differs between SQLite and PostgreSQL; filter the org's jobs in Python
        # only when a metadata filter is given (rare, and bounded by the org's job count).
        ids = [
            job.id
            for job in session.execute(stmt).scalars()
            if all((job.user_metadata or {}).get(k) == v for k, v in metadata.items())
        ]
        stmt = stmt.where(Job.id.in_(ids))
    return paginate(session, stmt, Job, after=after, limit=limit)


def list_events(
    session: Session, org: Organization, job_id: str, *, after: str | None, limit: int
) -> tuple[list[JobEvent], bool]:
    get_job(session, org, job_id)
    return paginate(
        session, select(JobEvent).where(JobEvent.job_id == job_id), JobEvent, after=after, limit=limit
    )


def cancel_job(session: Session, org: Organization, job_id: str) -> Job:
    """Cancel a job that has not finished. A running job's trainer is stopped by its worker.

    Raises:
        InvalidRequestError: the job already finished (400, not 409: the SDK retries 409).
    """
    job = get_job(session, org, job_id)
    if JobStatus(job.status) in TERMINAL:
        raise InvalidRequestError(
            f"Job {job_id} has already {job.status}; only unfinished jobs can be cancelled.",
            param="fine_tuning_job_id",
            code="job_not_cancellable",
        )
    job.cancel_requested = True
    session.flush()
    if not transition(session, job_id, JobStatus.CANCELLED, "The job was cancelled"):
        # It finished between our read and our update.
        session.refresh(job)
        raise InvalidRequestError(
            f"Job {job_id} has already {job.status}; only unfinished jobs can be cancelled.",
            param="fine_tuning_job_id",
            code="job_not_cancellable",
        )
    session.refresh(job)
    return job
