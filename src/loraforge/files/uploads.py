"""Uploads (OpenAI's multipart upload API): create, add parts, complete into a File, cancel.

Parts (at most 64 MB each) are written to the blob store as they arrive, under
``uploads/{upload_id}/{part_id}``. ``complete`` concatenates the parts named in ``part_ids``, in that
order, into an ordinary File (checking the byte count and an optional MD5) and discards the parts.
An upload expires an hour after it was created: it is marked ``expired`` and its parts are deleted
when it is next touched, or by :func:`sweep`, which the API runs now and then (at most once a
minute per process, on upload requests) so abandoned parts do not pile up.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import BinaryIO

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from loraforge.contracts.dispatch import Dispatcher
from loraforge.db.models import FileRecord, Organization, Upload, UploadPart
from loraforge.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError
from loraforge.files.service import check_purpose_and_name
from loraforge.ids import new_id, now
from loraforge.storage.blobs import CHUNK, BlobStore

PART_MAX_BYTES = 64 * 1024 * 1024
# OpenAI accepts 8 GB per upload; ``files.bytes`` is a 32-bit INTEGER column on PostgreSQL, so an
# upload here is capped just under 2 GiB until that column is widened.
UPLOAD_MAX_BYTES = 2**31 - 1
UPLOAD_TTL_SECONDS = 3600
SWEEP_EVERY_SECONDS = 60.0
SWEEP_BATCH = 100

_last_sweep = [0.0]  # per process: when the opportunistic sweep last ran (monotonic seconds)


def _part_key(upload_id: str, part_id: str) -> str:
    return f"uploads/{upload_id}/{part_id}"


def _discard(session: Session, blobs: BlobStore, upload: Upload) -> None:
    """Delete an upload's parts: rows now, bytes with them (the directory as a whole)."""
    session.execute(delete(UploadPart).where(UploadPart.upload_id == upload.id))
    blobs.delete(f"uploads/{upload.id}")


def _expire_if_due(session: Session, blobs: BlobStore, upload: Upload) -> bool:
    if upload.status == "pending" and now() >= upload.expires_at:
        upload.status = "expired"
        _discard(session, blobs, upload)
        session.flush()
        return True
    return False


def create_upload(
    session: Session,
    org: Organization,
    *,
    size: int,
    filename: str,
    mime_type: str,
    purpose: str,
    file_expires_after: int | None = None,
) -> Upload:
    """A pending upload of ``size`` bytes that will become ``filename``.

    Raises:
        InvalidRequestError: unknown purpose, a fine-tune file that is not ``.jsonl``, a bad size.
    """
    check_purpose_and_name(purpose, filename, param="filename")
    if size < 1 or size > UPLOAD_MAX_BYTES:
        raise InvalidRequestError(
            f"bytes must be an integer from 1 to {UPLOAD_MAX_BYTES}; got {size}.",
            param="bytes",
            code="invalid_value",
        )
    created = now()
    upload = Upload(
        id=new_id("upload_"),
        org_id=org.id,
        filename=filename,
        purpose=purpose,
        mime_type=mime_type,
        bytes=size,
        created_at=created,
        expires_at=created + UPLOAD_TTL_SECONDS,
        file_expires_after=file_expires_after,
        status="pending",
    )
    session.add(upload)
    session.flush()
    return upload


def get_upload(session: Session, blobs: BlobStore, org: Organization, upload_id: str) -> Upload:
    """The org's upload (marked expired, parts deleted, if its hour is up).

    Raises:
        NotFoundError: no such upload for this organization.
    """
    upload = session.execute(
        select(Upload).where(Upload.id == upload_id, Upload.org_id == org.id).with_for_update()
    ).scalar_one_or_none()
    if upload is None:
        raise NotFoundError(f"No such Upload object: {upload_id}", param="upload_id")
    _expire_if_due(session, blobs, upload)
    return upload


def _pending(session: Session, blobs: BlobStore, org: Organization, upload_id: str) -> Upload:
    upload = get_upload(session, blobs, org, upload_id)
    if upload.status != "pending":
        # Keep the expiry (and its deleted parts) even though this request fails.
        session.commit()
        raise InvalidRequestError(
            f"Upload {upload_id} is {upload.status}: only a pending upload takes parts or completes.",
            param="upload_id",
            code=f"upload_{upload.status}",
        )
    return upload


def _limited(stream: BinaryIO) -> Iterator[bytes]:
    total = 0
    while chunk := stream.read(CHUNK):
        total += len(chunk)
        if total > PART_MAX_BYTES:
            raise PayloadTooLargeError(f"A part may be at most {PART_MAX_BYTES} bytes.", param="data")
        yield chunk


def add_part(
    session: Session, blobs: BlobStore, org: Organization, upload_id: str, stream: BinaryIO
) -> UploadPart:
    """Store one part of a pending upload.

    Raises:
        InvalidRequestError: the upload is not pending, the part is empty, or the parts exceed
            what the upload can use.
        PayloadTooLargeError: the part is over 64 MB.
    """
    upload = _pending(session, blobs, org, upload_id)
    part_id = new_id("part_")
    key = _part_key(upload_id, part_id)
    size = blobs.write_stream(key, _limited(stream))
    stored = sum(session.execute(select(UploadPart.bytes).where(UploadPart.upload_id == upload_id)).scalars())
    # Room for one re-sent part on top of the declared size; more cannot all be completed.
    if size == 0 or stored + size > upload.bytes + PART_MAX_BYTES:
        blobs.delete(key)
        why = (
            "is empty"
            if size == 0
            else f"would bring the stored parts past the upload's {upload.bytes} bytes"
        )
        raise InvalidRequestError(f"The part {why}.", param="data", code="invalid_part")
    part = UploadPart(id=part_id, upload_id=upload_id, created_at=now(), bytes=size, storage_key=key)
    session.add(part)
    try:
        session.flush()
    except BaseException:
        blobs.delete(key)
        raise
    return part


def complete_upload(
    session: Session,
    blobs: BlobStore,
    dispatcher: Dispatcher,
    org: Organization,
    upload_id: str,
    part_ids: list[str],
    md5: str | None = None,
) -> tuple[Upload, FileRecord]:
    """Concatenate ``part_ids`` (in order) into a new File, commit, drop the parts, queue its check.

    Args:
        session: the request's session; committed here.
        blobs: the parts and the new file's bytes.
        dispatcher: where a fine-tune file's ``validate_file`` task goes.
        org: the owner.
        upload_id: the pending upload.
        part_ids: the parts, in file order.
        md5: the assembled file's expected MD5, if given.

    Returns:
        The completed upload and its File.

    Raises:
        InvalidRequestError: not pending, unknown or repeated part ids, a byte count different from
            the upload's, or an MD5 that does not match (the upload stays pending then).
    """
    upload, record = _assemble(session, blobs, org, upload_id, part_ids, md5)
    # Commit first: the worker must find the file, and the parts are only dropped once it exists.
    session.commit()
    _discard(session, blobs, upload)
    if record.status == "uploaded":
        dispatcher.validate_file(record.id)
    return upload, record


def _assemble(
    session: Session,
    blobs: BlobStore,
    org: Organization,
    upload_id: str,
    part_ids: list[str],
    md5: str | None,
) -> tuple[Upload, FileRecord]:
    """The File made of ``part_ids``, stored (not committed); the upload marked completed."""
    upload = _pending(session, blobs, org, upload_id)
    if not part_ids:
        raise InvalidRequestError(
            "part_ids must name at least one part.", param="part_ids", code="invalid_part_ids"
        )
    if len(set(part_ids)) != len(part_ids):
        raise InvalidRequestError(
            "part_ids names a part more than once.", param="part_ids", code="invalid_part_ids"
        )
    parts = {
        p.id: p
        for p in session.execute(select(UploadPart).where(UploadPart.upload_id == upload_id)).scalars()
    }
    unknown = [p for p in part_ids if p not in parts]
    if unknown:
        raise InvalidRequestError(
            f"No such part in upload {upload_id}: {', '.join(unknown[:5])}",
            param="part_ids",
            code="invalid_part_ids",
        )
    total = sum(parts[p].bytes for p in part_ids)
    if total != upload.bytes:
        raise InvalidRequestError(
            f"The parts hold {total} bytes, but the upload was created for {upload.bytes} bytes.",
            param="part_ids",
            code="upload_size_mismatch",
        )
    digest = hashlib.md5(usedforsecurity=False)

    def chunks() -> Iterator[bytes]:
        for part_id in part_ids:
            for chunk in blobs.iter_bytes(parts[part_id].storage_key):
                digest.update(chunk)
                yield chunk

    file_id = new_id("file-")
    key = f"files/{org.id}/{file_id}"
    size = blobs.write_stream(key, chunks())
    if md5 is not None and md5.strip().lower() != digest.hexdigest():
        blobs.delete(key)
        raise InvalidRequestError(
            f"The MD5 of the assembled file is {digest.hexdigest()}, not {md5}.",
            param="md5",
            code="md5_mismatch",
        )
    created = now()
    record = FileRecord(
        id=file_id,
        org_id=org.id,
        filename=upload.filename,
        purpose=upload.purpose,
        bytes=size,
        created_at=created,
        expires_at=created + upload.file_expires_after if upload.file_expires_after else None,
        # Like POST /v1/files: a fine-tune file waits for its pre-flight task.
        status="uploaded" if upload.purpose == "fine-tune" else "processed",
        storage_key=key,
    )
    session.add(record)
    upload.status = "completed"
    upload.file_id = file_id
    try:
        session.flush()
    except BaseException:
        blobs.delete(key)
        raise
    return upload, record


def cancel_upload(session: Session, blobs: BlobStore, org: Organization, upload_id: str) -> Upload:
    """Cancel a pending upload and delete its parts.

    Raises:
        InvalidRequestError: the upload already completed, expired or was cancelled.
    """
    upload = _pending(session, blobs, org, upload_id)
    upload.status = "cancelled"
    _discard(session, blobs, upload)
    session.flush()
    return upload


def file_of(session: Session, upload: Upload) -> FileRecord | None:
    """The File a completed upload became (None if none, or deleted since)."""
    if not upload.file_id:
        return None
    return session.execute(select(FileRecord).where(FileRecord.id == upload.file_id)).scalar_one_or_none()


def sweep(session: Session, blobs: BlobStore, limit: int = SWEEP_BATCH) -> int:
    """Expire pending uploads past their hour and delete parts left behind by finished uploads.

    Returns:
        How many uploads were cleaned.
    """
    stamp = now()
    due = list(
        session.execute(
            select(Upload).where(Upload.status == "pending", Upload.expires_at <= stamp).limit(limit)
        ).scalars()
    )
    for upload in due:
        _expire_if_due(session, blobs, upload)
    # A part stored while its upload was being completed or cancelled outlives the cleanup.
    stray = list(
        session.execute(
            select(Upload)
            .where(Upload.status != "pending", Upload.id.in_(select(UploadPart.upload_id)))
            .limit(limit)
        ).scalars()
    )
    for upload in stray:
        _discard(session, blobs, upload)
    session.flush()
    return len(due) + len(stray)


def maybe_sweep(session: Session, blobs: BlobStore) -> None:
    """:func:`sweep`, at most once every ``SWEEP_EVERY_SECONDS`` in this process."""
    clock = time.monotonic()
    if clock - _last_sweep[0] < SWEEP_EVERY_SECONDS:
        return
    _last_sweep[0] = clock
    sweep(session, blobs)
