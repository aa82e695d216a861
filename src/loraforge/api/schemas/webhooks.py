"""Webhook endpoint objects and request bodies as OpenAI's ``/v1/webhook_endpoints`` has them."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, StringConstraints

from loraforge.db.models import WebhookEndpoint
from loraforge.webhooks.signing import secret_hint

Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Url = Annotated[str, StringConstraints(min_length=1, max_length=2048)]


class WebhookEndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_types: list[str]
    name: Name
    url: Url


class WebhookEndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_types: list[str] | None = None
    name: Name | None = None
    url: Url | None = None


class RotateSecretParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_old_secret_active_for_24_hours: bool | None = None


class WebhookTestParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_type: str


def webhook_endpoint_public(endpoint: WebhookEndpoint, *, with_secret: bool = False) -> dict[str, Any]:
    """``WebhookEndpoint``; ``WebhookEndpointWithSecret`` (only on create and rotate) if ``with_secret``."""
    body: dict[str, Any] = {
        "id": endpoint.id,
        "object": "webhook_endpoint",
        "created_at": endpoint.created_at,
        "event_types": list(endpoint.event_types),
        "name": endpoint.name,
        "url": endpoint.url,
        "signing_secret_hint": secret_hint(endpoint.signing_secret),
        "updated_at": endpoint.updated_at,
    }
    if with_secret:
        body["signing_secret"] = endpoint.signing_secret
    return body
