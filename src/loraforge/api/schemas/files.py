"""``FileObject`` as OpenAI returns it."""

from __future__ import annotations

from typing import Any

from loraforge.db.models import FileRecord


def file_public(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": record.status,
        "status_details": record.status_details,
    }
