"""``OpenAIFile`` and the Files API's list and deletion objects, as OpenAI returns them."""

from __future__ import annotations

from typing import Literal

from pydantic import MISSING

from loraforge.api.schemas.common import IdentifiedObject, ListPage, ResponseObject
from loraforge.db.models import FileRecord


class OpenAIFile(IdentifiedObject):
    """A file (openai-python's ``FileObject``)."""

    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    # Optional and not nullable in OpenAI's schema: absent when the file does not expire.
    expires_at: int | MISSING = MISSING
    filename: str
    purpose: str
    # ``uploaded`` until a fine-tune file's validation ends in ``processed`` or ``error``.
    status: Literal["uploaded", "processed", "error"]
    # Why validation failed; absent otherwise.
    status_details: str | MISSING = MISSING


class ListFilesResponse(ListPage[OpenAIFile]):
    """``GET /v1/files``."""


class DeleteFileResponse(ResponseObject):
    """``DELETE /v1/files/{file_id}``."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool


def file_public(record: FileRecord) -> OpenAIFile:
    """The ``OpenAIFile`` of a stored file."""
    return OpenAIFile(
        id=record.id,
        bytes=record.bytes,
        created_at=record.created_at,
        expires_at=MISSING if record.expires_at is None else record.expires_at,
        filename=record.filename,
        purpose=record.purpose,
        status=record.status,  # type: ignore[arg-type]  # validated against the literal
        status_details=MISSING if record.status_details is None else record.status_details,
    )
