"""``FineTuningJob``, ``FineTuningJobEvent`` and ``FineTuningJobCheckpoint`` as OpenAI returns them,
with loraforge's extension fields on the job (``estimate``, ``plan``, the ``paused`` status)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import MISSING

from loraforge.api.schemas.common import IdentifiedObject, ListPage, Number, StoredObject
from loraforge.api.schemas.preflight import (
    FineTuneMethod,
    FineTuningJobError,
    FineTuningJobEstimate,
    FineTuningJobHyperparameters,
    FineTuningJobPlan,
)
from loraforge.db.models import Job, JobCheckpoint, JobEvent, Organization
from loraforge.jobs.placement import public_plan
from loraforge.jobs.state import JobStatus


class FineTuningJob(IdentifiedObject):
    """A fine-tuning job (``object: "fine_tuning.job"``)."""

    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: FineTuningJobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: FineTuningJobHyperparameters
    # What the user asked for: a base model, or the model a continued job starts from.
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    # OpenAI's six states plus ``paused`` (POST .../pause; resume continues from its checkpoint).
    status: JobStatus
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    # loraforge extension: the pre-flight estimate (steps, tokens, duration), set once the files
    # pass validation, so the job shows what it will cost before it runs.
    estimate: FineTuningJobEstimate | None
    # loraforge extension: the memory plan chosen at creation (pool, strategy, GPUs, token
    # budget, activation checkpointing, estimated peak memory per component).
    plan: FineTuningJobPlan | None
    # As sent at creation (OpenAI's ``FineTuningIntegration``); the org's W&B key is never here.
    integrations: list[dict[str, Any]] | None
    metadata: dict[str, str] | None
    method: FineTuneMethod
    user_provided_suffix: str | None


class ListPaginatedFineTuningJobsResponse(ListPage[FineTuningJob]):
    """``GET /v1/fine_tuning/jobs``."""


class FineTuningJobEvent(IdentifiedObject):
    """One event of a job: a message, or a ``metrics`` event with the step's numbers in ``data``."""

    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any]
    type: Literal["message", "metrics"]


class ListFineTuningJobEventsResponse(ListPage[FineTuningJobEvent]):
    """``GET /v1/fine_tuning/jobs/{job_id}/events``."""


class FineTuningJobCheckpointMetrics(StoredObject):
    """The metrics at the checkpoint's step, as stored (the keys the trainer reported)."""

    step: Number | MISSING = MISSING
    train_loss: Number | MISSING = MISSING
    train_mean_token_accuracy: Number | MISSING = MISSING
    valid_loss: Number | MISSING = MISSING
    valid_mean_token_accuracy: Number | MISSING = MISSING
    full_valid_loss: Number | MISSING = MISSING
    full_valid_mean_token_accuracy: Number | MISSING = MISSING


class FineTuningJobCheckpoint(IdentifiedObject):
    """An epoch-end checkpoint, servable as the model ``{fine_tuned_model}:ckpt-step-{N}``."""

    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: FineTuningJobCheckpointMetrics


class ListFineTuningJobCheckpointsResponse(ListPage[FineTuningJobCheckpoint]):
    """``GET /v1/fine_tuning/jobs/{job_id}/checkpoints``."""


def job_public(job: Job, org: Organization) -> FineTuningJob:
    """The ``FineTuningJob`` of a stored job."""
    plan = public_plan(job.plan)
    estimate = (job.preflight or {}).get("estimate")
    return FineTuningJob(
        id=job.id,
        created_at=job.created_at,
        error=FineTuningJobError.model_validate(job.error) if job.error else None,
        fine_tuned_model=job.fine_tuned_model,
        finished_at=job.finished_at,
        hyperparameters=FineTuningJobHyperparameters.model_validate(job.hyperparameters),
        model=job.parent_model or job.model,
        organization_id=org.id,
        result_files=list(job.result_files or []),
        seed=job.seed,
        status=JobStatus(job.status),
        trained_tokens=job.trained_tokens,
        training_file=job.training_file,
        validation_file=job.validation_file,
        estimated_finish=job.estimated_finish,
        estimate=FineTuningJobEstimate.model_validate(estimate) if estimate is not None else None,
        plan=FineTuningJobPlan.model_validate(plan) if plan is not None else None,
        integrations=job.integrations,
        metadata=job.user_metadata,
        method=FineTuneMethod.model_validate(job.method),
        user_provided_suffix=job.suffix,
    )


def event_public(event: JobEvent) -> FineTuningJobEvent:
    """The ``FineTuningJobEvent`` of a stored event."""
    return FineTuningJobEvent(
        id=event.id,
        created_at=event.created_at,
        level=event.level,  # type: ignore[arg-type]  # validated against the literal
        message=event.message,
        data=event.data or {},
        type=event.type,  # type: ignore[arg-type]  # validated against the literal
    )


def checkpoint_public(ckpt: JobCheckpoint) -> FineTuningJobCheckpoint:
    """The ``FineTuningJobCheckpoint`` of a stored checkpoint."""
    return FineTuningJobCheckpoint(
        id=ckpt.id,
        created_at=ckpt.created_at,
        fine_tuned_model_checkpoint=ckpt.fine_tuned_model_checkpoint,
        fine_tuning_job_id=ckpt.job_id,
        step_number=ckpt.step_number,
        metrics=FineTuningJobCheckpointMetrics.model_validate(ckpt.metrics or {}),
    )
