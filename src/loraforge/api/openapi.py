"""``/openapi.json`` that tells the truth about errors.

FastAPI documents a 422 on every operation with a body or parameters, a status this API never
sends (validation failures are 400s in OpenAI's envelope, ``api/errors.py``), and none of the
errors it does send. :func:`install_openapi` rewrites each operation's responses once, when the
document is first built: the 422 goes, and each operation lists the error statuses it can answer
with the envelope's schema (``ErrorEnvelope``):

- 400 when it takes a body or query parameters, or acts on something that can refuse (POST, and
  the model routes, which refuse base models);
- 401 on every ``/v1`` operation (bearer keys), and 429 (rate limits);
- 404 when the URL names an object, and where a body names a model (chat, job creation);
- 409 on creates that take an ``Idempotency-Key`` (the first request is still running);
- 413 when it takes a body (``LORAFORGE_MAX_REQUEST_BYTES``, the upload limits);
- 503 where an engine or an export answers (chat, export).

Downloads say what they really send (bytes, a tar), and chat says it may stream Server-Sent Events.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from loraforge.contracts.envelope import ErrorEnvelope

ENVELOPE_REF = "#/components/schemas/ErrorEnvelope"
DESCRIPTIONS = {
    "400": "Invalid request (OpenAI's error envelope, with the `param` at fault)",
    "401": "Missing or unknown API key",
    "404": "No such object for this organization, or no such model",
    "409": "A request with the same Idempotency-Key is still running (the SDK retries)",
    "413": "The request body is over this server's limit",
    "429": "Over the organization's rate limit (see the x-ratelimit-* and Retry-After headers)",
    "503": "An engine (or the export) is not available right now; retry later",
}
_BODY_NAMES_MODEL = {("post", "/v1/chat/completions"), ("post", "/v1/fine_tuning/jobs")}
_ENGINE_BACKED = {("post", "/v1/chat/completions"), ("get", "/v1/models/{model}/export")}
_DOWNLOADS = {
    ("get", "/v1/files/{file_id}/content"): {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "text/csv": {"schema": {"type": "string"}},
    },
    ("get", "/v1/models/{model}/export"): {
        "application/x-tar": {"schema": {"type": "string", "format": "binary"}}
    },
}


def error_statuses(method: str, path: str, operation: dict[str, Any], idempotent: bool) -> list[str]:
    """The error statuses of one operation (see the module's docstring for the rules)."""
    if not path.startswith("/v1/"):
        return []
    has_body = "requestBody" in operation
    has_query = any(p.get("in") == "query" for p in operation.get("parameters", []))
    names_object = "{" in path
    statuses = ["401", "429"]
    if has_body or has_query or method == "post" or path.startswith("/v1/models/"):
        statuses.append("400")
    if names_object or (method, path) in _BODY_NAMES_MODEL:
        statuses.append("404")
    if idempotent:
        statuses.append("409")
    if has_body:
        statuses.append("413")
    if (method, path) in _ENGINE_BACKED:
        statuses.append("503")
    return sorted(statuses)


def _idempotent(operation: dict[str, Any]) -> bool:
    # The idempotency dependency declares the header (``api/idempotency.py``).
    return any(
        p.get("in") == "header" and p.get("name", "").lower() == "idempotency-key"
        for p in operation.get("parameters", [])
    )


def rewrite(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace FastAPI's 422s with the statuses each operation really answers (in place).

    Args:
        schema: FastAPI's OpenAPI document.

    Returns:
        ``schema``.
    """
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    envelope = ErrorEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(envelope.pop("$defs", {}))
    components["ErrorEnvelope"] = envelope
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status in error_statuses(method, path, operation, _idempotent(operation)):
                responses[status] = {
                    "description": DESCRIPTIONS[status],
                    "content": {"application/json": {"schema": {"$ref": ENVELOPE_REF}}},
                }
            if (method, path) in _DOWNLOADS:
                responses["200"]["content"] = _DOWNLOADS[(method, path)]
            if (method, path) == ("post", "/v1/chat/completions"):
                responses["200"]["content"] = {
                    "application/json": {"schema": {"type": "object"}},
                    "text/event-stream": {"schema": {"type": "string"}},
                }
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve the rewritten document at ``/openapi.json`` (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = rewrite(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
