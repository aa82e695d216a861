"""``FileObject`` as OpenAI returns it."""

from __future__ import annotations

from typing import Any

from loraforge.db.models import FileRecord


def file_public(record: FileRecord) -> dict[str, Any]:
    # ``expires_at`` and ``status_details`` are optional and not nullable in OpenAI's schema:
    # omitted when unset.
    body = {
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
    return {k: v for k, v in body.items() if v is not None or k not in ("expires_at", "status_details")}
