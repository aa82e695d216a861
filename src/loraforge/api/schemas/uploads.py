"""``Upload`` and ``UploadPart`` as OpenAI returns them, and the create/complete bodies."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from loraforge.api.schemas.files import file_public
from loraforge.db.models import FileRecord, Upload, UploadPart


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


def upload_public(upload: Upload, file: FileRecord | None = None) -> dict[str, Any]:
    """OpenAI's ``Upload``; ``file`` is the File a completed upload became."""
    return {
        "id": upload.id,
        "object": "upload",
        "bytes": upload.bytes,
        "created_at": upload.created_at,
        "expires_at": upload.expires_at,
        "filename": upload.filename,
        "purpose": upload.purpose,
        "status": upload.status,
        "file": file_public(file) if file is not None else None,
    }


def part_public(part: UploadPart) -> dict[str, Any]:
    """OpenAI's ``UploadPart``."""
    return {
        "id": part.id,
        "object": "upload.part",
        "created_at": part.created_at,
        "upload_id": part.upload_id,
    }
