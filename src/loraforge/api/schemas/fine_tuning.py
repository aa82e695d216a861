"""``FineTuningJob``, ``FineTuningJobEvent`` and checkpoint objects as OpenAI returns them."""

from __future__ import annotations

from typing import Any

from loraforge.db.models import Job, JobCheckpoint, JobEvent, Organization
from loraforge.jobs.placement import public_plan


def job_public(job: Job, org: Organization) -> dict[str, Any]:
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "error": job.error or None,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": job.finished_at,
        "hyperparameters": dict(job.hyperparameters),
        # What the user asked for: a base model, or the model a continued job starts from.
        "model": job.parent_model or job.model,
        "organization_id": org.id,
        "result_files": list(job.result_files or []),
        "seed": job.seed,
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "estimated_finish": job.estimated_finish,
        # loraforge extension: the pre-flight estimate (steps, tokens, duration), set once the
        # files pass validation, so the job shows what it will cost before it runs.
        "estimate": (job.preflight or {}).get("estimate"),
        # loraforge extension: the memory plan chosen at creation (pool, strategy, GPUs, token
        # budget, activation checkpointing, estimated peak memory per component).
        "plan": public_plan(job.plan),
        "integrations": None,
        "metadata": job.user_metadata,
        "method": job.method,
        "user_provided_suffix": job.suffix,
    }


def event_public(event: JobEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "object": "fine_tuning.job.event",
        "created_at": event.created_at,
        "level": event.level,
        "message": event.message,
        "data": event.data or {},
        "type": event.type,
    }


def checkpoint_public(ckpt: JobCheckpoint) -> dict[str, Any]:
    return {
        "id": ckpt.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": ckpt.created_at,
        "fine_tuned_model_checkpoint": ckpt.fine_tuned_model_checkpoint,
        "fine_tuning_job_id": ckpt.job_id,
        "step_number": ckpt.step_number,
        "metrics": dict(ckpt.metrics or {}),
    }
