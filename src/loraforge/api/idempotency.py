"""``Idempotency-Key`` on create endpoints: a retried POST returns the original object.

The ``openai`` SDK retries POSTs on timeouts, 408/409/429 and 5xx without an idempotency key
(OPENAI_CONTRACT.md §0, §10.9), so a create whose response was lost would otherwise run twice.
A caller that sends ``Idempotency-Key: K`` gets this contract, per organization + method + path:

- first request: runs normally; a 2xx response is stored for ``idempotency_ttl_seconds`` (24 h);
- same key, same request again: the stored status and body, with ``Idempotent-Replayed: true``;
- same key, different request: 400 ``idempotency_key_reused``;
- same key while the first is still running: 409 ``idempotency_key_in_use`` (the SDK retries 409,
  and its retry then gets the replay);
- an error response is stored too if the request had already committed something (e.g. the job
  was saved but could not be queued): running it again could duplicate that. An error before any
  commit (validation, a 4xx, a crash) changed nothing, so it frees the key for a retry.

Two parts, because a dependency cannot see the response its route returns:

- :func:`idempotency`, a dependency on the create route, claims the key (a row with no response
  yet) or answers the replay by raising :class:`IdempotentReplay`;
- :class:`IdempotencyMiddleware` holds back the claimed request's response until the app has
  finished — including the request's session commit, which FastAPI runs after the route — then
  stores it or frees the key, and only then lets the response out. So a replay never points at an
  object whose transaction failed, and a client holding a response can always replay it.

Whether the request committed is observed with an ``after_commit`` listener on its session.

Wire it with :func:`install_idempotency` and ``dependencies=[Depends(idempotency)]`` on a route.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request, Response
from sqlalchemy import delete, event, select
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraforge.api.deps import OrgDep, Services, ServicesDep, SessionDep
from loraforge.contracts.envelope import server_error_body
from loraforge.db.models import IdempotencyKey
from loraforge.db.session import session_scope
from loraforge.errors import InvalidRequestError, LoraforgeError
from loraforge.ids import now

HEADER = "idempotency-key"
REPLAYED_HEADER = "idempotent-replayed"
MAX_KEY_LENGTH = 255
# The middleware leaves a holder here; the dependency records its claim in it.
_SCOPE_KEY = "loraforge.idempotency"
_FILE_CHUNK = 1024 * 1024


class IdempotencyKeyInUseError(LoraforgeError):
    """The first request with this key has not finished (409: the SDK retries it)."""

    status_code = 409
    default_code = "idempotency_key_in_use"


class IdempotentReplay(Exception):  # noqa: N818 - not an error: the stored answer to a replay
    """Raised by the dependency to answer with the stored response instead of running the route."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


@dataclass
class _Holder:
    services: Services | None = None
    claim: int | None = None  # ``idempotency_keys.seq`` of the row this request claimed
    committed: bool = False  # the request's own session committed (it had effects)

    def mark_committed(self, _session: object) -> None:
        self.committed = True


async def _file_digest(upload: UploadFile) -> str:
    digest = hashlib.sha256()
    await upload.seek(0)
    while chunk := await upload.read(_FILE_CHUNK):
        digest.update(chunk)
    await upload.seek(0)  # the route reads it next
    return digest.hexdigest()


async def request_fingerprint(request: Request) -> str:
    """sha256 of what the request asks for, stable across the SDK's retries.

    JSON bodies are compared after canonicalisation (key order, whitespace); multipart bodies
    field by field with each file's name and content hash, because every retry of a multipart
    request gets a new random boundary.
    """
    digest = hashlib.sha256(f"{request.method} {request.url.path}?{request.url.query}\n".encode())
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()  # already parsed for the route: cached on the request
        fields: list[list[Any]] = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                fields.append([name, "file", value.filename, await _file_digest(value)])
            else:
                fields.append([name, "field", value])
        # Sorted by name only: the order of repeated fields is part of the request.
        canonical = json.dumps(sorted(fields, key=lambda f: str(f[0]))).encode()
    else:
        body = await request.body()
        try:
            canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
        except ValueError:
            canonical = body
    digest.update(canonical)
    return digest.hexdigest()


def _claim(services: Services, org_id: str, key: str, method: str, path: str, fingerprint: str) -> int:
    """Claim ``key`` for this request, or raise what a repeat of it should get."""
    settings = services.settings
    for _ in range(2):  # a concurrent first request may win the insert; then re-read once
        try:
            with session_scope(services.sessions) as session:
                stamp = now()
                # Expired keys of every org go here, so the table holds about a day of keys.
                session.execute(
                    delete(IdempotencyKey).where(
                        IdempotencyKey.created_at < stamp - settings.idempotency_ttl_seconds
                    )
                )
                row = session.execute(
                    select(IdempotencyKey).where(
                        IdempotencyKey.org_id == org_id,
                        IdempotencyKey.key == key,
                        IdempotencyKey.method == method,
                        IdempotencyKey.path == path,
                    )
                ).scalar_one_or_none()
                if row is None:
                    row = IdempotencyKey(
                        org_id=org_id,
                        key=key,
                        method=method,
                        path=path,
                        request_hash=fingerprint,
                        created_at=stamp,
                    )
                    session.add(row)
                    session.flush()
                    return row.seq
                if row.request_hash != fingerprint:
                    raise InvalidRequestError(
                        f"Keys for idempotent requests can only be used with the same parameters they were "
                        f"first used with. Try using a key other than '{key}' if you meant to execute a "
                        "different request.",
                        code="idempotency_key_reused",
                    )
                if row.response_status is not None:
                    raise IdempotentReplay(row.response_status, row.response_body or "")
                if row.created_at > stamp - settings.idempotency_lock_seconds:
                    raise IdempotencyKeyInUseError(
                        f"A request with Idempotency-Key '{key}' is still being processed; retry shortly."
                    )
                # The first request died without an answer (its process crashed): take the key over.
                row.created_at = stamp
                return row.seq
        except IntegrityError:
            continue
    raise IdempotencyKeyInUseError(f"A request with Idempotency-Key '{key}' is still being processed.")


async def idempotency(
    request: Request,
    services: ServicesDep,
    session: SessionDep,
    org: OrgDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Makes the create safe to retry: the same key and request within 24 h "
            "returns the first response (1 to 255 characters).",
        ),
    ] = None,
) -> None:
    """Route dependency: claim the request's ``Idempotency-Key`` or answer its replay.

    The header is declared (not only read) so that ``/openapi.json`` documents it.

    Raises:
        InvalidRequestError: the key is too long, or was used with a different request.
        IdempotencyKeyInUseError: the first request with this key is still running.
        IdempotentReplay: handled by :func:`install_idempotency`'s handler (the stored response).
    """
    key = idempotency_key
    if key is None:
        return
    holder = request.scope.get(_SCOPE_KEY)
    if not isinstance(holder, _Holder):
        raise RuntimeError("Idempotency-Key needs install_idempotency(app)")
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidRequestError(
            f"The Idempotency-Key header must be 1 to {MAX_KEY_LENGTH} characters.",
            code="invalid_idempotency_key",
        )
    fingerprint = await request_fingerprint(request)
    holder.claim = await run_in_threadpool(
        _claim, services, org.id, key, request.method, request.url.path, fingerprint
    )
    holder.services = services
    # The route shares this session (FastAPI caches dependencies per request).
    event.listen(session, "after_commit", holder.mark_committed)


def _finish(services: Services, holder: _Holder, status: int, body: bytes) -> None:
    assert holder.claim is not None
    with session_scope(services.sessions) as session:
        row = session.get(IdempotencyKey, holder.claim)
        if row is None:
            return
        if 200 <= status < 300 or holder.committed:
            row.response_status, row.response_body = status, body.decode("utf-8", "replace")
        else:
            session.delete(row)


# What ServerErrorMiddleware answers for an unhandled exception (api/errors.py ``_unexpected``).
_SERVER_ERROR = json.dumps(server_error_body()).encode()


class IdempotencyMiddleware:
    """Stores the response of a claimed key, or frees the key, once the app is done and before the
    response goes out (see the module docstring for which responses are stored)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        if scope["type"] != "http" or scope["method"] != "POST" or HEADER.encode() not in headers:
            await self.app(scope, receive, send)
            return
        holder = _Holder()
        scope[_SCOPE_KEY] = holder
        held: list[Message] = []

        async def hold(message: Message) -> None:
            if holder.claim is None:
                await send(message)  # nothing claimed (no route dependency, replay, bad key)
            else:
                held.append(message)

        try:
            await self.app(scope, receive, hold)
        except BaseException:
            if holder.claim is not None and holder.services is not None:
                await run_in_threadpool(_finish, holder.services, holder, 500, _SERVER_ERROR)
            raise
        if holder.claim is None or holder.services is None:
            return
        start = next((m for m in held if m["type"] == "http.response.start"), None)
        body = b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body")
        status = start["status"] if start else 500
        await run_in_threadpool(_finish, holder.services, holder, status, body)
        for message in held:
            await send(message)


async def _replay(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, IdempotentReplay)
    headers = {REPLAYED_HEADER: "true"}
    if exc.status >= 500:
        headers["x-should-retry"] = "false"  # a replayed failure stays a failure
    return Response(exc.body, status_code=exc.status, media_type="application/json", headers=headers)


def install_idempotency(app: FastAPI) -> None:
    """Add the middleware and the replay handler that :func:`idempotency` needs."""
    app.add_middleware(IdempotencyMiddleware)
    app.add_exception_handler(IdempotentReplay, _replay)
