"""The memory plan of a job: made at creation, stored on the job, read by the worker.

A job that no worker pool can train is refused at creation with a 400 (``code:
model_too_large_for_workers``, ``param: model``) instead of failing after minutes of loading.
The stored plan decides the Celery queue (``train.<pool>``) and is copied into the trainer's
``TrainSpec.plan``. A job is planned again when it is dispatched without a usable plan: none
(created before plans) or a pool that is no longer configured (the pools changed since); if
nothing fits any more it is failed rather than left queued on a queue no worker consumes.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loraforge.catalog import BaseModelEntry, load_catalog
from loraforge.db.models import Job
from loraforge.db.session import session_scope
from loraforge.errors import InvalidRequestError
from loraforge.jobs.state import JobStatus, add_event, transition
from loraforge.planner import JobPlan, NoFit, plan_job, resolve_pools
from loraforge.settings import Settings, TrainPool
from loraforge.trainer.spec import TrainPlan

CODE = "model_too_large_for_workers"


def _largest(pools: list[TrainPool]) -> TrainPool | None:
    return max(pools, key=lambda p: (p.memory_gib, p.count), default=None)


def _refusal(entry: BaseModelEntry, no_fit: NoFit, max_seq_length: int) -> InvalidRequestError:
    pools = list(no_fit.pools)
    eligible = [p for p in pools if p.device in no_fit.eligible_devices]
    devices = " or ".join(no_fit.eligible_devices)
    if not eligible:
        listed = ", ".join(p.describe() for p in pools) or "none"
        message = (
            f"No worker pool can train {entry.id}: it trains on {devices} and this deployment's "
            f"pools are: {listed}. Add a pool (LORAFORGE_TRAIN_POOLS) or pick a smaller model."
        )
    else:
        largest = _largest(eligible)
        assert largest is not None
        if no_fit.required_gib is not None:
            need = (
                f"at least {math.ceil(no_fit.required_gib)} GiB on one GPU ({no_fit.strategy}, "
                f"micro-batches of {max_seq_length:,} tokens, activation checkpointing)"
            )
        else:  # the catalog entry forces FSDP: its need depends on the GPU count
            gpus = f"{entry.training.gpus} GPUs" if entry.training.gpus else "several GPUs"
            need = f"FSDP over {gpus} of one pool, with more GPUs or memory than any pool has"
        message = (
            f"{entry.id} does not fit any worker pool: training it needs {need}, and the largest "
            f"pool that can train it is {largest.describe()}. Add a larger pool "
            "(LORAFORGE_TRAIN_POOLS), lower max_seq_length, or pick a smaller model."
        )
    return InvalidRequestError(message, param="model", code=CODE)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None  # "auto": None


def plan_for(settings: Settings, entry: BaseModelEntry, hyperparameters: dict[str, Any]) -> JobPlan:
    """Plan a job on ``entry`` with its resolved hyperparameters onto this deployment's pools.

    Args:
        settings: where the pools are configured.
        entry: the job's base model.
        hyperparameters: the job's hyperparameters with LoRA defaults filled in
            (``jobs.compat.servable_hyperparameters``).

    Returns:
        The plan.

    Raises:
        InvalidRequestError: 400 ``model_too_large_for_workers`` when no pool and strategy fit.
    """
    max_seq_length = int(hyperparameters.get("max_seq_length") or entry.max_seq_length)
    result = plan_job(
        entry,
        resolve_pools(settings),
        lora_r=int(hyperparameters.get("lora_r") or entry.lora.r),
        target_modules=list(hyperparameters.get("lora_target_modules") or entry.lora.target_modules),
        max_seq_length=max_seq_length,
        batch_size=_int_or_none(hyperparameters.get("batch_size")),
    )
    if isinstance(result, NoFit):
        raise _refusal(entry, result, max_seq_length)
    return result


def public_plan(plan: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of a stored plan the API shows (the job and the dry run)."""
    if plan is None:
        return None
    keys = (
        "pool",
        "device",
        "strategy",
        "num_gpus",
        "token_budget",
        "gradient_checkpointing",
        "checkpoint_layers",
        "estimated_peak_gib",
        "breakdown_gib",
        "summary",
    )
    return {k: plan.get(k) for k in keys}


def _fail(session: Session, job: Job, message: str, code: str) -> None:
    transition(
        session,
        job.id,
        JobStatus.FAILED,
        f"The job failed: {message}",
        level="error",
        error={"code": code, "message": message, "param": "model"},
    )


def _replan(settings: Settings, session: Session, job: Job, why: str) -> str | None:
    """Plan ``job`` again onto the configured pools and store it; fail it if nothing fits."""
    entry = load_catalog(settings.models_config).get(job.model)
    if entry is None:
        _fail(session, job, f"Base model {job.model} is not in the catalog.", "model_not_found")
        return None
    try:
        plan = plan_for(settings, entry, job.hyperparameters or {})
    except InvalidRequestError as exc:
        _fail(session, job, f"{why}, and it no longer fits: {exc.message}", CODE)
        return None
    job.plan = plan.to_record()
    add_event(
        session, job.id, f"Planned: {plan.summary()}", data={**(public_plan(job.plan) or {}), "reason": why}
    )
    session.flush()
    return plan.pool.name


def dispatch_pool(settings: Settings, session: Session, job: Job) -> str | None:
    """The pool whose queue trains ``job``, planning it again first if its plan is unusable.

    A job with no plan (created before plans) or planned onto a pool that is not configured now
    is planned again: the new plan is stored with a "Planned: …" event. The caller commits.

    Args:
        settings: the pools and the catalog.
        session: the session ``job`` was loaded in.
        job: a job about to be dispatched to a train queue.

    Returns:
        The pool name, or None when the job was failed instead (its model fits no pool any more,
        or left the catalog): nothing must be sent.
    """
    stored = (job.plan or {}).get("pool")
    names = [pool.name for pool in resolve_pools(settings)]
    if stored in names:
        return str(stored)
    why = (
        "The job had no memory plan (created before plans)"
        if not stored
        else f"Its pool {stored!r} is no longer configured (pools: {', '.join(names) or 'none'})"
    )
    return _replan(settings, session, job, why)


def pool_of(settings: Settings, sessions: sessionmaker[Session], job_id: str) -> str | None:
    """:func:`dispatch_pool` of the job ``job_id``, in its own transaction."""
    with session_scope(sessions) as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        return dispatch_pool(settings, session, job)


def train_plan(job: Job) -> TrainPlan | None:
    """The trainer's part of the job's stored plan (None: a job created before plans)."""
    if not job.plan:
        return None
    return TrainPlan.model_validate({k: v for k, v in job.plan.items() if k in TrainPlan.model_fields})
