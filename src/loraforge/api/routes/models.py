"""``/v1/models`` — base models from the catalog and the organization's fine-tuned models."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from loraforge.adapters import deletion, export, registry
from loraforge.api.deps import OrgDep, ServicesDep, SessionDep
from loraforge.api.schemas.models import (
    AnyModel,
    DeleteModelResponse,
    ListModelsResponse,
    base_model_public,
    checkpoint_model_public,
    fine_tuned_model_public,
)
from loraforge.errors import InvalidRequestError

router = APIRouter(prefix="/models", tags=["models"])


@router.get("")
def list_models(services: ServicesDep, session: SessionDep, org: OrgDep) -> ListModelsResponse:
    """Base models (tagged fine-tunable), the caller's fine-tuned models and their checkpoints."""
    data: list[AnyModel] = [base_model_public(entry) for entry in services.catalog]
    data += [fine_tuned_model_public(m, org) for m in registry.list_fine_tuned_models(session, org)]
    data += [checkpoint_model_public(c, org) for c in registry.list_checkpoint_models(session, org)]
    return ListModelsResponse(data=data)


# Registered before ``/{model:path}``: that route's path converter would swallow ``/export`` too.
@router.get("/{model:path}/export")
def export_model(
    services: ServicesDep,
    session: SessionDep,
    org: OrgDep,
    model: str,
    export_format: Annotated[Literal["peft", "merged"], Query(alias="format")] = "peft",
) -> StreamingResponse:
    """Download one of the caller's fine-tuned (or checkpoint) models as a tar: PEFT or merged weights."""
    if services.catalog.get(model) is not None:
        raise InvalidRequestError(
            f"`{model}` is a base model; only fine-tuned models are exported.", param="model"
        )
    filename, entries = export.export_archive(
        services.settings, services.catalog, registry.resolve(session, org, model), export_format
    )
    return StreamingResponse(
        export.tar_stream(entries),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/{model:path}")
def retrieve_model(services: ServicesDep, session: SessionDep, org: OrgDep, model: str) -> AnyModel:
    """One model; ids contain '/' so the path converter is used."""
    entry = services.catalog.get(model)
    if entry is not None:
        return base_model_public(entry)
    checkpoint = registry.get_checkpoint_model(session, org, model)
    if checkpoint is not None:
        return checkpoint_model_public(checkpoint, org)
    return fine_tuned_model_public(registry.get_fine_tuned_model(session, org, model), org)


@router.delete("/{model:path}")
def delete_model(services: ServicesDep, session: SessionDep, org: OrgDep, model: str) -> DeleteModelResponse:
    """Delete a fine-tuned model (with its checkpoint models) or one checkpoint model: unloaded
    from the engines, removed from storage."""
    if services.catalog.get(model) is not None:
        raise InvalidRequestError(f"The base model `{model}` cannot be deleted.", param="model")
    deleted = deletion.delete_model(session, services.settings, org, model, services.engines.unload)
    return DeleteModelResponse(id=deleted.id, deleted=True)
