"""Constrained request fields whose refusal says what is allowed and what was sent.

A union such as ``"auto" | int in [1, 50]`` fails in pydantic with one error per member, and the
first (``Input should be 'auto'``) hides the range the caller actually missed. :func:`explained`
wraps a field's type so that any failure becomes one error of type :data:`OUT_OF_RANGE` reading
``must be 'auto' or an integer from 1 to 50; got 200``; ``contracts.envelope.validation_error``
prefixes the parameter. The wrapped type keeps its constraints, so the JSON schema (and
``/openapi.json``) still shows them.

Shared by the API's request bodies and the engine's (pure pydantic).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

OUT_OF_RANGE = "out_of_range"
# How much of a refused value the message repeats.
_SHOWN_CHARS = 60


def shown(value: Any) -> str:
    """``value`` as the caller wrote it (JSON), cut to a readable length."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def explained(allowed: str) -> WrapValidator:
    """A validator to put in ``Annotated[T, explained("an integer from 1 to 50")]``.

    Args:
        allowed: what the field accepts, in words that follow "must be".

    Returns:
        A wrap validator that turns any failure of ``T`` into one ``out_of_range`` error.
    """

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                OUT_OF_RANGE, "must be {allowed}; got {got}", {"allowed": allowed, "got": shown(value)}
            ) from None

    return WrapValidator(validate)


def int_range(low: int, high: int) -> str:
    """``an integer from {low} to {high}``."""
    return f"an integer from {low} to {high}"


__all__ = ["OUT_OF_RANGE", "explained", "int_range", "shown"]
