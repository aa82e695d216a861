"""Create, read, list and cancel fine-tuning jobs. Raises domain errors; knows no HTTP."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from loraforge.adapters import registry
from loraforge.catalog import Catalog
from loraforge.contracts.dispatch import Dispatcher
from loraforge.db.models import FileRecord, Job, JobEvent, Organization
from loraforge.db.pagination import paginate
from loraforge.errors import InvalidRequestError, NotFoundError
from loraforge.files.quota import file_is_live
from loraforge.ids import new_id, now
from loraforge.jobs import checkpoints, file_checks, placement
from loraforge.jobs.compat import servable_hyperparameters
from loraforge.jobs.limits import check_hosted_model_limit
from loraforge.jobs.params import JobCreateParams
from loraforge.jobs.state import TERMINAL, JobStatus, add_event, transition
from loraforge.org_integrations import WANDB, get_integration
from loraforge.settings import Settings
from loraforge.storage.blobs import BlobStore


def _check_training_file(
    session: Session, org: Organization, file_id: str, param: str, *, refuse_failed: bool = True
) -> FileRecord:
    """The org's fine-tune file ``file_id``; a file whose upload check failed is refused unless
    ``refuse_failed`` is False (the dry run reports on it instead)."""
    record = session.execute(
        select(FileRecord).where(FileRecord.id == file_id, FileRecord.org_id == org.id, file_is_live())
    ).scalar_one_or_none()
    if record is None:
        raise InvalidRequestError(
            f"invalid {param}: {file_id} (no such file)", param=param, code="file_not_found"
        )
    if record.purpose != "fine-tune":
        raise InvalidRequestError(
            f"invalid {param}: {file_id} has purpose '{record.purpose}', expected 'fine-tune'",
            param=param,
            code="invalid_file_purpose",
        )
    if refuse_failed and record.status == "error":
        raise InvalidRequestError(
            f"invalid {param}: {file_id} failed validation: {record.status_details}",
            param=param,
            code=f"invalid_{param}",
        )
    return record


def resolve_base_model(session: Session, catalog: Catalog, org: Organization, model: str) -> str:
    """The public catalog id a job on ``model`` trains on.

    ``model`` may be a catalog model, or, for continued fine-tuning, one of the org's fine-tuned
    models or checkpoint models (``…:ckpt-step-N``): training then starts from that adapter on
    its base (the job keeps the name in ``parent_model``).

    Raises:
        ModelNotFoundError: ``model`` is none of these.
    """
    entry = catalog.get(model)
    if entry is not None:
        return entry.id
    return registry.resolve(session, org, model).base_model


def _check_method(params: JobCreateParams) -> None:
    """Supervised and DPO jobs train; reinforcement fine-tuning is refused."""
    if params.method is not None and params.method.type not in ("supervised", "dpo"):
        raise InvalidRequestError(
            f"method.type '{params.method.type}' is not supported yet; use 'supervised' or 'dpo'.",
            param="method.type",
            code="unsupported_method",
        )


def _check_integrations(session: Session, org: Organization, params: JobCreateParams) -> list[Any] | None:
    """The ``integrations`` to store, as sent; a W&B one needs the org's W&B key.

    Raises:
        InvalidRequestError: a W&B integration for an org that has not set its key.
    """
    if not params.integrations:
        return None
    if get_integration(session, org.id, WANDB) is None:
        raise InvalidRequestError(
            "The W&B integration needs the organization's W&B API key: set it with "
            "POST /v1/organization/integrations/wandb (or `loraforge orgs wandb`).",
            param="integrations",
            code="wandb_not_configured",
        )
    return [integration.model_dump(exclude_unset=True) for integration in params.integrations]


def _method_record(params: JobCreateParams, hyper: dict[str, Any]) -> dict[str, Any]:
    kind = params.method.type if params.method is not None else "supervised"
    return {"type": kind, kind: {"hyperparameters": hyper}}


def dry_run_job(
    session: Session,
    catalog: Catalog,
    settings: Settings,
    blobs: BlobStore,
    org: Organization,
    params: JobCreateParams,
) -> dict[str, Any]:
    """``dry_run: true``: the request checks a real create makes, then the pre-flight a worker
    makes (``jobs/file_checks.py``), answered now; nothing is stored.

    Raises:
        InvalidRequestError, NotFoundError: as :func:`create_job` does, except that a file whose
            upload check failed is reported on, not refused.
    """
    _check_method(params)
    base = resolve_base_model(session, catalog, org, params.model)
    training = _check_training_file(session, org, params.training_file, "training_file", refuse_failed=False)
    validation = None
    if params.validation_file:
        validation = _check_training_file(
            session, org, params.validation_file, "validation_file", refuse_failed=False
        )
    hyper = servable_hyperparameters(catalog, base, params)
    _check_integrations(session, org, params)
    entry = catalog.get(base)
    assert entry is not None
    plan = placement.plan_for(settings, entry, hyper)  # 400 if no worker pool can train it
    report = file_checks.dry_run(session, settings, blobs, entry, params, hyper, training, validation)
    return {**report, "plan": placement.public_plan(plan.to_record())}


def create_job(
    session: Session,
    catalog: Catalog,
    settings: Settings,
    org: Organization,
    params: JobCreateParams,
    dispatcher: Dispatcher,
) -> Job:
    """Create a job in ``validating_files``, commit it, and queue its validation task.

    Args:
        session: the request's session; committed here.
        catalog: the base models.
        settings: the worker pools the job is planned onto.
        org: the caller's organization.
        params: the request.
        dispatcher: where the validation task goes.

    Returns:
        The stored job.

    Raises:
        InvalidRequestError, NotFoundError, ModelNotFoundError: a refusal; nothing was stored or sent.
    """
    job = _store_job(session, catalog, settings, org, params)
    # Commit before sending: the worker must find the job. If sending fails the job is stored
    # anyway and the error answered; an idempotent retry replays that answer, it never re-creates.
    session.commit()
    dispatcher.validate_job(job.id)
    return job


def _store_job(
    session: Session, catalog: Catalog, settings: Settings, org: Organization, params: JobCreateParams
) -> Job:
    """Validate ``params`` against the catalog, the org's files and the worker pools; store the job.

    Every refusal is raised before anything is stored.
    """
    _check_method(params)
    base = resolve_base_model(session, catalog, org, params.model)
    _check_training_file(session, org, params.training_file, "training_file")
    if params.validation_file:
        _check_training_file(session, org, params.validation_file, "validation_file")

    hyper = servable_hyperparameters(catalog, base, params)  # 400 if the LoRA could not be served
    entry = catalog.get(base)
    assert entry is not None
    plan = placement.plan_for(settings, entry, hyper)  # 400 model_too_large_for_workers
    check_hosted_model_limit(session, org)  # 400 hosted_model_limit_reached past the plan's limit
    integrations = _check_integrations(session, org, params)
    job = Job(
        id=new_id("ftjob-"),
        org_id=org.id,
        model=base,
        # Continued fine-tuning: the fine-tuned model or checkpoint to start from.
        parent_model=None if catalog.get(params.model) is not None else params.model,
        training_file=params.training_file,
        validation_file=params.validation_file,
        status=JobStatus.VALIDATING_FILES.value,
        method=_method_record(params, hyper),
        hyperparameters=hyper,
        suffix=params.suffix,
        seed=params.seed if params.seed is not None else secrets.randbelow(2**31),
        user_metadata=params.metadata,
        created_at=now(),
        result_files=[],
        plan=plan.to_record(),
        integrations=integrations,
    )
    session.add(job)
    session.flush()
    add_event(session, job.id, f"Created fine-tuning job: {job.id}")
    add_event(session, job.id, f"Planned: {plan.summary()}", data=placement.public_plan(job.plan))
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
    # A cancelled job keeps no checkpoint models; the worker (running job) or the reaper (paused
    # one) removes their directories.
    checkpoints.delete_all(session, job_id)
    session.refresh(job)
    return job
