"""What a worker does with a batch (``/v1/batches``), Celery aside.

A batch runs as a chain of short tasks on the ``batch`` queue: each takes the batch's lease, runs
its requests one at a time through the engine fleet (the one engine client) for about
``batch_chunk_seconds``, and ends by sending the next task. So a batch holds a worker thread and
one slot of an engine's batch at a time, never for long: a file check or a training task waits
about one stretch at most for a worker thread, and interactive requests share the engine with at
most one request of each batch.

Each answer is written to ``batch_results`` as soon as it is known, with the request counts, in
one transaction: a worker that dies loses at most the request it was running, and the next one
skips every finished line. Every task carries the batch's ``dispatch_token``; the batch reaper
(``worker/batch_reaper.py``) gives a batch whose worker stopped beating a new token and sends it again, at
once when that worker was a dead process on this host (a restarted ``serve`` worker), after
``lease_timeout_seconds`` otherwise. A task whose token is no longer the batch's stops.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.adapters import registry
from loraforge.batches.lines import BatchRequest, iter_requests
from loraforge.batches.status import UNFINISHED, BatchStatus
from loraforge.catalog import Catalog, load_catalog
from loraforge.contracts.engine import LoadLoRAAdapterRequest
from loraforge.db.models import Batch, BatchResult, FileRecord, Organization
from loraforge.db.session import session_scope
from loraforge.engines import EngineFleet, EngineReply
from loraforge.errors import LoraforgeError, ServiceUnavailableError
from loraforge.ids import now
from loraforge.settings import Settings
from loraforge.storage import open_store
from loraforge.worker import batch_files
from loraforge.worker.training import shutting_down, worker_id

log = logging.getLogger(__name__)

# After an engine could not be reached, the next task waits this long.
ENGINE_RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class Next:
    """The task to send next: the batch's new token, after ``countdown`` seconds."""

    token: int
    countdown: float = 0.0


@dataclass(frozen=True)
class _Target:
    base: str
    adapter: LoadLoRAAdapterRequest | None


@lru_cache(maxsize=4)
def _catalog(path: Path | None) -> Catalog:
    return load_catalog(path)


def _claim(sessions: sessionmaker[Session], batch_id: str, token: int, wid: str) -> Batch | None:
    """Take the batch's lease for this task, or None when the token is stale or it ended."""
    with session_scope(sessions) as session:
        taken = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.dispatch_token == token, Batch.status.in_(UNFINISHED))
            .values(worker_id=wid, heartbeat_at=now())
        ).rowcount  # type: ignore[attr-defined]
        if not taken:
            return None
        batch = session.execute(select(Batch).where(Batch.id == batch_id)).scalar_one()
        session.expunge(batch)
        return batch


def _pass_on(sessions: sessionmaker[Session], batch_id: str, token: int) -> int | None:
    """Give the batch the next token (for the task this one sends); None if it moved on."""
    with session_scope(sessions) as session:
        moved = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.dispatch_token == token)
            .values(dispatch_token=token + 1, heartbeat_at=now(), worker_id=None)
        ).rowcount  # type: ignore[attr-defined]
    return token + 1 if moved else None


class _Beat:
    """Renews the lease every ``heartbeat_seconds`` while one request runs long."""

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], batch_id: str, token: int
    ) -> None:
        self._stop = threading.Event()
        self._args = (settings, sessions, batch_id, token)
        self._thread = threading.Thread(target=self._run, name=f"beat-{batch_id}", daemon=True)

    def _run(self) -> None:
        settings, sessions, batch_id, token = self._args
        while not self._stop.wait(settings.heartbeat_seconds):
            try:
                with session_scope(sessions) as session:
                    session.execute(
                        update(Batch)
                        .where(Batch.id == batch_id, Batch.dispatch_token == token)
                        .values(heartbeat_at=now())
                    )
            except Exception:  # noqa: BLE001 - a missed beat only risks an early hand-over
                log.exception("batch %s: heartbeat failed", batch_id)

    def __enter__(self) -> _Beat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_batch(settings: Settings, sessions: sessionmaker[Session], batch_id: str, token: int) -> Next | None:
    """Run a stretch of the batch's requests (the ``run_batch`` task).

    Returns:
        The next task to send, or None: the batch ended, or this task's token is stale.
    """
    wid = worker_id()
    batch = _claim(sessions, batch_id, token, wid)
    if batch is None:
        return None
    blobs = open_store(settings)
    status = BatchStatus(batch.status)
    if status == BatchStatus.FINALIZING:  # a worker died writing the files: write them again
        final = BatchStatus.CANCELLED if batch.cancelling_at else BatchStatus.COMPLETED
        batch_files.finish(sessions, blobs, batch_id, token, final)
        return None
    if status == BatchStatus.CANCELLING:
        batch_files.finish(sessions, blobs, batch_id, token, BatchStatus.CANCELLED)
        return None
    if status == BatchStatus.VALIDATING:
        with session_scope(sessions) as session:
            session.execute(
                update(Batch)
                .where(Batch.id == batch_id, Batch.status == BatchStatus.VALIDATING.value)
                .values(status=BatchStatus.IN_PROGRESS.value, in_progress_at=now())
            )
    with _Beat(settings, sessions, batch_id, token):
        outcome = _run_stretch(settings, sessions, batch, token)
    if outcome == "done":
        batch_files.finish(sessions, blobs, batch_id, token, BatchStatus.COMPLETED)
        return None
    if outcome in ("cancelled", "ended"):
        return None
    following = _pass_on(sessions, batch_id, token)
    if following is None:
        return None
    return Next(following, ENGINE_RETRY_SECONDS if outcome == "engine_down" else 0.0)


def _target(settings: Settings, sessions: sessionmaker[Session], batch: Batch) -> _Target:
    """Where the batch's model runs: a base model, or a fine-tune's base and adapter.

    Raises:
        ModelNotFoundError: the fine-tuned model was deleted since the batch was created.
    """
    entry = _catalog(settings.models_config).get(batch.model)
    if entry is not None:
        return _Target(entry.id, None)
    with session_scope(sessions) as session:
        org = session.execute(select(Organization).where(Organization.id == batch.org_id)).scalar_one()
        served = registry.resolve(session, org, batch.model)
    return _Target(
        served.base_model, LoadLoRAAdapterRequest(lora_name=served.name, lora_path=served.adapter_path)
    )


def _done_lines(sessions: sessionmaker[Session], batch_id: str) -> set[int]:
    with session_scope(sessions) as session:
        return set(
            session.execute(select(BatchResult.line).where(BatchResult.batch_id == batch_id)).scalars()
        )


def _input_key(sessions: sessionmaker[Session], batch: Batch) -> str | None:
    with session_scope(sessions) as session:
        return session.execute(
            select(FileRecord.storage_key).where(FileRecord.id == batch.input_file_id)
        ).scalar_one_or_none()


def _run_stretch(settings: Settings, sessions: sessionmaker[Session], batch: Batch, token: int) -> str:
    """Run requests until the batch is done, the stretch's time is up, or the batch stops.

    Returns:
        ``done`` (every request answered), ``more`` (time is up), ``engine_down``, ``cancelled``
        (results written, batch cancelled or expired), or ``ended`` (another task has it now, or
        it failed).
    """
    key = _input_key(sessions, batch)
    if key is None:
        batch_files.fail(
            sessions,
            batch.id,
            token,
            "input_file_missing",
            f"The input file {batch.input_file_id} was deleted.",
        )
        return "ended"
    blobs = open_store(settings)
    done = _done_lines(sessions, batch.id)
    deadline = time.monotonic() + settings.batch_chunk_seconds
    # The lines not answered yet, in file order.
    requests = ((i, r) for i, r in iter_requests(blobs.iter_bytes(key), batch.endpoint) if i not in done)
    first = next(requests, None)
    if first is None:
        return "done"
    try:
        target = _target(settings, sessions, batch)
    except LoraforgeError as exc:
        target = None
        missing = exc
    fleet = EngineFleet.from_settings(settings)

    async def stretch() -> str:
        try:
            for index, request in itertools.chain([first], requests):
                state = _status(sessions, batch.id)
                if state == BatchStatus.CANCELLING:
                    batch_files.finish(sessions, blobs, batch.id, token, BatchStatus.CANCELLED)
                    return "cancelled"
                if now() >= batch.expires_at:
                    left = itertools.chain([(index, request)], requests)
                    unrun = [r.custom_id for _, r in left if isinstance(r, BatchRequest)]
                    batch_files.finish(sessions, blobs, batch.id, token, BatchStatus.EXPIRED, unrun)
                    return "cancelled"
                if state != BatchStatus.IN_PROGRESS:
                    return "ended"
                if not isinstance(request, BatchRequest):
                    code, body = 400, _envelope(request.message, request.code, request.param)
                elif target is None:
                    code, body = missing.status_code, _envelope(missing.message, missing.code, missing.param)
                else:
                    try:
                        reply = await fleet.chat(
                            target.base, {**request.body, "stream": False}, target.adapter
                        )
                    except ServiceUnavailableError as exc:
                        log.warning(
                            "batch %s: %s; retrying in %.0f s", batch.id, exc.message, ENGINE_RETRY_SECONDS
                        )
                        return "engine_down"
                    assert isinstance(reply, EngineReply)  # not streamed
                    code, body = reply.status_code, reply.json()
                custom_id = request.custom_id if isinstance(request, BatchRequest) else f"line-{request.line}"
                if not _record(sessions, batch.id, token, index, custom_id, code, body):
                    return "ended"
                # Checked after a request, so every stretch makes progress.
                if shutting_down() or time.monotonic() > deadline:
                    return "more"
            return "done"
        finally:
            await fleet.aclose()

    return asyncio.run(stretch())


def _envelope(message: str, code: str | None, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def _status(sessions: sessionmaker[Session], batch_id: str) -> BatchStatus:
    with session_scope(sessions) as session:
        return BatchStatus(session.execute(select(Batch.status).where(Batch.id == batch_id)).scalar_one())


def _record(
    sessions: sessionmaker[Session],
    batch_id: str,
    token: int,
    index: int,
    custom_id: str,
    code: int,
    body: Any,
) -> bool:
    """Store one answer and count it, in one transaction; False if the batch has a newer token."""
    ok = 200 <= code < 300
    usage = body.get("usage") if ok and isinstance(body, dict) else None
    usage = usage if isinstance(usage, dict) else {}
    with session_scope(sessions) as session:
        counted = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.dispatch_token == token)
            .values(
                heartbeat_at=now(),
                completed=Batch.completed + int(ok),
                failed=Batch.failed + int(not ok),
                input_tokens=Batch.input_tokens + int(usage.get("prompt_tokens") or 0),
                output_tokens=Batch.output_tokens + int(usage.get("completion_tokens") or 0),
            )
        ).rowcount  # type: ignore[attr-defined]
        if not counted:
            return False
        session.add(
            BatchResult(
                batch_id=batch_id, line=index, ok=ok, record=batch_files.result_line(custom_id, code, body)
            )
        )
    return True


__all__ = ["Next", "run_batch"]
