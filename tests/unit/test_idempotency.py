"""Idempotency-Key on the create endpoints, in process, through the unmodified openai SDK."""

from __future__ import annotations

import io

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import func, select, update

from loraforge.db.models import FileRecord, IdempotencyKey, Job
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.ids import now
from loraforge.settings import Settings
from tests.conftest import RecordingDispatcher
from tests.helpers import chat_examples, to_jsonl

TINY = "loraforge/tiny-llama"


def sdk(api: TestClient, key: str) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)


def key_header(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


def count(settings: Settings, model: type) -> int:
    engine = make_engine(settings)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            return int(session.execute(select(func.count()).select_from(model)).scalar_one())
    finally:
        engine.dispose()


def upload(client: OpenAI, key: str | None = None, n: int = 12) -> str:
    return client.files.create(
        file=("train.jsonl", io.BytesIO(to_jsonl(chat_examples(n)))),
        purpose="fine-tune",
        extra_headers=key_header(key) if key else None,
    ).id


def test_file_create_replays_the_same_file(api: TestClient, make_key, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    first = client.files.create(
        file=("train.jsonl", io.BytesIO(to_jsonl(chat_examples(12)))),
        purpose="fine-tune",
        extra_headers=key_header("k1"),
    )
    # A retry is a new multipart body (new boundary) with the same meaning.
    raw = client.files.with_raw_response.create(
        file=("train.jsonl", io.BytesIO(to_jsonl(chat_examples(12)))),
        purpose="fine-tune",
        extra_headers=key_header("k1"),
    )
    again = raw.parse()
    assert raw.headers["idempotent-replayed"] == "true"
    assert again.id == first.id and again.model_dump() == first.model_dump()
    assert [f.id for f in client.files.list()] == [first.id]
    assert count(settings, FileRecord) == 1
    # Without a key every create is new.
    assert upload(client) != first.id and count(settings, FileRecord) == 2


def test_job_create_replays_the_same_job_and_queues_once(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, dispatcher: RecordingDispatcher, settings: Settings
) -> None:
    client = sdk(api, make_key("acme"))
    file_id = upload(client)
    jobs = [
        client.fine_tuning.jobs.create(
            model=TINY,
            training_file=file_id,
            hyperparameters={"n_epochs": 3},
            suffix="x",
            extra_headers=key_header("job-1"),
        )
        for _ in range(3)
    ]
    assert len({j.id for j in jobs}) == 1
    assert dispatcher.validated == [jobs[0].id]
    assert [j.id for j in client.fine_tuning.jobs.list()] == [jobs[0].id]
    assert count(settings, Job) == 1


def test_same_key_with_another_body_is_a_400(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    file_id = upload(client)
    client.fine_tuning.jobs.create(model=TINY, training_file=file_id, extra_headers=key_header("k"))
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.create(
            model=TINY, training_file=file_id, suffix="other", extra_headers=key_header("k")
        )
    assert exc.value.code == "idempotency_key_reused"
    assert "same parameters" in exc.value.message
    # Another file under a used key is refused too (multipart compared field by field).
    upload(client, "fk")
    with pytest.raises(openai.BadRequestError) as exc:
        upload(client, "fk", n=13)
    assert exc.value.code == "idempotency_key_reused"


def test_json_key_order_and_spacing_do_not_matter(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    key = make_key("acme")
    file_id = upload(sdk(api, key))
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json", **key_header("k")}
    first = api.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        content=f'{{"model": "{TINY}", "training_file": "{file_id}"}}',
    )
    second = api.post(
        "/v1/fine_tuning/jobs", headers=headers, content=f'{{"training_file":"{file_id}","model":"{TINY}"}}'
    )
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert second.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers


def test_keys_are_scoped_by_org_and_path(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    acme, umbrella = sdk(api, make_key("acme")), sdk(api, make_key("umbrella"))
    assert upload(acme, "shared") != upload(umbrella, "shared")
    # The same key on another endpoint is another request.
    job = acme.fine_tuning.jobs.create(
        model=TINY, training_file=upload(acme), extra_headers=key_header("shared")
    )
    assert job.id.startswith("ftjob-")


def test_an_error_frees_the_key(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(
            model=TINY, training_file="file-missing", extra_headers=key_header("k")
        )
    # Nothing was created, so the key is free for the corrected request.
    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=upload(client), extra_headers=key_header("k")
    )
    assert job.status == "validating_files"


def test_failure_after_commit_is_replayed_not_rerun(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, dispatcher: RecordingDispatcher, settings: Settings, monkeypatch
) -> None:
    """The job was saved but could not be queued: running the request again would duplicate it."""
    client = sdk(api, make_key("acme"))
    file_id = upload(client)

    def broker_down(job_id: str) -> None:
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(dispatcher, "validate_job", broker_down)
    api_raising = TestClient(api.app, raise_server_exceptions=False)
    client = sdk(api_raising, client.api_key)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.fine_tuning.jobs.create(model=TINY, training_file=file_id, extra_headers=key_header("k"))
    assert count(settings, Job) == 1


def test_a_crash_before_commit_frees_the_key(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, monkeypatch
) -> None:
    from loraforge.files import service as files

    client = sdk(TestClient(api.app, raise_server_exceptions=False), make_key("acme"))
    real = files.create_file
    monkeypatch.setattr(files, "create_file", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("disk")))
    with pytest.raises(openai.InternalServerError):
        upload(client, "k")
    assert count(settings, IdempotencyKey) == 0
    monkeypatch.setattr(files, "create_file", real)
    assert upload(client, "k").startswith("file-")


def test_in_flight_key_is_a_409_until_it_goes_stale(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings
) -> None:
    client = sdk(api, make_key("acme"))
    file_id = upload(client, "k")
    engine = make_engine(settings)
    sessions = make_sessionmaker(engine)
    # Pretend the first request is still running: its row has no response yet.
    with session_scope(sessions) as session:
        session.execute(update(IdempotencyKey).values(response_status=None, response_body=None))
    with pytest.raises(openai.ConflictError) as exc:
        upload(client, "k")
    assert exc.value.code == "idempotency_key_in_use"
    # A claim older than idempotency_lock_seconds belongs to a request that died: taken over.
    with session_scope(sessions) as session:
        session.execute(
            update(IdempotencyKey).values(created_at=now() - settings.idempotency_lock_seconds - 1)
        )
    assert upload(client, "k") != file_id
    engine.dispose()


def test_keys_expire_after_the_ttl(api: TestClient, make_key, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    first = upload(client, "k")
    engine = make_engine(settings)
    with session_scope(make_sessionmaker(engine)) as session:
        session.execute(
            update(IdempotencyKey).values(created_at=now() - settings.idempotency_ttl_seconds - 1)
        )
    engine.dispose()
    assert upload(client, "k") != first
    assert count(settings, IdempotencyKey) == 1  # the expired row was purged


def test_bad_keys_and_routes_without_the_dependency(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    with pytest.raises(openai.BadRequestError) as exc:
        upload(client, "x" * 256)
    assert exc.value.code == "invalid_idempotency_key"
    # A POST that is not a create ignores the header: the second cancel runs again.
    job = client.fine_tuning.jobs.create(model=TINY, training_file=upload(client))
    headers = {"authorization": f"Bearer {client.api_key}", **key_header("c")}
    statuses = [api.post(f"/v1/fine_tuning/jobs/{job.id}/cancel", headers=headers) for _ in range(2)]
    assert [r.status_code for r in statuses] == [200, 400]
    assert statuses[1].json()["error"]["code"] == "job_not_cancellable"


def test_webhook_endpoint_create_replays_with_the_same_secret(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    made = [
        client.webhooks.create(
            event_types=["fine_tuning.job.succeeded"],
            name="ci",
            url="https://example.com/hook",
            extra_headers=key_header("wh"),
        )
        for _ in range(2)
    ]
    assert made[0].id == made[1].id and made[0].signing_secret == made[1].signing_secret
    assert [e.id for e in client.webhooks.list()] == [made[0].id]


def test_upload_create_replays_the_same_upload(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    made = [
        client.uploads.create(
            bytes=100,
            filename="train.jsonl",
            mime_type="text/jsonl",
            purpose="fine-tune",
            extra_headers=key_header("up"),
        )
        for _ in range(2)
    ]
    assert made[0].id == made[1].id and made[0].status == "pending"
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.create(
            bytes=101,
            filename="train.jsonl",
            mime_type="text/jsonl",
            purpose="fine-tune",
            extra_headers=key_header("up"),
        )
    assert exc.value.code == "idempotency_key_reused"
