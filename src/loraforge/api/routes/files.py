"""``/v1/files`` — upload, list, retrieve, content, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from loraforge.api.deps import OrgDep, ServicesDep, SessionDep
from loraforge.api.downloads import content_disposition
from loraforge.api.idempotency import idempotency
from loraforge.api.schemas.files import DeleteFileResponse, ListFilesResponse, OpenAIFile, file_public
from loraforge.asgi import StrictJSONRoute
from loraforge.errors import InvalidRequestError
from loraforge.files import service as files

router = APIRouter(prefix="/files", tags=["files"], route_class=StrictJSONRoute)


@router.post("", dependencies=[Depends(idempotency)])
def create_file(
    services: ServicesDep,
    session: SessionDep,
    org: OrgDep,
    file: UploadFile = File(...),
    purpose: str = Form(...),
    expires_anchor: str | None = Form(None, alias="expires_after[anchor]"),
    expires_seconds: int | None = Form(None, alias="expires_after[seconds]"),
) -> OpenAIFile:
    """Upload a file (multipart), streamed to storage."""
    if expires_seconds is not None and not 3600 <= expires_seconds <= 2592000:
        raise InvalidRequestError(
            f"expires_after[seconds] must be an integer from 3600 to 2592000; got {expires_seconds}.",
            param="expires_after.seconds",
            code="invalid_value",
        )
    if expires_anchor not in (None, "created_at"):
        raise InvalidRequestError(
            f"expires_after[anchor] must be 'created_at'; got {expires_anchor!r}.",
            param="expires_after.anchor",
            code="invalid_value",
        )
    record = files.create_file(
        session,
        services.blobs,
        services.dispatcher,
        org,
        stream=file.file,
        filename=file.filename or "upload",
        purpose=purpose,
        max_bytes=services.settings.max_upload_bytes,
        expires_after_seconds=expires_seconds,
    )
    return file_public(record)


@router.get("")
def list_files(
    session: SessionDep,
    org: OrgDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
) -> ListFilesResponse:
    """List the organization's files."""
    rows, has_more = files.list_files(session, org, purpose=purpose, after=after, limit=limit, order=order)
    return ListFilesResponse.of([file_public(r) for r in rows], has_more)


@router.get("/{file_id}")
def retrieve_file(session: SessionDep, org: OrgDep, file_id: str) -> OpenAIFile:
    """Retrieve a file object."""
    return file_public(files.get_file(session, org, file_id))


@router.get("/{file_id}/content")
def file_content(services: ServicesDep, session: SessionDep, org: OrgDep, file_id: str) -> StreamingResponse:
    """The file's bytes, streamed."""
    record = files.get_file(session, org, file_id)
    media = "text/csv" if record.filename.endswith(".csv") else "application/octet-stream"
    return StreamingResponse(
        services.blobs.iter_bytes(record.storage_key),
        media_type=media,
        headers={"content-disposition": content_disposition(record.filename)},
    )


@router.delete("/{file_id}")
def delete_file(services: ServicesDep, session: SessionDep, org: OrgDep, file_id: str) -> DeleteFileResponse:
    """Delete a file and its bytes."""
    record = files.delete_file(session, services.blobs, org, file_id)
    return DeleteFileResponse(id=record.id, deleted=True)
