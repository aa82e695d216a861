"""``Batch`` and its list as OpenAI returns them, and the create body."""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import MISSING, BaseModel, ConfigDict, Field, StringConstraints

from loraforge.api.schemas.common import IdentifiedObject, ListPage, ResponseObject
from loraforge.api.schemas.uploads import ExpiresAfter
from loraforge.contracts.ranges import explained
from loraforge.db.models import Batch as BatchRow

MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class BatchCreate(BaseModel):
    """``POST /v1/batches`` (OpenAI's ``CreateBatchRequest``)."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: Annotated[str, StringConstraints(min_length=1)]
    endpoint: str
    completion_window: str
    metadata: Annotated[
        Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None,
        explained("an object of at most 16 string keys (64 characters) and string values (512)"),
    ] = None
    # When the output and error files expire (anchor ``created_at``: when they are written).
    output_expires_after: ExpiresAfter | None = None


class BatchError(ResponseObject):
    """One reason a batch failed (``BatchError``)."""

    code: str
    message: str
    param: str | None
    line: int | None


class BatchErrors(ResponseObject):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(ResponseObject):
    total: int
    completed: int
    failed: int


class InputTokensDetails(ResponseObject):
    cached_tokens: int = 0


class OutputTokensDetails(ResponseObject):
    reasoning_tokens: int = 0


class BatchUsage(ResponseObject):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


Status = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]


class Batch(IdentifiedObject):
    """A batch (openai-python's ``Batch``). OpenAI's optional fields are not nullable: one that
    does not apply yet (``output_file_id``, ``completed_at``...) is absent."""

    object: Literal["batch"] = "batch"
    endpoint: str
    model: str
    errors: BatchErrors | MISSING = MISSING
    input_file_id: str
    completion_window: str
    status: Status
    output_file_id: str | MISSING = MISSING
    error_file_id: str | MISSING = MISSING
    created_at: int
    in_progress_at: int | MISSING = MISSING
    expires_at: int
    finalizing_at: int | MISSING = MISSING
    completed_at: int | MISSING = MISSING
    failed_at: int | MISSING = MISSING
    expired_at: int | MISSING = MISSING
    cancelling_at: int | MISSING = MISSING
    cancelled_at: int | MISSING = MISSING
    request_counts: BatchRequestCounts
    usage: BatchUsage
    metadata: dict[str, str] | None


class ListBatchesResponse(ListPage[Batch]):
    """``GET /v1/batches``."""


T = TypeVar("T", int, str)


def _opt(value: T | None) -> T | MISSING:
    return MISSING if value is None else value


def batch_public(row: BatchRow) -> Batch:
    """The ``Batch`` of a stored batch."""
    errors = BatchErrors(data=[BatchError.model_validate(e) for e in row.errors]) if row.errors else MISSING
    return Batch(
        id=row.id,
        endpoint=row.endpoint,
        model=row.model,
        errors=errors,
        input_file_id=row.input_file_id,
        completion_window=row.completion_window,
        status=row.status,  # type: ignore[arg-type]  # validated against the literal
        output_file_id=_opt(row.output_file_id),
        error_file_id=_opt(row.error_file_id),
        created_at=row.created_at,
        in_progress_at=_opt(row.in_progress_at),
        expires_at=row.expires_at,
        finalizing_at=_opt(row.finalizing_at),
        completed_at=_opt(row.completed_at),
        failed_at=_opt(row.failed_at),
        expired_at=_opt(row.expired_at),
        cancelling_at=_opt(row.cancelling_at),
        cancelled_at=_opt(row.cancelled_at),
        request_counts=BatchRequestCounts(total=row.total, completed=row.completed, failed=row.failed),
        usage=BatchUsage(
            input_tokens=row.input_tokens,
            input_tokens_details=InputTokensDetails(),
            output_tokens=row.output_tokens,
            output_tokens_details=OutputTokensDetails(),
            total_tokens=row.input_tokens + row.output_tokens,
        ),
        metadata=row.user_metadata,
    )
