"""``/v1/chat/completions`` — answered by the engine of the model's base, adapter applied."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from loraforge.adapters import registry
from loraforge.api.deps import OrgDep, ServicesDep
from loraforge.api.engine_proxy import balancer_for, forward_chat
from loraforge.db.models import Organization
from loraforge.errors import ServiceUnavailableError

router = APIRouter(prefix="/chat", tags=["chat"])


class ChatCompletionRequest(BaseModel):
    """Only what the API needs to route; the engine validates the rest."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    stream: bool | None = None


def _resolve(services: Any, org: Organization, model: str) -> tuple[str, tuple[str, str] | None]:
    entry = services.catalog.get(model)
    if entry is not None:
        return entry.id, None
    with services.sessions() as session:
        # A fine-tuned model, or one of its checkpoints (``…:ckpt-step-N``): both are adapters.
        served = registry.resolve(session, org, model)
    return served.base_model, (served.name, served.adapter_path)


@router.post("/completions")
async def create_chat_completion(
    request: Request, services: ServicesDep, org: OrgDep, body: ChatCompletionRequest
) -> Response:
    """Chat with a base model or one of the caller's fine-tuned models (plain or SSE)."""
    base, adapter = await run_in_threadpool(_resolve, services, org, body.model)
    urls = services.settings.engine_urls(base)
    if not urls:
        raise ServiceUnavailableError(
            f"The model `{body.model}` is not being served by any engine right now."
        )
    return await forward_chat(
        urls,
        body.model_dump(exclude_unset=True),
        adapter,
        balancer=balancer_for(request.app.state),
        api_key=services.settings.engine_api_key or None,
    )
