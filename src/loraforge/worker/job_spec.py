"""A job as the trainer sees it: the :class:`~loraforge.contracts.train_spec.TrainSpec` the worker
builds from the job's row and its own settings, and writes to the run directory.

Built and validated here, in the worker, not first in the trainer: a job whose stored settings
make no valid spec fails in the worker's start-up handler, with each field's problem, before any
process starts.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from loraforge.adapters import registry
from loraforge.contracts.train_spec import TrainSpec
from loraforge.contracts.trainer_launch import requested_kernels
from loraforge.db.models import FileRecord, Job, Organization
from loraforge.jobs import placement
from loraforge.settings import Settings
from loraforge.storage import adapter_dir, local_cache
from loraforge.storage.cache import LocalCache
from loraforge.worker import artefacts

_OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
_SPEC_KNOBS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "max_seq_length",
    "warmup_ratio",
    "weight_decay",
)


def write_spec(settings: Settings, session: Session, job: Job, run_dir: Path) -> Path:
    """Build the job's :class:`TrainSpec` and write it to ``run_dir/spec.json`` for the trainer.

    Args:
        settings: the worker's settings.
        session: the open session.
        job: the job.
        run_dir: the run's directory (created if missing).

    Returns:
        The spec file's path.

    Raises:
        ValueError: ``LORAFORGE_KERNELS`` is invalid, or the job's settings make no valid spec.
        ModelNotFoundError: the parent model of a continued fine-tuning job is gone.
    """
    # The trainer inherits this environment: a bad LORAFORGE_KERNELS fails the job here, with
    # its message, instead of after the trainer has loaded the model (ValueError -> _start).
    requested_kernels()
    spec = build_spec(settings, session, job, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "spec.json"
    path.write_text(spec.model_dump_json(indent=2))
    return path


def build_spec(settings: Settings, session: Session, job: Job, run_dir: Path) -> TrainSpec:
    """The job's training spec: its files, hyperparameters, LoRA knobs and memory plan.

    Args:
        settings: the worker's settings (where models, adapters and checkpoints live).
        session: the open session (the job's files and parent model are looked up).
        job: the job.
        run_dir: the run's directory (its pause file is named in the spec).

    Returns:
        The validated spec.

    Raises:
        ValueError: the job's settings make no valid spec (each field's problem named).
        ModelNotFoundError: the parent model of a continued fine-tuning job is gone.
    """
    # The trainer reads local files: checked copies of the store's (the store's own with a local one).
    cache = local_cache(settings)
    fields = {
        "job_id": job.id,
        "base_model": job.model,
        "models_config": str(settings.models_config) if settings.models_config else None,
        "models_dir": str(settings.models_dir),
        "training_file": str(_file_path(session, cache, job.training_file)),
        "validation_file": str(_file_path(session, cache, job.validation_file))
        if job.validation_file
        else None,
        "output_dir": str(settings.adapters_dir / job.id),
        "hyperparameters": {k: v for k, v in job.hyperparameters.items() if k in _OPENAI_HYPERPARAMETERS},
        "seed": job.seed,
        "torch_threads": settings.torch_threads,
        # Crash recovery and pause: the trainer checkpoints here and resumes from the newest one.
        "checkpoint_dir": str(artefacts.checkpoint_dir(settings, job.id)),
        "data_dir": str(artefacts.data_dir(settings, job.id)),
        "pause_file": str(run_dir / artefacts.PAUSE_FILE),
        "eval_every": settings.eval_every_steps,
        "init_adapter": _init_adapter(settings, session, job),
        **_method_fields(job),
        # LoRA knobs and schedule are top-level TrainSpec fields (absent: the catalog's defaults).
        **{k: job.hyperparameters[k] for k in _SPEC_KNOBS if job.hyperparameters.get(k) is not None},
        # The memory plan made at creation: strategy, GPUs, token budget, checkpointing; and the
        # device of the pool it was planned for (a cpu-pool job stays on the CPU even where the
        # worker also sees a GPU). A job created before plans keeps the defaults.
        **_plan_fields(job),
    }
    try:
        return TrainSpec.model_validate(fields)
    except ValidationError as exc:
        raise ValueError(f"the job's settings make no valid training spec: {_reasons(exc)}") from None


def _method_fields(job: Job) -> dict[str, object]:
    """A DPO job's method and beta (resolved at creation; absent on a supervised job)."""
    if (job.method or {}).get("type") != "dpo":
        return {}
    return {"method": "dpo", "dpo_beta": job.hyperparameters.get("beta")}


def _reasons(exc: ValidationError) -> str:
    """``field: message`` for each problem, on one line (pydantic's own text spans lines)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'spec'}: {error['msg']}" for error in exc.errors()
    )


def _plan_fields(job: Job) -> dict[str, object]:
    plan = placement.train_plan(job)
    if plan is None or job.plan is None:
        return {}
    return {"plan": plan.model_dump(mode="json"), "device": job.plan.get("device", "auto")}


def _init_adapter(settings: Settings, session: Session, job: Job) -> str | None:
    """The adapter a continued fine-tuning job starts from, fetched from the store to this machine
    (resolved now: it may have been deleted).

    Raises:
        ModelNotFoundError: the parent model or checkpoint no longer exists.
    """
    if not job.parent_model:
        return None
    org = session.execute(select(Organization).where(Organization.id == job.org_id)).scalar_one()
    return str(adapter_dir(settings, registry.resolve(session, org, job.parent_model).adapter_path))


def _file_path(session: Session, cache: LocalCache, file_id: str) -> Path:
    record = session.execute(select(FileRecord).where(FileRecord.id == file_id)).scalar_one()
    return cache.file(record.storage_key)
