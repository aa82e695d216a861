"""What the response models share: their two bases, the list page, and stored numbers.

Routes build one of these models and return it; FastAPI's response validation then passes the
instance through without validating it again, serializes it straight to JSON, and
``/openapi.json`` shows its schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, Literal, Self, TypeVar

from pydantic import MISSING, BaseModel, ConfigDict

# A number read back from a JSON column, kept as written: ``2`` stays ``2`` and ``2.0`` stays ``2.0``
# (a plain ``float`` field would turn a stored ``2`` into ``2.0`` on the wire).
Number = int | float


def _absent_is_optional(schema: dict[str, Any], model: type[BaseModel]) -> None:
    # A field defaulting to MISSING is left out of the JSON when unset: not required.
    absent = {name for name, field in model.model_fields.items() if field.default is MISSING}
    if "required" in schema:
        schema["required"] = [name for name in schema["required"] if name not in absent]


class ResponseObject(BaseModel):
    """Base of what a route returns: every field is always in the JSON, nulls included, except
    one that defaults to ``MISSING`` (omitted while unset, as OpenAI omits ``expires_at``).

    ``extra="forbid"``: a builder that passes a key the model does not declare fails in the tests
    instead of dropping the key from a response. Fields with a default (``object``) are still
    listed as required in the OpenAPI document, because every response carries them.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_serialization_defaults_required=True,
        json_schema_extra=_absent_is_optional,
    )


class StoredObject(BaseModel):
    """An object the API shows as a JSON column stores it (hyperparameters, estimate, metrics).

    The declared fields document the object. A field the stored object may lack defaults to
    ``MISSING``, so the key stays absent from the response, as before, rather than turning into
    a ``null``. Keys not declared pass through unchanged (``extra="allow"``).
    """

    model_config = ConfigDict(extra="allow")


class IdentifiedObject(ResponseObject):
    """An object with an ``id``, the cursor of the lists that hold it."""

    id: str


ItemT = TypeVar("ItemT", bound=IdentifiedObject)


class ListPage(ResponseObject, Generic[ItemT]):
    """A page of a cursor-paginated list (``after`` is the last id of the previous page)."""

    object: Literal["list"] = "list"
    data: list[ItemT]
    first_id: str | None
    last_id: str | None
    has_more: bool

    @classmethod
    def of(cls, data: Sequence[ItemT], has_more: bool) -> Self:
        """The page holding ``data``; ``first_id``/``last_id`` are None when it is empty.

        Args:
            data: the page's objects, in the order the list returns them.
            has_more: whether objects follow this page.

        Returns:
            The page.
        """
        return cls(
            data=list(data),
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=has_more,
        )


class HealthStatus(ResponseObject):
    """``GET /health``."""

    status: Literal["ok"] = "ok"
