"""The memory plan of a job: made at creation, stored on the job, read by the worker.

A job that no worker pool can train is refused at creation with a 400 (``code:
model_too_large_for_workers``, ``param: model``) instead of failing after minutes of loading.
The stored plan decides the Celery queue (``train.<pool>``) and is copied into the trainer's
``TrainSpec.plan``.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loraforge.catalog import BaseModelEntry
from loraforge.db.models import Job
from loraforge.db.session import session_scope
from loraforge.errors import InvalidRequestError
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
        need = (
            f"at least {math.ceil(no_fit.required_gib)} GiB on one GPU ({no_fit.strategy}, "
            f"micro-batches of {max_seq_length:,} tokens, activation checkpointing)"
            if no_fit.required_gib is not None
            else f"more GPUs or memory than any pool has for the {entry.training.strategy} strategy"
        )
        message = (
            f"{entry.id} does not fit any worker pool: training it needs {need}, and the largest "
            f"pool that can train it is {largest.describe()}. Add a larger pool "
            "(LORAFORGE_TRAIN_POOLS), lower max_seq_length, or pick a smaller model."
        )
    return InvalidRequestError(message, param="model", code=CODE)


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
        "estimated_peak_gib",
        "breakdown_gib",
        "summary",
    )
    return {k: plan.get(k) for k in keys}


def job_pool(settings: Settings, job: Job) -> str:
    """The pool whose queue trains ``job``: its plan's, else (a job created before plans) the
    first configured pool."""
    if job.plan and job.plan.get("pool"):
        return str(job.plan["pool"])
    pools = resolve_pools(settings)
    return pools[0].name if pools else "cpu"


def pool_of(settings: Settings, sessions: sessionmaker[Session], job_id: str) -> str:
    """:func:`job_pool` of the job ``job_id`` (read in its own session)."""
    with session_scope(sessions) as session:
        return job_pool(settings, session.execute(select(Job).where(Job.id == job_id)).scalar_one())


def train_plan(job: Job) -> TrainPlan | None:
    """The trainer's part of the job's stored plan (None: a job created before plans)."""
    if not job.plan:
        return None
    return TrainPlan.model_validate({k: v for k, v in job.plan.items() if k in TrainPlan.model_fields})
