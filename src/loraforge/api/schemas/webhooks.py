"""Webhook endpoint objects, their list/deletion/test answers, and the request bodies, as OpenAI's
``/v1/webhook_endpoints`` has them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints

from loraforge.api.schemas.common import IdentifiedObject, ListPage, ResponseObject
from loraforge.db import models as db
from loraforge.webhooks import egress
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


class WebhookEndpoint(IdentifiedObject):
    """A registered endpoint; the signing secret shows only as a hint."""

    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    created_at: int
    event_types: list[str]
    name: str
    url: str
    signing_secret_hint: str
    updated_at: int


class WebhookEndpointWithSecret(WebhookEndpoint):
    """The answer to create and rotate_secret, the only ones that show the signing secret."""

    signing_secret: str


class ListWebhookEndpointsResponse(ListPage[WebhookEndpoint]):
    """``GET /v1/webhook_endpoints``."""


class DeleteWebhookEndpointResponse(ResponseObject):
    """``DELETE /v1/webhook_endpoints/{webhook_endpoint_id}``."""

    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool


class WebhookEndpointTestResult(ResponseObject):
    """``POST /v1/webhook_endpoints/{webhook_endpoint_id}/test``: the receiver's HTTP status.

    ``success`` is true when the receiver acknowledged (a 2xx), false for any other status; a
    receiver that gave no HTTP answer is a 400 instead.
    """

    object: Literal["webhook_endpoint.test"] = "webhook_endpoint.test"
    event_type: str
    status_code: int
    success: bool
    webhook_endpoint_id: str


class ListWebhookEventTypesResponse(ResponseObject):
    """``GET /v1/webhook_event_types``."""

    object: Literal["list"] = "list"
    data: list[str]


def webhook_endpoint_public(endpoint: db.WebhookEndpoint) -> WebhookEndpoint:
    """``WebhookEndpoint``, secret masked."""
    return WebhookEndpoint(**_endpoint_fields(endpoint))


def webhook_endpoint_with_secret(endpoint: db.WebhookEndpoint) -> WebhookEndpointWithSecret:
    """``WebhookEndpointWithSecret``: only on create and rotate_secret."""
    return WebhookEndpointWithSecret(**_endpoint_fields(endpoint), signing_secret=endpoint.signing_secret)


def _endpoint_fields(endpoint: db.WebhookEndpoint) -> dict[str, Any]:
    return {
        "id": endpoint.id,
        "created_at": endpoint.created_at,
        "event_types": list(endpoint.event_types),
        "name": endpoint.name,
        # Credentials in the URL (``https://user:pass@host``) are used, never shown again.
        "url": egress.redact(endpoint.url),
        "signing_secret_hint": secret_hint(endpoint.signing_secret),
        "updated_at": endpoint.updated_at,
    }
