"""``Upload`` and ``UploadPart`` as OpenAI returns them, and the create/complete bodies."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from loraforge.api.schemas.common import ResponseObject
from loraforge.api.schemas.files import OpenAIFile, file_public
from loraforge.db import models as db


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: Annotated[int, Field(ge=3600, le=2592000)]


class UploadCreate(BaseModel):
    """``POST /v1/uploads``; ``expires_after`` is the resulting File's expiry (the upload's is 1 h)."""

    model_config = ConfigDict(extra="forbid")

    bytes: Annotated[int, Field(ge=1)]
    filename: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    mime_type: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    purpose: str
    expires_after: ExpiresAfter | None = None


class UploadComplete(BaseModel):
    """``POST /v1/uploads/{id}/complete``: the parts in file order, and optionally their MD5."""

    model_config = ConfigDict(extra="forbid")

    part_ids: list[str]
    md5: str | None = None


class Upload(ResponseObject):
    """An upload: its parts arrive one by one and become a File on completion."""

    id: str
    object: Literal["upload"] = "upload"
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: Literal["pending", "completed", "cancelled", "expired"]
    # The File a completed upload became; null before.
    file: OpenAIFile | None


class UploadPart(ResponseObject):
    """One part of an upload."""

    id: str
    object: Literal["upload.part"] = "upload.part"
    created_at: int
    upload_id: str


def upload_public(upload: db.Upload, file: db.FileRecord | None = None) -> Upload:
    """OpenAI's ``Upload``; ``file`` is the File a completed upload became."""
    return Upload(
        id=upload.id,
        bytes=upload.bytes,
        created_at=upload.created_at,
        expires_at=upload.expires_at,
        filename=upload.filename,
        purpose=upload.purpose,
        status=upload.status,  # type: ignore[arg-type]  # validated against the literal
        file=file_public(file) if file is not None else None,
    )


def part_public(part: db.UploadPart) -> UploadPart:
    """OpenAI's ``UploadPart``."""
    return UploadPart(id=part.id, created_at=part.created_at, upload_id=part.upload_id)
