"""Typed engine errors, each carrying the OpenAI error envelope fields it maps to.

Pure (no torch, no FastAPI): the engine raises these, ``serving.app`` maps them once to
``{"error": {"message", "type", "param", "code"}}`` with ``contracts.envelope`` (the API's helper).
"""

from __future__ import annotations

from typing import Any

from loraforge.contracts.engine import MODEL_NOT_FOUND
from loraforge.contracts.envelope import error_body


class EngineError(Exception):
    """Base of every error the engine reports to a caller (HTTP 400 unless a subclass says otherwise)."""

    status_code: int = 400
    error_type: str = "invalid_request_error"
    code: str = "invalid_request"
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code

    def to_envelope(self) -> dict[str, Any]:
        """The OpenAI error body for this error."""
        return error_body(self.message, self.error_type, self.param, self.code)


class InvalidRequest(EngineError):
    """The request is well-formed JSON but cannot be served (e.g. ``n > 1``, prompt too long)."""


class AdapterNotLoaded(EngineError):
    """A request names a model that is neither the base model nor a loaded adapter.

    The engine fleet relies on ``code == MODEL_NOT_FOUND`` (HTTP 404) to hot-load and retry.
    """

    status_code = 404
    code = MODEL_NOT_FOUND
    param = "model"

    def __init__(self, name: str, *, param: str | None = None) -> None:
        super().__init__(f"The model `{name}` does not exist or you do not have access to it.", param=param)
        self.name = name


class AdapterNotFound(EngineError):
    """``lora_path`` does not exist (vLLM answers 404 here too)."""

    status_code = 404
    code = "adapter_not_found"
    param = "lora_path"


class InvalidAdapter(EngineError):
    """The adapter directory breaks the contract of ``adapters.format`` or PEFT refused it."""

    code = "invalid_adapter"
    param = "lora_path"


class BaseModelMismatch(EngineError):
    """The adapter's manifest names another base model than the one this engine serves."""

    code = "base_model_mismatch"
    param = "lora_path"


class AdapterConflict(EngineError):
    """The adapter name is taken (by the base model, or by an adapter loaded from another path)."""

    code = "adapter_conflict"
    param = "lora_name"


class UnknownBaseModel(EngineError):
    """The engine was asked to serve a base model the catalog does not know."""

    code = MODEL_NOT_FOUND
    param = "model"


class EngineNotReady(EngineError):
    """The base model is still loading."""

    status_code = 503
    error_type = "server_error"
    code = "engine_not_ready"


class AuthenticationFailed(EngineError):
    """Missing or wrong ``Authorization: Bearer`` key (only when the engine was given one)."""

    status_code = 401
    code = "invalid_api_key"


__all__ = [
    "AdapterConflict",
    "AdapterNotFound",
    "AdapterNotLoaded",
    "AuthenticationFailed",
    "BaseModelMismatch",
    "EngineError",
    "EngineNotReady",
    "InvalidAdapter",
    "InvalidRequest",
    "UnknownBaseModel",
]
