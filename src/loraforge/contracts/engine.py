"""The engine's adapter protocol (vLLM's), as the engine serves it and ``loraforge.engines`` calls it.

    POST /v1/load_lora_adapter     LoadLoRAAdapterRequest   -> 200 text; vLLM: 400 ALREADY_LOADED
    POST /v1/unload_lora_adapter   UnloadLoRAAdapterRequest -> 200 text, 404 if not loaded
    GET  /v1/models                ModelList (the base model and the loaded adapters)
    GET  /health                   EngineHealth
    POST /v1/chat/completions      OpenAI's chat body, relayed as is; 404 ``MODEL_NOT_FOUND`` when
                                   it names an adapter the engine has not loaded

Requests ignore unknown fields (vLLM sends more than we read); responses allow extra fields, so a
vLLM or SGLang server can stand in for the built-in engine.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# ``error.code`` of a chat request naming a model the engine has not loaded: load it and retry.
MODEL_NOT_FOUND = "model_not_found"
# vLLM's answer (400) to loading a name it already has; ours answers 200 (idempotent).
ALREADY_LOADED = "has already been loaded"
# vLLM's wording of MODEL_NOT_FOUND (it has no such code).
VLLM_NOT_LOADED = "does not exist"


class LoadLoRAAdapterRequest(BaseModel):
    """Body of ``POST /v1/load_lora_adapter``: the adapter's public name and its directory."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    """Body of ``POST /v1/unload_lora_adapter`` (vLLM; ``lora_int_id`` is accepted and ignored)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``, with vLLM's ``root`` (weights or adapter dir) and ``parent``."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    # The base model an adapter applies to; None for the base model itself.
    parent: str | None = None


class ModelList(BaseModel):
    """``GET /v1/models``."""

    model_config = ConfigDict(extra="allow")

    object: Literal["list"] = "list"
    data: list[ModelCard]


class EngineHealth(BaseModel):
    """``GET /health``: liveness, the base model served and the adapters loaded now."""

    model_config = ConfigDict(extra="allow")

    status: str
    base_model: str
    adapters: list[str]
    # Batching counters, when the engine keeps them (the built-in one does).
    stats: dict[str, Any] | None = None


__all__ = [
    "ALREADY_LOADED",
    "MODEL_NOT_FOUND",
    "VLLM_NOT_LOADED",
    "EngineHealth",
    "LoadLoRAAdapterRequest",
    "ModelCard",
    "ModelList",
    "UnloadLoRAAdapterRequest",
]
