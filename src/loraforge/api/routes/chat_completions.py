"""``/v1/chat/completions`` — answered by the engine of the model's base, adapter applied."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from loraforge.adapters import registry
from loraforge.api.deps import OrgDep, Services, ServicesDep
from loraforge.asgi import StrictJSONRoute
from loraforge.contracts.engine import LoadLoRAAdapterRequest
from loraforge.db.models import Organization
from loraforge.engines import EngineStream

router = APIRouter(prefix="/chat", tags=["chat"], route_class=StrictJSONRoute)


class ChatCompletionRequest(BaseModel):
    """Only what the API needs to route; the engine validates the rest."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    stream: bool | None = None


def _resolve(services: Services, org: Organization, model: str) -> tuple[str, LoadLoRAAdapterRequest | None]:
    entry = services.catalog.get(model)
    if entry is not None:
        return entry.id, None
    with services.sessions() as session:
        # A fine-tuned model, or one of its checkpoints (``…:ckpt-step-N``): both are adapters.
        served = registry.resolve(session, org, model)
    return served.base_model, LoadLoRAAdapterRequest(lora_name=served.name, lora_path=served.adapter_path)


@router.post("/completions")
async def create_chat_completion(services: ServicesDep, org: OrgDep, body: ChatCompletionRequest) -> Response:
    """Chat with a base model or one of the caller's fine-tuned models (plain or SSE)."""
    base, adapter = await run_in_threadpool(_resolve, services, org, body.model)
    answer = await services.engines.chat(base, body.model_dump(exclude_unset=True), adapter)
    if isinstance(answer, EngineStream):
        return StreamingResponse(
            answer, media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )
    return Response(answer.content, status_code=answer.status_code, media_type=answer.content_type)
