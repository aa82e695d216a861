"""The memory plan of a job: made at creation, stored on the job, read by the worker.

A job that no worker pool can train is refused at creation with a 400 (``code:
model_too_large_for_workers``, ``param: model``) instead of failing after minutes of loading.
The stored plan decides the Celery queue (``train.<pool>``) and is copied into the trainer's
``TrainSpec.plan``. A job is planned again when it is dispatched without a usable plan
(:func:`stale_reason`): none (created before plans), a pool that is no longer configured, or a
pool that changed under it (fewer GPUs or less memory than the plan was made for).

A job whose stored plan is unusable and that fits no configured pool now is *not* failed: the
pools may be wrong only for a while (a detection that failed, a worker config not rolled out
yet), and failing would lose work the user cannot get back. It stays queued with one warning
event and is planned again at every dispatch (the reaper re-sends queued jobs every
``requeue_after_seconds``, and every worker start), so the configuration that fixes it picks it
up. Only a job that never had a plan and fits nothing is failed: for it this is the creation-time
refusal, late. Nothing is sent for a job kept queued, so no message piles up on a queue that no
worker consumes.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loraforge.catalog import BaseModelEntry, load_catalog
from loraforge.contracts.job_error import JobError
from loraforge.contracts.train_spec import TrainPlan
from loraforge.db.models import Job
from loraforge.db.session import session_scope
from loraforge.errors import InvalidRequestError
from loraforge.jobs.state import add_event, add_event_once, fail
from loraforge.planner import JobPlan, NoFit, plan_job, resolve_pools
from loraforge.settings import Settings, TrainPool

log = logging.getLogger(__name__)

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
        # Only a DPO job's hyperparameters have a beta: two sequences (chosen, rejected) per example.
        sequences_per_example=2 if "beta" in hyperparameters else 1,
    )
    if isinstance(result, NoFit):
        raise _refusal(entry, result, max_seq_length)
    return result


def can_train(settings: Settings, entry: BaseModelEntry) -> bool:
    """Whether a worker pool of this deployment can train ``entry`` with its default LoRA
    settings and sequence length (what ``/v1/models`` and the web form offer)."""
    try:
        plan_for(settings, entry, {})
    except InvalidRequestError:
        return False
    return True


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


def stale_reason(plan: dict[str, Any] | None, pools: list[TrainPool]) -> str | None:
    """Why a stored plan cannot run on ``pools`` as they are configured now; None if it can.

    Args:
        plan: the job's stored plan (``JobPlan.to_record()``), None for a job created before plans.
        pools: the configured (or detected) pools.

    Returns:
        A sentence for the job's events, or None.
    """
    stored = (plan or {}).get("pool")
    if not plan or not stored:
        return "The job had no memory plan (created before plans)"
    pool = next((p for p in pools if p.name == stored), None)
    if pool is None:
        names = ", ".join(p.name for p in pools) or "none"
        return f"Its pool {stored!r} is no longer configured (pools: {names})"
    if plan.get("device") not in (None, pool.device):
        return f"Its pool {stored!r} is now a {pool.device} pool, not {plan.get('device')}"
    num_gpus = int(plan.get("num_gpus") or 0)
    if pool.device == "cuda" and num_gpus > pool.count:
        return f"Its plan needs {num_gpus} GPUs and pool {stored!r} now has {pool.count}"
    memory = plan.get("memory_gib")
    if isinstance(memory, int | float) and memory > pool.memory_gib:
        return (
            f"Its plan was made for {memory:g} GiB per device and pool {stored!r} now has "
            f"{pool.memory_gib:g} GiB"
        )
    return None


def _replan(settings: Settings, session: Session, job: Job, why: str) -> str | None:
    """Plan ``job`` again onto the configured pools and store it (module docstring: no fit)."""
    entry = load_catalog(settings.models_config).get(job.model)
    if entry is None:
        message = f"Base model {job.model} is not in the catalog."
        fail(session, job.id, JobError(code="model_not_found", message=message, param="model"))
        return None
    try:
        plan = plan_for(settings, entry, job.hyperparameters or {})
    except InvalidRequestError as exc:
        if not (job.plan or {}).get("pool"):
            message = f"{why}, and it no longer fits: {exc.message}"
            fail(session, job.id, JobError(code=CODE, message=message, param="model"))
            return None
        log.warning("job %s stays queued: %s, and no configured pool fits it: %s", job.id, why, exc.message)
        add_event_once(
            session,
            job.id,
            f"{why}, and no configured pool fits the job now: {exc.message} The job stays queued "
            "and is planned again each time it is dispatched, so a configuration with a pool "
            "that fits picks it up.",
            level="warn",
        )
        session.flush()
        return None
    job.plan = plan.to_record()
    add_event(
        session, job.id, f"Planned: {plan.summary()}", data={**(public_plan(job.plan) or {}), "reason": why}
    )
    session.flush()
    return plan.pool.name


def dispatch_pool(settings: Settings, session: Session, job: Job) -> str | None:
    """The pool whose queue trains ``job``, planning it again first if its plan is unusable.

    A job whose plan :func:`stale_reason` rejects is planned again: the new plan is stored with a
    "Planned: …" event. The caller commits.

    Args:
        settings: the pools and the catalog.
        session: the session ``job`` was loaded in.
        job: a job about to be dispatched to a train queue.

    Returns:
        The pool name, or None when nothing must be sent: the job stays queued because no
        configured pool fits it now (a warning event, once), or it was failed (its model left
        the catalog, or a job without any plan fits no pool).
    """
    why = stale_reason(job.plan, resolve_pools(settings))
    if why is None:
        return str((job.plan or {})["pool"])
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
