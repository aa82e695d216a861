"""``/v1/organization/integrations/wandb`` — the organization's Weights & Biases key.

Jobs created with ``integrations: [{"type": "wandb", ...}]`` log to W&B with this key. It is
write-only: ``GET`` says whether one is set and shows its last four characters.
"""

from __future__ import annotations

from fastapi import APIRouter

from loraforge import org_integrations
from loraforge.api.deps import OrgDep, ServicesDep, SessionDep
from loraforge.api.schemas.organization import (
    WandbIntegrationRequest,
    WandbIntegrationStatus,
    wandb_status_public,
)
from loraforge.asgi import StrictJSONRoute

router = APIRouter(prefix="/organization/integrations", tags=["organization"], route_class=StrictJSONRoute)


@router.get("/wandb")
def get_wandb(session: SessionDep, org: OrgDep) -> WandbIntegrationStatus:
    """Whether the organization has a W&B key (its hint, never the key)."""
    return wandb_status_public(org_integrations.get_integration(session, org.id))


@router.post("/wandb")
def set_wandb(
    services: ServicesDep, session: SessionDep, org: OrgDep, body: WandbIntegrationRequest
) -> WandbIntegrationStatus:
    """Set or replace the organization's W&B key (stored encrypted) and default entity."""
    row = org_integrations.set_wandb(session, services.settings, org.id, body.api_key, body.entity)
    return wandb_status_public(row)


@router.delete("/wandb")
def delete_wandb(session: SessionDep, org: OrgDep) -> WandbIntegrationStatus:
    """Forget the organization's W&B key (jobs already running keep logging)."""
    org_integrations.delete_wandb(session, org.id)
    return wandb_status_public(None)
