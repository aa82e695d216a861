"""Files: upload (streamed, size-limited, atomic), list, retrieve, content, delete."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from loraforge.db.models import FileRecord, Organization
from loraforge.db.pagination import paginate
from loraforge.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError
from loraforge.ids import new_id, now
from loraforge.storage.blobs import CHUNK, BlobStore

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


def _limited(stream: BinaryIO, limit: int) -> Iterator[bytes]:
    total = 0
    while chunk := stream.read(CHUNK):
        total += len(chunk)
        if total > limit:
            raise PayloadTooLargeError(
                f"File is larger than the {limit} byte limit for uploads.", param="file"
            )
        yield chunk


def _jsonl_checked(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Pass chunks through while checking, line by line, that each non-blank line is a JSON object.

    Constant memory: only the unfinished last line of a chunk is held.
    """
    pending = b""
    line_no = 0

    def check(line: bytes) -> None:
        if not line.strip():
            return
        hint = line[:20].decode("utf-8", "replace")
        try:
            value = json.loads(line)
        except (UnicodeDecodeError, ValueError):
            value = None
        if not isinstance(value, dict):
            raise InvalidRequestError(
                "Expected file to have JSONL format, where every line is a JSON object. "
                f'Line {line_no} is not a JSON object (HINT: line starts with: "{hint}...").',
                param="file",
                code="invalid_file_format",
            )

    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            line_no += 1
            check(line)
        yield chunk
    if pending:
        line_no += 1
        check(pending)


def create_file(
    session: Session,
    blobs: BlobStore,
    org: Organization,
    *,
    stream: BinaryIO,
    filename: str,
    purpose: str,
    max_bytes: int,
    expires_after_seconds: int | None = None,
) -> FileRecord:
    """Store an upload and its record. On any error nothing is left behind."""
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequestError(
            f"'{purpose}' is not one of {', '.join(UPLOAD_PURPOSES)} - 'purpose'", param="purpose"
        )
    if purpose == "fine-tune" and not filename.endswith(".jsonl"):
        raise InvalidRequestError(
            f"Invalid file format for fine-tuning: '{filename}'. Upload a .jsonl file.",
            param="file",
            code="invalid_file_format",
        )
    file_id = new_id("file-")
    key = f"files/{org.id}/{file_id}"
    chunks = _limited(stream, max_bytes)
    if purpose == "fine-tune":
        chunks = _jsonl_checked(chunks)
    size = blobs.write_stream(key, chunks)
    if size == 0:
        blobs.delete(key)
        raise InvalidRequestError("The uploaded file is empty.", param="file", code="empty_file")
    created = now()
    record = FileRecord(
        id=file_id,
        org_id=org.id,
        filename=filename,
        purpose=purpose,
        bytes=size,
        created_at=created,
        expires_at=created + expires_after_seconds if expires_after_seconds else None,
        status="processed",
        storage_key=key,
    )
    session.add(record)
    try:
        session.flush()
    except BaseException:
        blobs.delete(key)
        raise
    return record


def get_file(session: Session, org: Organization, file_id: str) -> FileRecord:
    record = session.execute(
        select(FileRecord).where(FileRecord.id == file_id, FileRecord.org_id == org.id)
    ).scalar_one_or_none()
    if record is None:
        raise NotFoundError(f"No such File object: {file_id}", param="file_id")
    return record


def list_files(
    session: Session, org: Organization, *, purpose: str | None, after: str | None, limit: int, order: str
) -> tuple[list[FileRecord], bool]:
    stmt = select(FileRecord).where(FileRecord.org_id == org.id)
    if purpose:
        stmt = stmt.where(FileRecord.purpose == purpose)
    return paginate(session, stmt, FileRecord, after=after, limit=limit, descending=order == "desc")


def delete_file(session: Session, blobs: BlobStore, org: Organization, file_id: str) -> FileRecord:
    record = get_file(session, org, file_id)
    session.delete(record)
    session.flush()
    blobs.delete(record.storage_key)
    return record
