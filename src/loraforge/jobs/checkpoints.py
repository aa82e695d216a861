"""Job checkpoints in the database: recorded from the trainer's ``checkpoint`` lines, listed by
``GET /v1/fine_tuning/jobs/{id}/checkpoints``, served as models ``{fine_tuned_model}:ckpt-step-N``.

The directories are written and pruned by the trainer (``trainer/checkpointer.py``) and uploaded
by the worker to the blob store; a row holds the checkpoint's store key
(``checkpoints/{job_id}/step-N``) and exists only while the store has it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from loraforge.db.models import Job, JobCheckpoint
from loraforge.db.pagination import paginate
from loraforge.ids import new_id, now
from loraforge.jobs.naming import checkpoint_model_name

# The metric keys OpenAI's checkpoint object carries.
METRIC_KEYS = (
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
)


def record(session: Session, job: Job, step: int, path: str, metrics: dict[str, Any]) -> JobCheckpoint:
    """Insert (or, for a step re-run after a crash, refresh) the checkpoint row of ``job`` at ``step``.

    Args:
        session: the open session.
        job: the job (its ``reserved_model`` names the checkpoint).
        step: the checkpoint's step.
        path: its store key (``checkpoints/{job_id}/step-N``, a sealed adapter directory).
        metrics: the trainer's metrics at that step.

    Returns:
        The row.
    """
    assert job.reserved_model, "a running job always has its model name reserved"
    name = checkpoint_model_name(job.reserved_model, step)
    kept = {k: metrics[k] for k in METRIC_KEYS if metrics.get(k) is not None}
    row = session.execute(
        select(JobCheckpoint).where(JobCheckpoint.fine_tuned_model_checkpoint == name)
    ).scalar_one_or_none()
    if row is None:
        row = JobCheckpoint(
            id=new_id("ftckpt-"),
            org_id=job.org_id,
            job_id=job.id,
            step_number=step,
            fine_tuned_model_checkpoint=name,
            base_model=job.model,
            adapter_path=path,
            metrics=kept,
            created_at=now(),
        )
        session.add(row)
    else:
        row.adapter_path, row.metrics = path, kept
    session.flush()
    return row


def forget_missing(
    session: Session, job_id: str, present: Callable[[str], bool] | None = None
) -> list[JobCheckpoint]:
    """Delete the rows of ``job_id`` whose checkpoint is gone (pruned by the trainer).

    Args:
        session: the open session.
        job_id: the job.
        present: whether a row's ``adapter_path`` (a store key) still exists; default: a local
            directory of that path exists (rows written before the object store).

    Returns:
        The rows deleted (their names may still be loaded in engines).
    """
    exists = present or (lambda ref: Path(ref).is_dir())
    rows = session.execute(select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)).scalars().all()
    gone = [row for row in rows if not exists(row.adapter_path)]
    for row in gone:
        session.delete(row)
    session.flush()
    return gone


def delete_all(session: Session, job_id: str) -> list[JobCheckpoint]:
    """Delete every checkpoint row of ``job_id`` (a cancelled job keeps no artefacts).

    Returns:
        The rows deleted.
    """
    rows = list(session.execute(select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)).scalars())
    for row in rows:
        session.delete(row)
    session.flush()
    return rows


def list_for_job(
    session: Session, job_id: str, *, after: str | None, limit: int
) -> tuple[list[JobCheckpoint], bool]:
    """One page of ``job_id``'s checkpoints, newest first (``after`` is a checkpoint id)."""
    return paginate(
        session,
        select(JobCheckpoint).where(JobCheckpoint.job_id == job_id),
        JobCheckpoint,
        after=after,
        limit=limit,
    )
