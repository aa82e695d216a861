"""``/v1/organization/integrations/wandb``: the organization's W&B key (a loraforge extension)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints

from loraforge.api.schemas.common import ResponseObject
from loraforge.db.models import OrgIntegration


class WandbIntegrationRequest(BaseModel):
    """``POST``: the key (stored encrypted, never shown again) and the default entity."""

    model_config = ConfigDict(extra="forbid")

    api_key: Annotated[str, StringConstraints(min_length=1, max_length=512, strip_whitespace=True)]
    # The team or user runs go to when a job's integration names no entity.
    entity: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None


class WandbIntegrationStatus(ResponseObject):
    """Whether the org has a W&B key, and its last four characters (never the key)."""

    object: Literal["organization.integration"] = "organization.integration"
    type: Literal["wandb"] = "wandb"
    configured: bool
    api_key_hint: str | None
    entity: str | None
    updated_at: int | None


def wandb_status_public(row: OrgIntegration | None) -> WandbIntegrationStatus:
    """The status of a stored integration (None: not set)."""
    if row is None:
        return WandbIntegrationStatus(configured=False, api_key_hint=None, entity=None, updated_at=None)
    return WandbIntegrationStatus(
        configured=True, api_key_hint=row.api_key_hint, entity=row.entity, updated_at=row.updated_at
    )
