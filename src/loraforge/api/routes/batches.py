"""``/v1/batches`` — create, retrieve, list, cancel (chat completions run on the workers)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from loraforge.api.deps import OrgDep, ServicesDep, SessionDep
from loraforge.api.idempotency import idempotency
from loraforge.api.schemas.batches import Batch, BatchCreate, ListBatchesResponse, batch_public
from loraforge.asgi import StrictJSONRoute
from loraforge.batches import service

router = APIRouter(prefix="/batches", tags=["batches"], route_class=StrictJSONRoute)


@router.post("", dependencies=[Depends(idempotency)])
def create_batch(services: ServicesDep, session: SessionDep, org: OrgDep, params: BatchCreate) -> Batch:
    """Create a batch from an uploaded ``purpose="batch"`` file; it runs on the workers."""
    expires = params.output_expires_after
    batch = service.create_batch(
        session,
        services.blobs,
        services.catalog,
        services.dispatcher,
        org,
        input_file_id=params.input_file_id,
        endpoint=params.endpoint,
        completion_window=params.completion_window,
        metadata=params.metadata,
        output_expires_after=expires.seconds if expires else None,
    )
    return batch_public(batch)


@router.get("")
def list_batches(
    session: SessionDep,
    org: OrgDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ListBatchesResponse:
    """The organization's batches, newest first."""
    rows, has_more = service.list_batches(session, org, after=after, limit=limit)
    return ListBatchesResponse.of([batch_public(b) for b in rows], has_more)


@router.get("/{batch_id}")
def retrieve_batch(session: SessionDep, org: OrgDep, batch_id: str) -> Batch:
    """Retrieve a batch: its status, request counts and, once it ended, its output files."""
    return batch_public(service.get_batch(session, org, batch_id))


@router.post("/{batch_id}/cancel")
def cancel_batch(session: SessionDep, org: OrgDep, batch_id: str) -> Batch:
    """Cancel a batch: ``cancelling`` until its worker has written the results so far."""
    return batch_public(service.cancel_batch(session, org, batch_id))
