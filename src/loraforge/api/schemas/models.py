"""``Model`` objects: catalog base models, the org's fine-tuned models and their checkpoints."""

from __future__ import annotations

from typing import Literal

from loraforge.api.schemas.common import ResponseObject
from loraforge.catalog import BaseModelEntry
from loraforge.db import models as db


class Model(ResponseObject):
    """OpenAI's ``Model``: what every entry of ``/v1/models`` carries."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class CatalogModel(Model):
    """A base model from the catalog, with what this installation can do with it."""

    # kluster lists which base models can be fine-tuned with a tag. Here: "base" on every
    # catalog model, "fine-tunable" when a worker pool of this installation can train it,
    # "servable" when an engine serves it (chat works). Every catalog model stays listed, so
    # ``models.retrieve`` and the OpenAI ``Model`` schema are unchanged.
    tags: list[str]
    aliases: list[str]
    context_length: int


class FineTunedModel(Model):
    """One of the organization's fine-tuned models (``ft:<base>:<org>:<suffix>:<id>``)."""

    parent: str
    root: str
    fine_tuning_job: str


class CheckpointModel(Model):
    """A checkpoint served as a model: ``{fine_tuned_model}:ckpt-step-{N}``."""

    parent: str
    root: str
    fine_tuning_job: str
    step_number: int


# The three never inherit from one another, so a union picks each instance's own class.
AnyModel = CatalogModel | FineTunedModel | CheckpointModel


class ListModelsResponse(ResponseObject):
    """``GET /v1/models``: not paginated."""

    object: Literal["list"] = "list"
    data: list[AnyModel]


class DeleteModelResponse(ResponseObject):
    """``DELETE /v1/models/{model}``."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool


BASE_TAG, TRAINABLE_TAG, SERVABLE_TAG = "base", "fine-tunable", "servable"


def base_model_public(
    entry: BaseModelEntry, *, trainable: bool = True, servable: bool = True
) -> CatalogModel:
    """The ``Model`` of a catalog entry.

    Args:
        entry: the catalog entry.
        trainable: whether a worker pool of this installation can train it.
        servable: whether an engine of this installation serves it.
    """
    return CatalogModel(
        id=entry.id,
        created=entry.created,
        owned_by=entry.owned_by,
        tags=[BASE_TAG] + [TRAINABLE_TAG] * trainable + [SERVABLE_TAG] * servable,
        aliases=list(entry.aliases),
        context_length=entry.context_length,
    )


def fine_tuned_model_public(model: db.FineTunedModel, org: db.Organization) -> FineTunedModel:
    """The ``Model`` of a fine-tuned model."""
    return FineTunedModel(
        id=model.id,
        created=model.created_at,
        owned_by=org.name,
        parent=model.base_model,
        root=model.base_model,
        fine_tuning_job=model.job_id,
    )


def checkpoint_model_public(ckpt: db.JobCheckpoint, org: db.Organization) -> CheckpointModel:
    """The ``Model`` of a checkpoint; its ``parent`` is the job's fine-tuned model."""
    return CheckpointModel(
        id=ckpt.fine_tuned_model_checkpoint,
        created=ckpt.created_at,
        owned_by=org.name,
        parent=ckpt.fine_tuned_model_checkpoint.rsplit(":ckpt-step-", 1)[0],
        root=ckpt.base_model,
        fine_tuning_job=ckpt.job_id,
        step_number=ckpt.step_number,
    )
