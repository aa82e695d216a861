"""A batch's end: its per-request results become the output and error files (OpenAI files of
purpose ``batch_output`` in the object store), and the batch takes its final state."""

from __future__ import annotations

import json
from collections.abc import Iterator

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.batches.status import BatchStatus
from loraforge.db.models import Batch, BatchResult, FileRecord
from loraforge.db.session import session_scope
from loraforge.ids import new_id, now
from loraforge.storage.blobs import BlobStore

OUTPUT_PURPOSE = "batch_output"
# What a request the batch never ran gets in the error file when the batch expires.
EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


def result_line(custom_id: str, status_code: int | None, body: object, error: object = None) -> str:
    """One line of an output or error file (OpenAI's batch output format)."""
    response = (
        None
        if status_code is None
        else {"status_code": status_code, "request_id": new_id("req_"), "body": body}
    )
    return json.dumps(
        {"id": new_id("batch_req_"), "custom_id": custom_id, "response": response, "error": error}
    )


def _records(session: Session, batch_id: str, ok: bool, extra: list[str]) -> Iterator[bytes]:
    rows = session.execute(
        select(BatchResult.record)
        .where(BatchResult.batch_id == batch_id, BatchResult.ok == ok)
        .order_by(BatchResult.line)
        .execution_options(yield_per=1000)
    ).scalars()
    for record in rows:
        yield record.encode() + b"\n"
    for line in extra:
        yield line.encode() + b"\n"


def _write_file(
    session: Session, blobs: BlobStore, batch: Batch, kind: str, chunks: Iterator[bytes], keys: list[str]
) -> str | None:
    """Write one results file and its row; None (nothing written) when it would be empty.
    ``keys`` gets the blob's key, to be removed if the transaction is rolled back."""
    file_id = new_id("file-")
    key = f"files/{batch.org_id}/{file_id}"
    keys.append(key)
    size = blobs.write_stream(key, chunks)
    if size == 0:
        blobs.delete(key)
        return None
    created = now()
    expires = batch.output_expires_after
    session.add(
        FileRecord(
            id=file_id,
            org_id=batch.org_id,
            filename=f"{batch.id}_{kind}.jsonl",
            purpose=OUTPUT_PURPOSE,
            bytes=size,
            created_at=created,
            expires_at=created + expires if expires else None,
            status="processed",
            storage_key=key,
        )
    )
    return file_id


def finish(
    sessions: sessionmaker[Session],
    blobs: BlobStore,
    batch_id: str,
    token: int,
    final: BatchStatus,
    unrun: list[str] | None = None,
) -> bool:
    """Write the results so far and end the batch in ``final`` (completed, cancelled, expired).

    Args:
        sessions: the database.
        blobs: the object store.
        batch_id: the batch; its results rows are removed in the same transaction.
        token: the task's dispatch token; nothing is written if the batch's moved on.
        final: the end state.
        unrun: ``custom_id`` of requests never run (an expired batch lists them in the error file).

    Returns:
        Whether this call ended the batch.
    """
    stamp = now()
    with session_scope(sessions) as session:
        moved = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.dispatch_token == token, Batch.status.in_(_ENDABLE))
            .values(status=BatchStatus.FINALIZING.value, finalizing_at=stamp)
        ).rowcount  # type: ignore[attr-defined]
    if not moved:
        return False
    keys: list[str] = []
    try:
        with session_scope(sessions) as session:
            batch = session.execute(select(Batch).where(Batch.id == batch_id)).scalar_one()
            expired = [result_line(cid, None, None, EXPIRED_ERROR) for cid in unrun or []]
            output = _write_file(session, blobs, batch, "output", _records(session, batch_id, True, []), keys)
            errors = _write_file(
                session, blobs, batch, "error", _records(session, batch_id, False, expired), keys
            )
            batch.output_file_id, batch.error_file_id = output, errors
            batch.status = final.value
            batch.failed += len(expired)
            setattr(batch, f"{final.value}_at", now())
            batch.worker_id = None
            session.execute(delete(BatchResult).where(BatchResult.batch_id == batch_id))
    except BaseException:
        for key in keys:  # the rows were rolled back; their bytes go too
            blobs.delete(key)
        raise
    return True


def fail(sessions: sessionmaker[Session], batch_id: str, token: int, code: str, message: str) -> bool:
    """End the batch as ``failed`` with one error (OpenAI's ``errors.data``)."""
    with session_scope(sessions) as session:
        changed = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.dispatch_token == token, Batch.status.in_(_ENDABLE))
            .values(
                status=BatchStatus.FAILED.value,
                failed_at=now(),
                worker_id=None,
                errors=[{"code": code, "message": message, "param": None, "line": None}],
            )
        ).rowcount  # type: ignore[attr-defined]
        session.execute(delete(BatchResult).where(BatchResult.batch_id == batch_id))
    return bool(changed)


# A batch still being worked on, or left in finalizing by a worker that died while writing.
_ENDABLE = (
    BatchStatus.VALIDATING.value,
    BatchStatus.IN_PROGRESS.value,
    BatchStatus.CANCELLING.value,
    BatchStatus.FINALIZING.value,
)
