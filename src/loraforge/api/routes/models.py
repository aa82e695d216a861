"""``/v1/models`` — base models from the catalog and the organization's fine-tuned models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from loraforge.adapters import registry
from loraforge.api.deps import OrgDep, ServicesDep, SessionDep
from loraforge.api.schemas.models import base_model_public, fine_tuned_model_public
from loraforge.errors import InvalidRequestError

router = APIRouter(prefix="/models", tags=["models"])


@router.get("")
def list_models(services: ServicesDep, session: SessionDep, org: OrgDep) -> dict[str, Any]:
    """Base models (tagged fine-tunable) and the caller's fine-tuned models."""
    data = [base_model_public(entry) for entry in services.catalog]
    data += [fine_tuned_model_public(m, org) for m in registry.list_fine_tuned_models(session, org)]
    return {"object": "list", "data": data}


@router.get("/{model:path}")
def retrieve_model(services: ServicesDep, session: SessionDep, org: OrgDep, model: str) -> dict[str, Any]:
    """One model; ids contain '/' so the path converter is used."""
    entry = services.catalog.get(model)
    if entry is not None:
        return base_model_public(entry)
    return fine_tuned_model_public(registry.get_fine_tuned_model(session, org, model), org)


@router.delete("/{model:path}")
def delete_model(services: ServicesDep, session: SessionDep, org: OrgDep, model: str) -> dict[str, Any]:
    """Delete one of the caller's fine-tuned models and unload it from the engines."""
    if services.catalog.get(model) is not None:
        raise InvalidRequestError(f"The base model `{model}` cannot be deleted.", param="model")
    removed = registry.delete_fine_tuned_model(session, org, model)
    session.commit()
    registry.unload_from_engines(services.settings, removed)
    return {"id": removed.id, "object": "model", "deleted": True}
