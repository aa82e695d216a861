"""``/v1/models`` — base models from the catalog and the organization's fine-tuned models."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from loraforge.adapters import deletion, export, registry
from loraforge.api.deps import OrgDep, Services, ServicesDep, SessionDep
from loraforge.api.downloads import content_disposition
from loraforge.api.schemas.models import (
    AnyModel,
    CatalogModel,
    DeleteModelResponse,
    ListModelsResponse,
    base_model_public,
    checkpoint_model_public,
    fine_tuned_model_public,
)
from loraforge.asgi import StrictJSONRoute
from loraforge.catalog import BaseModelEntry
from loraforge.errors import InvalidRequestError
from loraforge.jobs import placement

router = APIRouter(prefix="/models", tags=["models"], route_class=StrictJSONRoute)


def _base(services: Services, entry: BaseModelEntry) -> CatalogModel:
    # Planning is pure arithmetic, but it runs for every listing: remember each model's answer
    # (pools and engines are fixed for the process's life).
    known = services.base_model_capabilities.get(entry.id)
    if known is None:
        known = (placement.can_train(services.settings, entry), bool(services.engines.urls(entry.id)))
        services.base_model_capabilities[entry.id] = known
    return base_model_public(entry, trainable=known[0], servable=known[1])


@router.get("")
def list_models(services: ServicesDep, session: SessionDep, org: OrgDep) -> ListModelsResponse:
    """Base models (tagged with what this installation can do with them: fine-tunable,
    servable), the caller's fine-tuned models and their checkpoints."""
    data: list[AnyModel] = [_base(services, entry) for entry in services.catalog]
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
    export_format: Annotated[Literal["peft", "merged", "gguf"], Query(alias="format")] = "peft",
) -> StreamingResponse:
    """Download one of the caller's fine-tuned (or checkpoint) models as a tar: PEFT, merged weights,
    or GGUF (merged f16 and q8_0, the LoRA, an Ollama Modelfile)."""
    if services.catalog.get(model) is not None:
        raise InvalidRequestError(
            f"`{model}` is a base model; only fine-tuned models are exported.",
            param="model",
            code="base_model_not_exportable",
        )
    filename, entries = export.export_archive(
        services.settings, services.catalog, registry.resolve(session, org, model), export_format
    )
    return StreamingResponse(
        export.tar_stream(entries),
        media_type="application/x-tar",
        headers={"Content-Disposition": content_disposition(filename)},
    )


@router.get("/{model:path}")
def retrieve_model(services: ServicesDep, session: SessionDep, org: OrgDep, model: str) -> AnyModel:
    """One model; ids contain '/' so the path converter is used."""
    entry = services.catalog.get(model)
    if entry is not None:
        return _base(services, entry)
    checkpoint = registry.get_checkpoint_model(session, org, model)
    if checkpoint is not None:
        return checkpoint_model_public(checkpoint, org)
    return fine_tuned_model_public(registry.get_fine_tuned_model(session, org, model), org)


@router.delete("/{model:path}")
def delete_model(services: ServicesDep, session: SessionDep, org: OrgDep, model: str) -> DeleteModelResponse:
    """Delete a fine-tuned model (with its checkpoint models) or one checkpoint model: unloaded
    from the engines, removed from storage."""
    if services.catalog.get(model) is not None:
        raise InvalidRequestError(
            f"The base model `{model}` cannot be deleted.", param="model", code="base_model_not_deletable"
        )
    deleted = deletion.delete_model(session, services.settings, org, model, services.engines.unload)
    return DeleteModelResponse(id=deleted.id, deleted=True)
