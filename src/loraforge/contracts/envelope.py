"""OpenAI's error envelope ``{"error": {"message", "type", "param", "code"}}``, for the API and the engine.

Both processes answer errors in this shape, and both map a request that fails validation through
:func:`validation_error`, so the same bad body gets the same ``param``, message and ``code`` from
either.
Pure pydantic: no HTTP framework; the FastAPI handlers that use it live with each app.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from loraforge.contracts.ranges import OUT_OF_RANGE, shown

# Where FastAPI says a value came from; not part of the field's name.
_SOURCES = ("body", "query", "path", "header", "form")
# Pydantic adds the union member it tried to the location (``int``, ``literal['auto']``, ...).
_MEMBER_PREFIXES = ("literal[", "constrained-", "function-")
_MEMBER_NAMES = ("int", "float", "str", "bool", "dict", "list")


class ErrorBody(BaseModel):
    """The inside of the envelope; all four keys are always present (the spec requires them)."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    """``{"error": {...}}``: what every non-2xx answer carries."""

    error: ErrorBody


def error_body(message: str, type_: str, param: str | None, code: str) -> dict[str, Any]:
    """The envelope as a JSON-ready dict.

    Args:
        message: human-readable text (the SDK shows it as the exception's message).
        type_: OpenAI's error type, e.g. ``invalid_request_error`` or ``server_error``.
        param: the request field at fault, if any.
        code: machine-readable code, e.g. ``model_not_found``: required, so that every error a
            client gets from this service carries one (``ErrorBody.code`` stays optional for
            reading other servers' errors).

    Returns:
        ``{"error": {"message", "type", "param", "code"}}``.
    """
    body = ErrorBody(message=message, type=type_, param=param, code=code)
    return ErrorEnvelope(error=body).model_dump()


def server_error_body() -> dict[str, Any]:
    """The envelope of an unexpected failure (500): the same words from the API and the engine."""
    return error_body(
        "The server had an error while processing your request.", "server_error", None, "server_error"
    )


def loc_to_param(loc: Sequence[str | int]) -> str | None:
    """A pydantic error location as OpenAI's ``param``: ``hyperparameters.n_epochs``, ``messages.[0].role``.

    The source (``body``, ``query``…) and union member tags are dropped; list indexes are written
    ``[i]`` as OpenAI does.
    """
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in loc if p not in _SOURCES]
    parts = [p for p in parts if not p.startswith(_MEMBER_PREFIXES) and p not in _MEMBER_NAMES]
    return ".".join(parts) or None


# pydantic error types -> OpenAI-style ``code`` (OpenAI: missing_required_parameter,
# unknown_parameter, invalid_type, invalid_value).
_CODES = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
    "json_invalid": "invalid_json",
}
# Errors about the value sent (not its absence): the message repeats what was sent.
_NO_INPUT = ("missing", "extra_forbidden", "json_invalid", OUT_OF_RANGE)


def _code(error_type: str) -> str:
    if error_type in _CODES:
        return _CODES[error_type]
    if error_type.endswith(("_type", "_parsing")) or error_type in ("model_attributes_type", "dict_type"):
        return "invalid_type"
    return "invalid_value"


def validation_error(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None, str]:
    """``(message, param, code)`` for a request that failed validation (a ``RequestValidationError``).

    The first error speaks for the request, as OpenAI reports one problem at a time. A value that
    was refused is repeated (``...; got 200``); a field typed with ``contracts.ranges.explained``
    says its whole range (``n_epochs must be 'auto' or an integer from 1 to 50; got 200``).

    Args:
        errors: pydantic's error dicts (``exc.errors()``).

    Returns:
        The message, the ``param`` and the ``code`` to put in an ``invalid_request_error`` envelope.
    """
    first: Mapping[str, Any] = errors[0] if errors else {"loc": (), "msg": "Invalid request"}
    param = loc_to_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "Invalid request"))
    kind = str(first.get("type", ""))
    code = _code(kind)
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param, code
    if kind == "json_invalid":
        return "We could not parse the JSON body of your request.", None, code
    if kind == "missing":
        return (f"Missing required parameter: '{param}'." if param else msg), param, code
    if kind == OUT_OF_RANGE:
        return (f"{param} {msg}" if param else msg), param, code
    if kind not in _NO_INPUT and "input" in first:
        msg = f"{msg}; got {shown(first['input'])}"
    return (f"Invalid value for '{param}': {msg}" if param else msg), param, code


__all__ = [
    "ErrorBody",
    "ErrorEnvelope",
    "error_body",
    "loc_to_param",
    "server_error_body",
    "validation_error",
]
