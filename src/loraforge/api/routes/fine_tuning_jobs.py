"""``/v1/fine_tuning/jobs`` — create, list, retrieve, cancel, pause, resume, events, checkpoints."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from loraforge.api.deps import OrgDep, ServicesDep, SessionDep
from loraforge.api.idempotency import idempotency
from loraforge.api.schemas.fine_tuning import (
    FineTuningJob,
    ListFineTuningJobCheckpointsResponse,
    ListFineTuningJobEventsResponse,
    ListPaginatedFineTuningJobsResponse,
    checkpoint_public,
    event_public,
    job_public,
)
from loraforge.api.schemas.preflight import FineTuningJobDryRun, dry_run_public
from loraforge.asgi import StrictJSONRoute
from loraforge.jobs import checkpoints, control, service
from loraforge.jobs.params import JobCreateParams

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine_tuning"], route_class=StrictJSONRoute)

_METADATA_KEY = re.compile(r"^metadata\[(.+)\]$")


@router.post("", dependencies=[Depends(idempotency)])
def create_job(
    services: ServicesDep, session: SessionDep, org: OrgDep, params: JobCreateParams
) -> FineTuningJob | FineTuningJobDryRun:
    """Create a fine-tuning job; validation and training run on the workers.

    With ``"dry_run": true`` nothing is created: the answer is the pre-flight report.
    """
    if params.dry_run:
        return dry_run_public(
            service.dry_run_job(session, services.catalog, services.settings, services.blobs, org, params)
        )
    job = service.create_job(session, services.catalog, services.settings, org, params, services.dispatcher)
    return job_public(job, org)


@router.get("")
def list_jobs(
    request: Request,
    session: SessionDep,
    org: OrgDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ListPaginatedFineTuningJobsResponse:
    """List the organization's jobs, newest first; ``metadata[k]=v`` filters."""
    metadata = {}
    for key, value in request.query_params.multi_items():
        if match := _METADATA_KEY.match(key):
            metadata[match.group(1)] = value
    rows, has_more = service.list_jobs(session, org, after=after, limit=limit, metadata=metadata)
    return ListPaginatedFineTuningJobsResponse.of([job_public(j, org) for j in rows], has_more)


@router.get("/{job_id}")
def retrieve_job(session: SessionDep, org: OrgDep, job_id: str) -> FineTuningJob:
    """Retrieve a job."""
    return job_public(service.get_job(session, org, job_id), org)


@router.post("/{job_id}/cancel")
def cancel_job(session: SessionDep, org: OrgDep, job_id: str) -> FineTuningJob:
    """Cancel an unfinished job (the SDK sends an empty body)."""
    return job_public(service.cancel_job(session, org, job_id), org)


@router.get("/{job_id}/events")
def list_events(
    session: SessionDep,
    org: OrgDep,
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> ListFineTuningJobEventsResponse:
    """The job's events, newest first."""
    rows, has_more = service.list_events(session, org, job_id, after=after, limit=limit)
    return ListFineTuningJobEventsResponse.of([event_public(e) for e in rows], has_more)


@router.post("/{job_id}/pause")
def pause_job(session: SessionDep, org: OrgDep, job_id: str) -> FineTuningJob:
    """Pause a queued or running job (a running one turns ``paused`` once its checkpoint is saved)."""
    return job_public(control.pause_job(session, org, job_id), org)


@router.post("/{job_id}/resume")
def resume_job(services: ServicesDep, session: SessionDep, org: OrgDep, job_id: str) -> FineTuningJob:
    """Resume a paused job: it is queued again and continues from its pause checkpoint."""
    job = control.resume_job(session, services.settings, org, job_id, services.dispatcher)
    return job_public(job, org)


@router.get("/{job_id}/checkpoints")
def list_checkpoints(
    session: SessionDep,
    org: OrgDep,
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> ListFineTuningJobCheckpointsResponse:
    """The job's epoch checkpoints (the last 3 are kept), newest first."""
    service.get_job(session, org, job_id)
    rows, has_more = checkpoints.list_for_job(session, job_id, after=after, limit=limit)
    return ListFineTuningJobCheckpointsResponse.of([checkpoint_public(c) for c in rows], has_more)
