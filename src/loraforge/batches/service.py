"""Batches, the API's side: create (the input file checked, the plan's size limit), list,
retrieve, cancel. The worker runs them (``loraforge.worker.batches``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from loraforge.adapters import registry
from loraforge.batches import lines
from loraforge.batches.status import (
    CHAT_ENDPOINT,
    COMPLETION_WINDOW,
    FINAL,
    WINDOW_SECONDS,
    BatchStatus,
)
from loraforge.catalog import Catalog
from loraforge.contracts.dispatch import Dispatcher
from loraforge.db.models import Batch, Organization
from loraforge.db.pagination import paginate
from loraforge.errors import InvalidRequestError, NotFoundError
from loraforge.files.service import get_file
from loraforge.ids import new_id, now
from loraforge.plans import batch_request_limit
from loraforge.storage.blobs import BlobStore


def _refuse_problems(scan: lines.Scan) -> None:
    listed = "; ".join(p.message for p in scan.problems)
    more = scan.bad_lines - len(scan.problems)
    first = scan.problems[0]
    raise InvalidRequestError(
        f"The batch input file has {scan.bad_lines} invalid line(s): {listed}"
        + (f"; and {more} more." if more > 0 else ""),
        param="input_file_id",
        code="invalid_batch_input" if first.code == "invalid_request" else first.code,
    )


def _check_model(session: Session, catalog: Catalog, org: Organization, model: str) -> None:
    """Refuse a model that is neither a base model of the catalog nor one of the org's fine-tunes."""
    if catalog.get(model) is None:
        registry.resolve(session, org, model)  # ModelNotFoundError (404) if it is neither


def create_batch(
    session: Session,
    blobs: BlobStore,
    catalog: Catalog,
    dispatcher: Dispatcher,
    org: Organization,
    *,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    output_expires_after: int | None,
) -> Batch:
    """Check the input file and create the batch; its first task is sent after the commit.

    Args:
        session: the request's session (committed here, before the task is sent).
        blobs: where the input file's bytes are.
        catalog: the base models.
        dispatcher: sends the batch's task.
        org: the owner.
        input_file_id: an uploaded file of purpose ``batch``.
        endpoint: ``/v1/chat/completions`` (the one served).
        completion_window: ``24h``.
        metadata: up to 16 string pairs, echoed back.
        output_expires_after: seconds after which the output and error files expire (or None).

    Returns:
        The batch, ``validating``.

    Raises:
        InvalidRequestError: another endpoint or window, a file that is not a batch file, an
            invalid line (all listed, with line numbers), several models, or more requests than
            the org's plan allows in one batch.
        NotFoundError: no such file; ModelNotFoundError: the model is unknown to the org.
    """
    if endpoint != CHAT_ENDPOINT:
        raise InvalidRequestError(
            f"Batches run '{CHAT_ENDPOINT}' only; got '{endpoint}'.", param="endpoint", code="invalid_value"
        )
    if completion_window != COMPLETION_WINDOW:
        raise InvalidRequestError(
            f"completion_window must be '{COMPLETION_WINDOW}'; got '{completion_window}'.",
            param="completion_window",
            code="invalid_value",
        )
    record = get_file(session, org, input_file_id)
    if record.purpose != "batch":
        raise InvalidRequestError(
            f"File {input_file_id} has purpose '{record.purpose}'; a batch input file must be "
            "uploaded with purpose 'batch'.",
            param="input_file_id",
            code="invalid_file_purpose",
        )
    scan = lines.scan(blobs.iter_bytes(record.storage_key), endpoint)
    if scan.problems:
        _refuse_problems(scan)
    if scan.count == 0:
        raise InvalidRequestError(
            f"The batch input file {input_file_id} holds no requests.",
            param="input_file_id",
            code="empty_file",
        )
    limit = batch_request_limit(org)
    if limit is not None and scan.count > limit:
        raise InvalidRequestError(
            f"The batch input file holds {scan.count} requests; the {org.tier} plan allows at most "
            f"{limit} requests per batch. Split the file into several batches.",
            param="input_file_id",
            code="batch_too_large",
        )
    if len(scan.models) > 1:
        raise InvalidRequestError(
            "Every request of a batch must use the same model; the file names "
            + ", ".join(sorted(scan.models))
            + ".",
            param="input_file_id",
            code="mixed_models",
        )
    (model,) = scan.models
    _check_model(session, catalog, org, model)
    created = now()
    batch = Batch(
        id=new_id("batch_"),
        org_id=org.id,
        endpoint=endpoint,
        model=model,
        input_file_id=input_file_id,
        completion_window=completion_window,
        status=BatchStatus.VALIDATING.value,
        output_expires_after=output_expires_after,
        created_at=created,
        expires_at=created + WINDOW_SECONDS,
        total=scan.count,
        completed=0,
        failed=0,
        input_tokens=0,
        output_tokens=0,
        user_metadata=metadata,
        # Counted from creation: a batch whose first task is lost is sent again by the reaper.
        heartbeat_at=created,
        dispatch_token=1,
    )
    session.add(batch)
    # Commit first: the worker must find the batch it is sent.
    session.commit()
    dispatcher.run_batch(batch.id, batch.dispatch_token)
    return batch


def get_batch(session: Session, org: Organization, batch_id: str) -> Batch:
    """The org's batch ``batch_id``.

    Raises:
        NotFoundError: no such batch for this organization.
    """
    batch = session.execute(
        select(Batch).where(Batch.id == batch_id, Batch.org_id == org.id)
    ).scalar_one_or_none()
    if batch is None:
        raise NotFoundError(f"No batch found with id '{batch_id}'.", param="batch_id")
    return batch


def list_batches(
    session: Session, org: Organization, *, after: str | None, limit: int
) -> tuple[list[Batch], bool]:
    """A page of the org's batches, newest first."""
    stmt = select(Batch).where(Batch.org_id == org.id)
    return paginate(session, stmt, Batch, after=after, limit=limit)


def cancel_batch(session: Session, org: Organization, batch_id: str) -> Batch:
    """Ask for a batch to stop: ``cancelling`` now; its worker writes the results so far and
    marks it ``cancelled`` (at its next request, or its next task if none is running).

    Raises:
        InvalidRequestError: the batch already ended (400, not 409: the SDK retries 409).
    """
    batch = get_batch(session, org, batch_id)
    if batch.status == BatchStatus.CANCELLING:
        return batch
    values: dict[str, Any] = {"status": BatchStatus.CANCELLING.value, "cancelling_at": now()}
    changed = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.not_in([s.value for s in FINAL]))
        .values(**values)
    ).rowcount  # type: ignore[attr-defined]
    session.refresh(batch)
    if not changed and batch.status != BatchStatus.CANCELLING:
        raise InvalidRequestError(
            f"Batch {batch_id} is already {batch.status}; only an unfinished batch can be cancelled.",
            param="batch_id",
            code="batch_not_cancellable",
        )
    return batch
