"""The registry: public fine-tuned model names -> adapters in the blob store, in the database.

``adapter_path`` holds the adapter's store key (``adapters/{job_id}``, a sealed directory, see
``loraforge.storage``); rows written before the object store hold a host path, still read on
that host (and adopted into the store by a worker there, ``worker/legacy.py``).

Users name adapters; they never send paths (vLLM's ``LoRARequest`` advice). Putting adapters on
engines is ``loraforge.engines.EngineFleet``'s job; this module does no HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from loraforge.adapters.format import validate_adapter_dir
from loraforge.db.models import FineTunedModel, JobCheckpoint, Organization
from loraforge.errors import ModelNotFoundError
from loraforge.ids import now


def register(
    session: Session, *, name: str, org_id: str, job_id: str, adapter_dir: Path, ref: str | None = None
) -> FineTunedModel:
    """Record a finished adapter under its public ``name`` (the manifest must be valid).

    Args:
        session: the open session.
        name: the public model name.
        org_id: the owner.
        job_id: the job that trained it.
        adapter_dir: a local copy of the adapter (checked here).
        ref: where it is stored (its store key); None: ``adapter_dir`` itself.
    """
    manifest = validate_adapter_dir(adapter_dir)
    model = FineTunedModel(
        id=name,
        org_id=org_id,
        job_id=job_id,
        base_model=manifest.base_model,
        adapter_path=ref or str(adapter_dir),
        created_at=now(),
    )
    session.add(model)
    session.flush()
    return model


def get_fine_tuned_model(session: Session, org: Organization, name: str) -> FineTunedModel:
    """The org's fine-tuned model ``name``; another org's model is reported as not found."""
    model = session.execute(
        select(FineTunedModel).where(FineTunedModel.id == name, FineTunedModel.org_id == org.id)
    ).scalar_one_or_none()
    if model is None:
        raise ModelNotFoundError(name)
    return model


def list_fine_tuned_models(session: Session, org: Organization) -> list[FineTunedModel]:
    return list(
        session.execute(
            select(FineTunedModel).where(FineTunedModel.org_id == org.id).order_by(FineTunedModel.seq)
        ).scalars()
    )


def delete_fine_tuned_model(session: Session, org: Organization, name: str) -> FineTunedModel:
    model = get_fine_tuned_model(session, org, name)
    session.delete(model)
    session.flush()
    return model


def delete_fine_tuned_model_by_name(session: Session, name: str) -> None:
    """Remove a registration whatever its org (used when a job is cancelled at the last moment)."""
    model = session.execute(select(FineTunedModel).where(FineTunedModel.id == name)).scalar_one_or_none()
    if model is not None:
        session.delete(model)
        session.flush()


@dataclass(frozen=True)
class ServedModel:
    """A name chat completions can use: a fine-tuned model or one of its job's checkpoints."""

    name: str
    base_model: str
    adapter_path: str
    job_id: str
    created_at: int
    # None for a fine-tuned model; the checkpoint's step for ``…:ckpt-step-N``.
    checkpoint_step: int | None = None


def get_checkpoint_model(session: Session, org: Organization, name: str) -> JobCheckpoint | None:
    """The org's checkpoint model ``name`` (``{fine_tuned_model}:ckpt-step-N``), if any."""
    return session.execute(
        select(JobCheckpoint).where(
            JobCheckpoint.fine_tuned_model_checkpoint == name, JobCheckpoint.org_id == org.id
        )
    ).scalar_one_or_none()


def list_checkpoint_models(session: Session, org: Organization) -> list[JobCheckpoint]:
    """The org's checkpoint models, oldest first."""
    return list(
        session.execute(
            select(JobCheckpoint).where(JobCheckpoint.org_id == org.id).order_by(JobCheckpoint.seq)
        ).scalars()
    )


def resolve(session: Session, org: Organization, name: str) -> ServedModel:
    """The adapter behind ``name``: one of the org's fine-tuned models or checkpoint models.

    Raises:
        ModelNotFoundError: neither exists for this org.
    """
    model = session.execute(
        select(FineTunedModel).where(FineTunedModel.id == name, FineTunedModel.org_id == org.id)
    ).scalar_one_or_none()
    if model is not None:
        return ServedModel(model.id, model.base_model, model.adapter_path, model.job_id, model.created_at)
    ckpt = get_checkpoint_model(session, org, name)
    if ckpt is None:
        raise ModelNotFoundError(name)
    return ServedModel(
        ckpt.fine_tuned_model_checkpoint,
        ckpt.base_model,
        ckpt.adapter_path,
        ckpt.job_id,
        ckpt.created_at,
        ckpt.step_number,
    )
