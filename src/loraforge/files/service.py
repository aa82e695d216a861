"""Files: upload (streamed, size-limited, atomic), list, retrieve, content, delete."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from loraforge.contracts.dispatch import Dispatcher
from loraforge.db.models import FileRecord, Organization
from loraforge.db.pagination import paginate
from loraforge.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError
from loraforge.ids import new_id, now
from loraforge.preflight.validate import LineScanner
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


def _scan(scanner: LineScanner, line: bytes) -> None:
    if line.strip():
        scanner.feed(line)
    else:  # blank lines (a trailing one is common) are left to the pre-flight task
        scanner.line_no += 1


def _jsonl_checked(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Pass chunks through, checking every line; refuse the file at the end if any line is not a
    JSON object, listing every problem the pre-flight finds in it (up to ``MAX_ISSUES``: broken
    JSON on line 2 and an unknown role on line 10 are both named), not only the first.

    Constant memory: only the unfinished last line of a chunk is held. A file whose lines are all
    JSON objects is accepted here; the rest of its format is then checked by the pre-flight task
    (its ``status_details`` list the problems), as before.
    """
    pending = b""
    scanner = LineScanner()
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            _scan(scanner, line)
        yield chunk
    if pending:
        _scan(scanner, pending)
    if scanner.first_broken is not None:
        issues = scanner.report.errors.items
        listed = [f"{issue} ({issue.code})" for issue in issues]
        raise InvalidRequestError(
            "Expected file to have JSONL format, where every line is a JSON object. "
            f"Line {scanner.first_broken} is not; {scanner.bad_lines} line(s) in all have problems: "
            + "; ".join(listed)
            + ("; ..." if scanner.report.errors.total > len(issues) else ""),
            param="file",
            code="invalid_file_format",
        )


def check_purpose_and_name(purpose: str, filename: str, *, param: str) -> None:
    """Refuse an unknown purpose, or a fine-tune file that is not ``.jsonl`` (reported as ``param``)."""
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequestError(
            f"'{purpose}' is not one of {', '.join(UPLOAD_PURPOSES)} - 'purpose'",
            param="purpose",
            code="invalid_purpose",
        )
    if purpose == "fine-tune" and not filename.endswith(".jsonl"):
        raise InvalidRequestError(
            f"Invalid file format for fine-tuning: '{filename}'. Upload a .jsonl file.",
            param=param,
            code="invalid_file_format",
        )


def create_file(
    session: Session,
    blobs: BlobStore,
    dispatcher: Dispatcher,
    org: Organization,
    *,
    stream: BinaryIO,
    filename: str,
    purpose: str,
    max_bytes: int,
    expires_after_seconds: int | None = None,
) -> FileRecord:
    """Store an upload and its record; a fine-tune file is committed and its check queued.

    Args:
        session: the request's session; committed here when a check is queued.
        blobs: where the bytes go.
        dispatcher: where the ``validate_file`` task goes.
        org: the owner.
        stream: the upload's bytes, read once.
        filename: as uploaded.
        purpose: OpenAI's file purpose.
        max_bytes: the upload limit.
        expires_after_seconds: ``expires_after[seconds]``, if given.

    Returns:
        The file (``uploaded`` until its check ends, or ``processed`` for other purposes).

    Raises:
        InvalidRequestError, PayloadTooLargeError: a refusal; nothing is left behind.
    """
    record = _store_file(
        session,
        blobs,
        org,
        stream=stream,
        filename=filename,
        purpose=purpose,
        max_bytes=max_bytes,
        expires_after_seconds=expires_after_seconds,
    )
    if record.status == "uploaded":
        # Commit first: the worker must find the file it is asked to validate.
        session.commit()
        dispatcher.validate_file(record.id)
    return record


def _store_file(
    session: Session,
    blobs: BlobStore,
    org: Organization,
    *,
    stream: BinaryIO,
    filename: str,
    purpose: str,
    max_bytes: int,
    expires_after_seconds: int | None,
) -> FileRecord:
    """Store an upload and its record. On any error nothing is left behind."""
    check_purpose_and_name(purpose, filename, param="file")
    file_id = new_id("file-")
    key = f"files/{org.id}/{file_id}"
    chunks = _limited(stream, max_bytes)
    if purpose == "fine-tune":
        # Lines that are not JSON objects are refused now, all of them listed; the full format
        # is checked after the upload (the ``validate_file`` task).
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
        # A fine-tune file is "uploaded" until the pre-flight task marks it processed or error.
        status="uploaded" if purpose == "fine-tune" else "processed",
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
