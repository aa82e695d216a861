"""One way a job fails (``jobs.state.fail``): the error, its event and the webhook outbox row commit
together, and every cause stores ``error`` as OpenAI's ``{code, message, param}``."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.contracts.job_error import JobError
from loraforge.contracts.trainer_events import parse_event
from loraforge.db.models import Job, JobEvent, WebhookDelivery
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.ids import now
from loraforge.jobs import file_checks, placement
from loraforge.jobs.state import JobStatus, fail
from loraforge.settings import Settings
from loraforge.worker import admission, training
from loraforge.worker.progress import RunProgress
from tests.helpers import chat_examples, to_jsonl

TINY = "loraforge/tiny-llama"
WID = "host:1"


def sdk(api: TestClient, key: str) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)


@pytest.fixture
def sessions(settings: Settings, api: TestClient) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)  # the api fixture has migrated the database
    yield make_sessionmaker(engine)
    engine.dispose()


def new_job(api: TestClient, key: str, n_examples: int = 10) -> str:
    """A job created through the API: ``validating_files``, its validation task recorded only."""
    client = sdk(api, key)
    data = io.BytesIO(to_jsonl(chat_examples(n_examples)))
    file_id = client.files.create(file=("t.jsonl", data), purpose="fine-tune").id
    return client.fine_tuning.jobs.create(model=TINY, training_file=file_id).id


def set_job(sessions: sessionmaker[Session], job_id: str, **values: object) -> None:
    with session_scope(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def job_row(sessions: sessionmaker[Session], job_id: str) -> Job:
    with session_scope(sessions) as session:
        return session.execute(select(Job).where(Job.id == job_id)).scalar_one()


def last_event(sessions: sessionmaker[Session], job_id: str) -> JobEvent:
    with session_scope(sessions) as session:
        return session.execute(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq.desc()).limit(1)
        ).scalar_one()


def assert_failed(sessions: sessionmaker[Session], job_id: str, code: str, param: str | None) -> dict:
    """The job failed the one way: all three error keys, and the error event that says so."""
    job = job_row(sessions, job_id)
    assert job.status == "failed" and job.worker_id is None and job.finished_at is not None
    assert job.error is not None and set(job.error) == {"code", "message", "param"}, job.error
    assert (job.error["code"], job.error["param"]) == (code, param), job.error
    event = last_event(sessions, job_id)
    assert (event.level, event.message) == ("error", f"The job failed: {job.error['message']}")
    return job.error


def test_fail_writes_error_event_and_webhook_in_one_transaction(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, sessions: sessionmaker[Session]
) -> None:
    key = make_key("acme")
    hook = (
        sdk(api, key)
        .webhooks.create(event_types=["fine_tuning.job.failed"], name="f", url="https://e.example")
        .id
    )
    job_id = new_job(api, key)
    error = JobError(code="training_error", message="boom")

    session = sessions()
    assert fail(session, job_id, error)
    session.rollback()  # nothing of a failure outlives its transaction
    session.close()
    assert job_row(sessions, job_id).status == "validating_files"
    assert last_event(sessions, job_id).level != "error"
    with session_scope(sessions) as session:
        assert session.execute(select(WebhookDelivery)).scalars().all() == []

    with session_scope(sessions) as session:
        assert fail(session, job_id, error, preflight={"valid": False})
    assert assert_failed(sessions, job_id, "training_error", None) == {
        "code": "training_error",
        "message": "boom",
        "param": None,
    }
    assert job_row(sessions, job_id).preflight == {"valid": False}  # other columns, same UPDATE
    with session_scope(sessions) as session:
        (delivery,) = session.execute(select(WebhookDelivery)).scalars().all()
        assert (delivery.endpoint_id, delivery.event_type) == (hook, "fine_tuning.job.failed")


def test_fail_is_refused_after_the_end_and_for_another_lease_holder(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, sessions: sessionmaker[Session]
) -> None:
    job_id = new_job(api, make_key("acme"))
    error = JobError(code="training_error", message="late", param=None)
    set_job(sessions, job_id, status="running", worker_id=WID, heartbeat_at=now())
    with session_scope(sessions) as session:
        assert not fail(session, job_id, error, expect={"worker_id": "host:2"})
    assert job_row(sessions, job_id).status == "running"
    for status in (JobStatus.SUCCEEDED, JobStatus.CANCELLED, JobStatus.FAILED):
        set_job(sessions, job_id, status=status.value, error=None)
        before = last_event(sessions, job_id).id
        with session_scope(sessions) as session:
            assert not fail(session, job_id, error)
        job = job_row(sessions, job_id)
        assert job.status == status.value and job.error is None and last_event(sessions, job_id).id == before


def test_a_model_gone_from_the_catalog_fails_validation(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    job_id = new_job(api, make_key("acme"))
    set_job(sessions, job_id, model="acme/retired-model")
    assert not file_checks.validate_job_files(settings, sessions, job_id)
    error = assert_failed(sessions, job_id, "model_not_found", "model")
    assert error["message"] == "Base model acme/retired-model is not in the catalog."


def test_a_bad_training_file_fails_validation_with_its_param(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    job_id = new_job(api, make_key("acme"), n_examples=7)
    assert not file_checks.validate_job_files(settings, sessions, job_id)
    error = assert_failed(sessions, job_id, "invalid_n_examples", "training_file")
    assert "7 example(s)" in error["message"]
    assert job_row(sessions, job_id).preflight is not None  # the report is kept with the failure


def test_a_replanned_job_whose_model_left_the_catalog_fails(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    job_id = new_job(api, make_key("acme"))
    set_job(sessions, job_id, status="queued", model="acme/retired-model", plan=None)
    assert placement.pool_of(settings, sessions, job_id) is None
    assert_failed(sessions, job_id, "model_not_found", "model")


def test_a_plan_this_worker_cannot_lease_fails_the_job(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session], monkeypatch
) -> None:
    job_id = new_job(api, make_key("acme"))
    set_job(sessions, job_id, status="queued", plan={"pool": "gpu", "device": "cuda", "num_gpus": 1})

    def refuse(home: object, candidates: object, count: int) -> None:
        raise ValueError(f"needs {count} GPUs")

    monkeypatch.setattr(admission, "try_acquire", refuse)
    assert admission.admit(settings, sessions, job_id) == admission.Admission()
    error = assert_failed(sessions, job_id, "training_error", None)
    assert error["message"] == "This worker cannot run the job's plan: needs 1 GPUs."


def test_a_deleted_parent_model_fails_the_start(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    job_id = new_job(api, make_key("acme"))
    set_job(sessions, job_id, status="queued", parent_model=f"ft:{TINY}:acme:gone:abcd1234")
    assert training._start(settings, sessions, job_id, training.worker_id()) is None
    assert_failed(sessions, job_id, "model_not_found", "model")


@pytest.mark.parametrize(
    ("line", "returncode", "expected"),
    [
        (
            {"type": "error", "code": "invalid_n_examples", "message": "too few", "param": "training_file"},
            2,
            {"code": "invalid_n_examples", "message": "too few", "param": "training_file"},
        ),
        (
            {"type": "error", "code": "training_error", "message": "CUDA out of memory"},
            1,
            {"code": "training_error", "message": "CUDA out of memory", "param": None},
        ),
        (
            None,
            -9,
            {
                "code": "training_error",
                "message": "The trainer exited with code -9 before finishing.",
                "param": None,
            },
        ),
    ],
    ids=["error-line", "error-line-without-param", "killed"],
)
def test_a_trainer_that_did_not_finish_fails_the_job(  # type: ignore[no-untyped-def]
    api: TestClient,
    make_key,
    settings: Settings,
    sessions: sessionmaker[Session],
    line: dict | None,
    returncode: int,
    expected: dict,
) -> None:
    job_id = new_job(api, make_key("acme"))
    set_job(sessions, job_id, status="running", worker_id=WID, heartbeat_at=now())
    (settings.adapters_dir / job_id).mkdir(parents=True)  # a partial adapter
    run = RunProgress(settings, sessions, job_id)
    run.error = parse_event(json.dumps(line)) if line is not None else None  # type: ignore[assignment]
    training._finish(settings, sessions, job_id, WID, run, returncode)
    assert assert_failed(sessions, job_id, expected["code"], expected["param"]) == expected
    assert not (settings.adapters_dir / job_id).exists()
