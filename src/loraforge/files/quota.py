"""An organization's stored bytes against its plan's storage limit, and its pending uploads
against their count limit (``loraforge.plans``).

Stored bytes are its live files (not deleted, not expired) plus what its pending uploads declared:
an upload reserves its whole size when it is created, so parts can never take an org past its
limit, and completing it turns the reservation into a file of the same size.

Checks that must hold under concurrency lock the org's row first (:func:`loraforge.orgs.lock_org`),
then count, then write, in one transaction: two uploads that each fit alone cannot both pass.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from loraforge.db.models import FileRecord, Organization, Upload
from loraforge.errors import InvalidRequestError
from loraforge.ids import now
from loraforge.orgs import lock_org
from loraforge.plans import limits_for

STORAGE_CODE = "storage_limit_exceeded"
PENDING_CODE = "too_many_pending_uploads"


def file_is_live(at: int | None = None) -> ColumnElement[bool]:
    """A file that has not expired (``expires_after``) at ``at`` (default: now)."""
    stamp = now() if at is None else at
    return or_(FileRecord.expires_at.is_(None), FileRecord.expires_at > stamp)


def _pending(org_id: str, stamp: int) -> ColumnElement[bool]:
    return (Upload.org_id == org_id) & (Upload.status == "pending") & (Upload.expires_at > stamp)


def storage_used(session: Session, org_id: str) -> int:
    """Bytes of the org's live files plus the declared bytes of its pending uploads."""
    stamp = now()
    files = session.execute(
        select(func.coalesce(func.sum(FileRecord.bytes), 0)).where(
            FileRecord.org_id == org_id, file_is_live(stamp)
        )
    ).scalar_one()
    pending = session.execute(
        select(func.coalesce(func.sum(Upload.bytes), 0)).where(_pending(org_id, stamp))
    ).scalar_one()
    return int(files) + int(pending)


def storage_room(session: Session, org: Organization) -> int | None:
    """Bytes the org may still store (None: no limit); advisory, without the lock."""
    limit = limits_for(org).storage_bytes
    return None if limit is None else max(0, limit - storage_used(session, org.id))


def _refuse(limit: int, used: int, size: int, param: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"Storing {size} more bytes would take your organization past its storage limit of "
        f"{limit} bytes ({used} are used by files and pending uploads). Delete files "
        "(DELETE /v1/files/{file_id}) or cancel pending uploads to make room.",
        param=param,
        code=STORAGE_CODE,
    )


def reserve_storage(session: Session, org: Organization, size: int, *, param: str) -> None:
    """Lock the org, then refuse ``size`` more bytes past its storage limit.

    The caller writes its file or upload row in the same transaction and commits soon after.

    Raises:
        InvalidRequestError: 400 ``storage_limit_exceeded``.
    """
    limit = limits_for(org).storage_bytes
    if limit is None:
        return
    lock_org(session, org.id)
    used = storage_used(session, org.id)
    if used + size > limit:
        raise _refuse(limit, used, size, param)


def too_large_for_room(room: int, param: str, limit: int | None) -> InvalidRequestError:
    """The refusal of a file found, while it streams, to be larger than the org's room."""
    return InvalidRequestError(
        f"The file is larger than the {room} bytes left under your organization's storage limit "
        f"of {limit} bytes. Delete files (DELETE /v1/files/{{file_id}}) or cancel pending uploads "
        "to make room.",
        param=param,
        code=STORAGE_CODE,
    )


def reserve_pending_upload(session: Session, org: Organization, size: int) -> None:
    """Lock the org, then refuse a new pending upload past its count limit or its storage limit.

    Raises:
        InvalidRequestError: 400 ``too_many_pending_uploads`` or ``storage_limit_exceeded``.
    """
    limits = limits_for(org)
    if limits.max_pending_uploads is None and limits.storage_bytes is None:
        return
    lock_org(session, org.id)
    if limits.max_pending_uploads is not None:
        count = session.execute(
            select(func.count()).select_from(Upload).where(_pending(org.id, now()))
        ).scalar_one()
        if count >= limits.max_pending_uploads:
            raise InvalidRequestError(
                f"Your organization has {count} pending uploads, the most it may have at once. "
                "Complete or cancel one (POST /v1/uploads/{upload_id}/complete or /cancel), or "
                "wait for it to expire.",
                param="bytes",
                code=PENDING_CODE,
            )
    if limits.storage_bytes is not None:
        used = storage_used(session, org.id)
        if used + size > limits.storage_bytes:
            raise _refuse(limits.storage_bytes, used, size, "bytes")
