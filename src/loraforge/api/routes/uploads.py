"""``/v1/uploads`` — OpenAI's multipart upload: create, add parts, complete, cancel."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, FastAPI, File, Request, Response, UploadFile
from fastapi.responses import JSONResponse

from loraforge.api.deps import OrgDep, ServicesDep, SessionDep
from loraforge.api.errors import error_body
from loraforge.api.idempotency import idempotency
from loraforge.api.schemas.uploads import (
    Upload,
    UploadComplete,
    UploadCreate,
    UploadPart,
    part_public,
    upload_public,
)
from loraforge.asgi import StrictJSONRoute
from loraforge.files import uploads

router = APIRouter(prefix="/uploads", tags=["uploads"], route_class=StrictJSONRoute)

_PART_PATH = re.compile(r"^/v1/uploads/[^/]+/parts$")
# Multipart framing around the part's bytes.
_MULTIPART_SLACK = 64 * 1024


@router.post("", dependencies=[Depends(idempotency)])
def create_upload(services: ServicesDep, session: SessionDep, org: OrgDep, body: UploadCreate) -> Upload:
    """Create a pending upload; it expires in an hour."""
    uploads.maybe_sweep(session, services.blobs)
    upload = uploads.create_upload(
        session,
        org,
        size=body.bytes,
        filename=body.filename,
        mime_type=body.mime_type,
        purpose=body.purpose,
        file_expires_after=body.expires_after.seconds if body.expires_after else None,
    )
    return upload_public(upload)


@router.post("/{upload_id}/parts")
def add_part(
    services: ServicesDep, session: SessionDep, org: OrgDep, upload_id: str, data: UploadFile = File(...)
) -> UploadPart:
    """Add one part (at most 64 MB), stored as it arrives."""
    part = uploads.add_part(session, services.blobs, org, upload_id, data.file)
    return part_public(part)


@router.post("/{upload_id}/complete", dependencies=[Depends(idempotency)])
def complete_upload(
    services: ServicesDep, session: SessionDep, org: OrgDep, upload_id: str, body: UploadComplete
) -> Upload:
    """Assemble the parts in ``part_ids`` order into a File (validated like any other)."""
    upload, record = uploads.complete_upload(
        session, services.blobs, services.dispatcher, org, upload_id, body.part_ids, body.md5
    )
    return upload_public(upload, record)


@router.post("/{upload_id}/cancel")
def cancel_upload(services: ServicesDep, session: SessionDep, org: OrgDep, upload_id: str) -> Upload:
    """Cancel a pending upload; its parts are deleted (the SDK sends an empty body)."""
    return upload_public(uploads.cancel_upload(session, services.blobs, org, upload_id))


def is_part_path(path: str) -> bool:
    """Whether ``path`` is an upload's ``/parts`` URL (limited by ``PART_MAX_BYTES``)."""
    return bool(_PART_PATH.match(path))


def install_part_limit(app: FastAPI) -> None:
    """Refuse a part over 64 MB before its body is read (``add_part`` also counts the bytes)."""

    @app.middleware("http")
    async def part_limit(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if (
            request.method == "POST"
            and length
            and length.isdigit()
            and int(length) > uploads.PART_MAX_BYTES + _MULTIPART_SLACK
            and _PART_PATH.match(request.url.path)
        ):
            return JSONResponse(
                error_body(
                    f"A part may be at most {uploads.PART_MAX_BYTES} bytes.",
                    "invalid_request_error",
                    "data",
                    "file_too_large",
                ),
                status_code=413,
            )
        return await call_next(request)
