"""``/v1/uploads`` in process with the unmodified SDK: create, parts, complete (order, byte count,
MD5), cancel, expiry, the sweep of abandoned parts, limits, tenancy."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.models import Upload, UploadPart
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.files import uploads
from loraforge.jobs import file_checks
from loraforge.settings import Settings
from loraforge.storage.blobs import BlobStore
from tests.conftest import RecordingDispatcher
from tests.helpers import chat_examples, to_jsonl


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)
    yield make_sessionmaker(engine)
    engine.dispose()


def sdk(api: TestClient, key: str) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)


def _parts_on_disk(settings: Settings, upload_id: str) -> list[Path]:
    folder = settings.blobs_dir / "uploads" / upload_id
    return sorted(folder.iterdir()) if folder.exists() else []


def test_chunked_upload_of_a_file_over_the_files_limit(  # type: ignore[no-untyped-def]
    api: TestClient,
    make_key,
    settings: Settings,
    sessions: sessionmaker[Session],
    dispatcher: RecordingDispatcher,
) -> None:
    client = sdk(api, make_key("acme"))
    data = to_jsonl(chat_examples(400))
    assert len(data) > settings.max_upload_bytes  # /v1/files would refuse it (413)
    with pytest.raises(openai.APIStatusError):
        client.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="fine-tune")
    done = client.uploads.upload_file_chunked(
        file=data,
        filename="big.jsonl",
        bytes=len(data),
        mime_type="application/jsonl",
        purpose="fine-tune",
        part_size=30_000,
        md5=hashlib.md5(data).hexdigest(),
    )
    assert done.object == "upload" and done.status == "completed" and done.bytes == len(data)
    assert done.file is not None and done.file.bytes == len(data) and done.file.status == "uploaded"
    assert client.files.content(done.file.id).read() == data
    assert dispatcher.files_validated == [done.file.id]
    assert _parts_on_disk(settings, done.id) == []  # the parts are gone once the file exists
    file_checks.validate_file_record(settings, sessions, done.file.id)
    assert client.files.retrieve(done.file.id).status == "processed"


def test_parts_are_assembled_in_part_ids_order(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    up = client.uploads.create(bytes=9, filename="x.txt", mime_type="text/plain", purpose="assistants")
    assert up.status == "pending" and up.expires_at == up.created_at + 3600
    a = client.uploads.parts.create(upload_id=up.id, data=b"aaa")
    b = client.uploads.parts.create(upload_id=up.id, data=b"bbb")
    c = client.uploads.parts.create(upload_id=up.id, data=b"ccc")
    assert a.object == "upload.part" and a.upload_id == up.id and a.id.startswith("part_")
    done = client.uploads.complete(upload_id=up.id, part_ids=[c.id, a.id, b.id])
    assert done.file is not None and done.file.status == "processed"  # not fine-tune: nothing to check
    assert client.files.content(done.file.id).read() == b"cccaaabbb"
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.parts.create(upload_id=up.id, data=b"late")
    assert exc.value.code == "upload_completed"


def test_complete_checks_bytes_ids_and_md5(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    up = client.uploads.create(
        bytes=6, filename="x.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    a = client.uploads.parts.create(upload_id=up.id, data=b"{}\n")
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.complete(upload_id=up.id, part_ids=[a.id])
    assert exc.value.code == "upload_size_mismatch" and "3 bytes" in exc.value.message
    b = client.uploads.parts.create(upload_id=up.id, data=b"{}\n")
    for part_ids in ([a.id, "part_nope"], [a.id, a.id], []):
        with pytest.raises(openai.BadRequestError) as exc:
            client.uploads.complete(upload_id=up.id, part_ids=part_ids)
        assert exc.value.param == "part_ids"
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.complete(upload_id=up.id, part_ids=[a.id, b.id], md5="0" * 32)
    assert exc.value.code == "md5_mismatch"
    done = client.uploads.complete(
        upload_id=up.id, part_ids=[a.id, b.id], md5=hashlib.md5(b"{}\n{}\n").hexdigest()
    )
    assert done.status == "completed" and done.file is not None and done.file.bytes == 6
    assert [f.id for f in client.files.list()] == [done.file.id]  # the failed attempts left no file


def test_cancel_deletes_parts_and_closes_the_upload(api: TestClient, make_key, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    up = client.uploads.create(
        bytes=4, filename="x.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    part = client.uploads.parts.create(upload_id=up.id, data=b"{}\n")
    assert len(_parts_on_disk(settings, up.id)) == 1
    cancelled = client.uploads.cancel(upload_id=up.id)
    assert cancelled.status == "cancelled" and cancelled.file is None
    assert _parts_on_disk(settings, up.id) == []
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.complete(upload_id=up.id, part_ids=[part.id])
    assert exc.value.code == "upload_cancelled"
    with pytest.raises(openai.BadRequestError):
        client.uploads.cancel(upload_id=up.id)


def test_expired_upload_is_closed_on_access_and_swept(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    client = sdk(api, make_key("acme"))
    touched = client.uploads.create(bytes=10, filename="a.jsonl", mime_type="x", purpose="fine-tune")
    abandoned = client.uploads.create(bytes=10, filename="b.jsonl", mime_type="x", purpose="fine-tune")
    for up in (touched, abandoned):
        client.uploads.parts.create(upload_id=up.id, data=b"{}\n")
    with session_scope(sessions) as session:  # an hour passes
        session.execute(update(Upload).values(expires_at=Upload.created_at - 1))
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.parts.create(upload_id=touched.id, data=b"{}\n")
    assert exc.value.code == "upload_expired"
    assert _parts_on_disk(settings, touched.id) == []
    # Nobody comes back for the other one: the sweep expires it and deletes its parts.
    with session_scope(sessions) as session:
        assert uploads.sweep(session, BlobStore(str(settings.blobs_dir))) == 1
    with session_scope(sessions) as session:
        assert {u.status for u in session.execute(select(Upload)).scalars()} == {"expired"}
        assert list(session.execute(select(UploadPart)).scalars()) == []
    assert _parts_on_disk(settings, abandoned.id) == []


def test_limits_and_tenancy(api: TestClient, make_key, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.create(bytes=10, filename="x.csv", mime_type="text/csv", purpose="fine-tune")
    assert exc.value.code == "invalid_file_format"
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.create(bytes=10, filename="x.jsonl", mime_type="x", purpose="nonsense")  # type: ignore[arg-type]
    assert exc.value.param == "purpose"
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.create(bytes=0, filename="x.jsonl", mime_type="x", purpose="fine-tune")
    assert exc.value.param == "bytes"
    up = client.uploads.create(bytes=100, filename="x.jsonl", mime_type="x", purpose="fine-tune")
    monkeypatch.setattr(uploads, "PART_MAX_BYTES", 50)
    with pytest.raises(openai.APIStatusError) as exc:
        client.uploads.parts.create(upload_id=up.id, data=b"x" * 51)
    assert exc.value.status_code == 413
    other = sdk(api, make_key("globex"))
    with pytest.raises(openai.NotFoundError):
        other.uploads.parts.create(upload_id=up.id, data=b"x")
    with pytest.raises(openai.NotFoundError):
        other.uploads.cancel(upload_id=up.id)


def test_oversized_part_is_refused_before_its_body_is_read(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    key = make_key("acme")
    up = sdk(api, key).uploads.create(bytes=100, filename="x.jsonl", mime_type="x", purpose="fine-tune")
    resp = api.post(
        f"/v1/uploads/{up.id}/parts",
        headers={"authorization": f"Bearer {key}", "content-length": str(uploads.PART_MAX_BYTES + 10**6)},
        content=b"",
    )
    assert resp.status_code == 413 and resp.json()["error"]["param"] == "data"
