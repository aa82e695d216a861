"""``Model`` objects: catalog base models and the org's fine-tuned models."""

from __future__ import annotations

from typing import Any

from loraforge.catalog import BaseModelEntry
from loraforge.db.models import FineTunedModel, JobCheckpoint, Organization


def base_model_public(entry: BaseModelEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "object": "model",
        "created": entry.created,
        "owned_by": entry.owned_by,
        # kluster lists which base models can be fine-tuned with a tag.
        "tags": ["fine-tunable"],
        "aliases": entry.aliases,
        "context_length": entry.context_length,
    }


def fine_tuned_model_public(model: FineTunedModel, org: Organization) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": model.created_at,
        "owned_by": org.name,
        "parent": model.base_model,
        "root": model.base_model,
        "fine_tuning_job": model.job_id,
    }


def checkpoint_model_public(ckpt: JobCheckpoint, org: Organization) -> dict[str, Any]:
    """A checkpoint served as a model: ``{fine_tuned_model}:ckpt-step-{N}``."""
    return {
        "id": ckpt.fine_tuned_model_checkpoint,
        "object": "model",
        "created": ckpt.created_at,
        "owned_by": org.name,
        "parent": ckpt.fine_tuned_model_checkpoint.rsplit(":ckpt-step-", 1)[0],
        "root": ckpt.base_model,
        "fine_tuning_job": ckpt.job_id,
        "step_number": ckpt.step_number,
    }
