"""Storage per organization: files + pending uploads against the plan's bytes, pending uploads
against their count, parts no larger than their upload, ``expires_after`` enforced, and the
worker's sweeper removing what expired."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.models import FileRecord, Organization, Upload, UploadPart
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.files.quota import storage_used
from loraforge.files.sweeper import StorageSweeper, sweep_storage
from loraforge.ids import now
from loraforge.settings import Settings
from loraforge.storage.blobs import BlobStore
from tests.helpers import chat_examples, to_jsonl


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)
    yield make_sessionmaker(engine)
    engine.dispose()


def _org(sessions: sessionmaker[Session], name: str, **limits: int) -> str:
    with session_scope(sessions) as session:
        org = session.execute(select(Organization).where(Organization.name == name)).scalar_one()
        for key, value in limits.items():
            setattr(org, key, value)
        return org.id


def _client(api: TestClient, key: str) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)


def _stored_files(settings: Settings, org_id: str) -> list[Path]:
    """The org's stored files (not temp files, nor the store's ``.sha256`` checksum sidecars)."""
    folder = settings.blobs_dir / "files" / org_id
    if not folder.exists():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix != ".sha256")


def test_files_and_pending_uploads_count_against_the_storage_limit(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    client = _client(api, make_key("quota-org", tier="core"))
    data = to_jsonl(chat_examples(20))  # ~3.3 KB
    org_id = _org(sessions, "quota-org", storage_bytes=2 * len(data) + 100)
    first = client.files.create(file=("a.jsonl", io.BytesIO(data)), purpose="fine-tune")
    upload = client.uploads.create(
        bytes=len(data), filename="b.jsonl", mime_type="text/jsonl", purpose="fine-tune"
    )
    with sessions() as session:
        assert storage_used(session, org_id) == 2 * len(data)  # the upload reserves its size
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("c.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert exc.value.code == "storage_limit_exceeded" and exc.value.param == "file"
    assert "storage limit" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.create(bytes=200, filename="d.jsonl", mime_type="text/jsonl", purpose="fine-tune")
    assert exc.value.code == "storage_limit_exceeded" and exc.value.param == "bytes"
    assert len(_stored_files(settings, org_id)) == 1  # the refused file left nothing behind
    client.uploads.cancel(upload.id)  # frees its reservation
    client.files.delete(first.id)
    client.files.create(file=("c.jsonl", io.BytesIO(data)), purpose="fine-tune")


def test_pending_uploads_are_limited_in_number(api: TestClient, make_key, sessions) -> None:  # type: ignore[no-untyped-def]
    client = _client(api, make_key("pending-org", tier="trial"))
    _org(sessions, "pending-org", max_pending_uploads=2)
    made = [
        client.uploads.create(bytes=10, filename=f"{i}.jsonl", mime_type="text/jsonl", purpose="fine-tune")
        for i in range(2)
    ]
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.create(bytes=10, filename="x.jsonl", mime_type="text/jsonl", purpose="fine-tune")
    assert exc.value.code == "too_many_pending_uploads"
    client.uploads.cancel(made[0].id)
    client.uploads.create(bytes=10, filename="x.jsonl", mime_type="text/jsonl", purpose="fine-tune")


def test_a_part_may_not_exceed_what_the_upload_declared(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    client = _client(api, make_key("parts-org"))
    tiny = client.uploads.create(bytes=1, filename="t.jsonl", mime_type="text/jsonl", purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as exc:  # a 1-byte upload, a 2 MiB part
        client.uploads.parts.create(upload_id=tiny.id, data=b"x" * (2 * 1024 * 1024))
    assert exc.value.code == "part_exceeds_upload" and exc.value.param == "data"
    assert "created for 1 bytes" in exc.value.message
    folder = settings.blobs_dir / "uploads" / tiny.id
    assert not folder.exists() or not any(folder.iterdir())  # nothing of it was kept
    with sessions() as session:
        assert session.execute(select(UploadPart).where(UploadPart.upload_id == tiny.id)).first() is None

    data = to_jsonl(chat_examples(4))
    upload = client.uploads.create(
        bytes=len(data), filename="u.jsonl", mime_type="text/jsonl", purpose="fine-tune"
    )
    part = client.uploads.parts.create(upload_id=upload.id, data=data)
    resent = client.uploads.parts.create(upload_id=upload.id, data=data)  # its answer was lost: sent again
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.parts.create(upload_id=upload.id, data=b"{}\n")
    assert exc.value.code == "part_exceeds_upload"
    with pytest.raises(openai.BadRequestError) as exc:  # the completed file is the declared size
        client.uploads.complete(upload_id=upload.id, part_ids=[part.id, resent.id])
    assert exc.value.code == "upload_size_mismatch"
    done = client.uploads.complete(upload_id=upload.id, part_ids=[resent.id])
    assert done.status == "completed" and done.file is not None and done.file.bytes == len(data)


def _expire(sessions: sessionmaker[Session], model: type[FileRecord] | type[Upload], row_id: str) -> None:
    with session_scope(sessions) as session:
        session.execute(update(model).where(model.id == row_id).values(expires_at=now() - 1))


def test_expired_files_disappear_and_the_sweeper_removes_their_bytes(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    client = _client(api, make_key("expiry-org"))
    org_id = _org(sessions, "expiry-org")
    data = to_jsonl(chat_examples(20))
    kept = client.files.create(file=("k.jsonl", io.BytesIO(data)), purpose="fine-tune")
    doomed = client.files.create(
        file=("d.jsonl", io.BytesIO(data)),
        purpose="fine-tune",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert doomed.expires_at == doomed.created_at + 3600
    _expire(sessions, FileRecord, doomed.id)
    assert [f.id for f in client.files.list().data] == [kept.id]
    for call in (lambda: client.files.retrieve(doomed.id), lambda: client.files.content(doomed.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.create(model="loraforge/tiny-llama", training_file=doomed.id)
    assert exc.value.param == "training_file"
    with sessions() as session:
        assert storage_used(session, org_id) == len(data)  # an expired file holds no room
    assert len(_stored_files(settings, org_id)) == 2  # until the sweeper runs

    pending = client.uploads.create(
        bytes=len(data), filename="p.jsonl", mime_type="text/jsonl", purpose="fine-tune"
    )
    client.uploads.parts.create(upload_id=pending.id, data=data)
    _expire(sessions, Upload, pending.id)
    assert sweep_storage(sessions, BlobStore(str(settings.blobs_dir))) == (1, 1)
    assert [p.name for p in _stored_files(settings, org_id)] == [kept.id]
    with sessions() as session:
        assert session.execute(select(FileRecord).where(FileRecord.id == doomed.id)).first() is None
        assert session.execute(select(Upload.status).where(Upload.id == pending.id)).scalar_one() == "expired"
    assert not (settings.blobs_dir / "uploads" / pending.id).exists()
    assert sweep_storage(sessions, BlobStore(str(settings.blobs_dir))) == (0, 0)  # nothing left to do


def test_the_worker_sweeper_thread_expires_without_any_request(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    client = _client(api, make_key("sweep-org"))
    org_id = _org(sessions, "sweep-org")
    upload = client.uploads.create(bytes=5, filename="s.jsonl", mime_type="text/jsonl", purpose="fine-tune")
    client.uploads.parts.create(upload_id=upload.id, data=b"{}\n{}")
    stale = client.files.create(
        file=("s.jsonl", io.BytesIO(to_jsonl(chat_examples(2)))),
        purpose="fine-tune",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    _expire(sessions, Upload, upload.id)
    _expire(sessions, FileRecord, stale.id)
    sweeper = StorageSweeper(settings.model_copy(update={"storage_sweep_seconds": 0.05}), sessions)
    sweeper.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            _stored_files(settings, org_id) or (settings.blobs_dir / "uploads" / upload.id).exists()
        ):
            time.sleep(0.05)
    finally:
        sweeper.stop()
    assert _stored_files(settings, org_id) == []
    assert not (settings.blobs_dir / "uploads" / upload.id).exists()
