"""Job lifecycle pieces in process (no worker): the lease-checked state machine, the reaper,
pause/resume through the API, checkpoint rows served as models, the results CSV."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select, update

from loraforge.adapters import registry
from loraforge.db.models import FileRecord, Job, JobCheckpoint, JobEvent, Organization
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.errors import ModelNotFoundError
from loraforge.ids import now
from loraforge.jobs import checkpoints
from loraforge.jobs.state import JobStatus, add_event, transition
from loraforge.settings import Settings
from loraforge.storage.blobs import BlobStore
from loraforge.worker import reaper, results
from tests.conftest import RecordingDispatcher
from tests.helpers import chat_examples, to_jsonl

TINY = "loraforge/tiny-llama"


def sdk(api: TestClient, key: str) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)


@pytest.fixture
def sessions(settings: Settings, api: TestClient):  # type: ignore[no-untyped-def]
    engine = make_engine(settings)  # the api fixture has migrated the database
    yield make_sessionmaker(engine)
    engine.dispose()


def new_job(api: TestClient, key: str) -> str:
    """A job created through the API (``validating_files``); tests then set the state they need."""
    client = sdk(api, key)
    f = client.files.create(file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune")
    return client.fine_tuning.jobs.create(model=TINY, training_file=f.id, suffix="s", seed=5).id


def set_job(sessions, job_id: str, **values: object) -> None:  # type: ignore[no-untyped-def]
    with session_scope(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def get_job(sessions, job_id: str) -> Job:  # type: ignore[no-untyped-def]
    with session_scope(sessions) as session:
        return session.execute(select(Job).where(Job.id == job_id)).scalar_one()


def messages(sessions, job_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    with session_scope(sessions) as session:
        return list(
            session.execute(
                select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
            ).scalars()
        )


def test_only_the_lease_holder_moves_a_running_job(api: TestClient, make_key, sessions) -> None:  # type: ignore[no-untyped-def]
    job_id = new_job(api, make_key("acme"))
    set_job(sessions, job_id, status="running", worker_id="host:1", heartbeat_at=now())
    with session_scope(sessions) as session:
        assert not transition(session, job_id, JobStatus.SUCCEEDED, "x", expect={"worker_id": "host:2"})
        assert transition(session, job_id, JobStatus.SUCCEEDED, "done", expect={"worker_id": "host:1"})
    job = get_job(sessions, job_id)
    assert job.status == "succeeded" and job.worker_id is None  # leaving running releases the lease


def test_reaper_requeues_a_stale_running_job_once(
    api: TestClient, make_key, settings: Settings, sessions
) -> None:  # type: ignore[no-untyped-def]
    key = make_key("acme")
    stale, fresh, pausing = new_job(api, key), new_job(api, key), new_job(api, key)
    old = now() - int(settings.lease_timeout_seconds) - 5
    set_job(sessions, stale, status="running", worker_id="gone:1", heartbeat_at=old)
    set_job(sessions, fresh, status="running", worker_id="alive:1", heartbeat_at=now())
    set_job(sessions, pausing, status="running", worker_id="gone:1", heartbeat_at=old, pause_requested=True)
    sent: list[str] = []
    report = reaper.Reaper(settings, sessions, train=sent.append, validate=lambda _: None).run_once()
    assert report.requeued == [stale] and report.paused == [pausing] and sent == [stale]
    job = get_job(sessions, stale)
    assert job.status == "queued" and job.worker_id is None and job.queued_at is not None
    assert "stopped responding; re-queued" in messages(sessions, stale)[-1]
    assert get_job(sessions, pausing).status == "paused" and not get_job(sessions, pausing).pause_requested
    assert get_job(sessions, fresh).status == "running"
    # A second reaper (another worker) finds nothing left to do; the queued job is not re-sent
    # until requeue_after_seconds pass, except at start-up, when every queued job's task is re-sent.
    again = reaper.Reaper(settings, sessions, train=sent.append, validate=lambda _: None)
    assert again.run_once().requeued == [] and sent == [stale]
    assert again.run_once(startup=True).redispatched == [stale] and sent == [stale, stale]


def test_reaper_revalidates_and_sweeps_cancelled_checkpoints(
    api: TestClient, make_key, settings: Settings, sessions
) -> None:  # type: ignore[no-untyped-def]
    key = make_key("acme")
    validating, cancelled = new_job(api, key), new_job(api, key)
    folder = settings.runs_dir / cancelled / "checkpoints" / "step-0000005"
    folder.mkdir(parents=True)
    set_job(sessions, cancelled, status="cancelled")
    checked: list[str] = []
    report = reaper.Reaper(settings, sessions, train=lambda _: None, validate=checked.append).reconcile()
    assert validating in checked and cancelled not in checked
    assert report.swept == [cancelled] and not folder.parent.exists()


def test_pause_and_resume_through_the_sdk(
    api: TestClient, make_key, sessions, dispatcher: RecordingDispatcher
) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    queued, running = new_job(api, make_key("acme")), new_job(api, make_key("acme"))
    set_job(sessions, queued, status="queued")
    set_job(sessions, running, status="running", worker_id="w:1", heartbeat_at=now())

    assert client.fine_tuning.jobs.pause(queued).status == "paused"
    assert client.fine_tuning.jobs.pause(queued).status == "paused"  # idempotent
    resumed = client.fine_tuning.jobs.resume(queued)
    assert resumed.status == "queued" and dispatcher.trained == [queued]

    pausing = client.fine_tuning.jobs.pause(running)
    assert pausing.status == "running" and get_job(sessions, running).pause_requested
    assert messages(sessions, running)[-1].startswith("Pausing")
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.resume(running)
    assert "still pausing" in exc.value.message

    set_job(sessions, running, status="succeeded")
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.pause(running)
    assert exc.value.code == "job_not_pausable"
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.resume(running)
    assert exc.value.code == "job_not_resumable"
    with pytest.raises(openai.NotFoundError):
        sdk(api, make_key("other")).fine_tuning.jobs.pause(queued)


def add_checkpoint(sessions, job_id: str, step: int, path: str) -> JobCheckpoint:  # type: ignore[no-untyped-def]
    with session_scope(sessions) as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        return checkpoints.record(
            session, job, step, path, {"step": step, "train_loss": 1.0 / step, "epoch": 1}
        )


def test_checkpoints_list_models_and_cancel(api: TestClient, make_key, sessions, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = make_key("acme")
    client = sdk(api, key)
    job_id = new_job(api, key)
    name = f"ft:{TINY}:acme:s:abcdefgh"
    set_job(sessions, job_id, status="running", worker_id="w:1", reserved_model=name)
    for step in (5, 10, 15):
        (tmp_path / str(step)).mkdir()
        add_checkpoint(sessions, job_id, step, str(tmp_path / str(step)))
    again = add_checkpoint(sessions, job_id, 15, str(tmp_path / "15"))  # a re-run step refreshes its row
    page = client.fine_tuning.jobs.checkpoints.list(job_id, limit=2)
    assert [c.step_number for c in page.data] == [15, 10] and page.has_more
    assert page.data[0].id == again.id and page.data[0].metrics.train_loss == pytest.approx(1 / 15)
    assert page.data[0].fine_tuned_model_checkpoint == f"{name}:ckpt-step-15"
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job_id, limit=2)] == [15, 10, 5]
    ids = [m.id for m in client.models.list()]
    assert f"{name}:ckpt-step-5" in ids
    assert client.models.retrieve(f"{name}:ckpt-step-10").root == TINY

    with session_scope(sessions) as session:
        org = session.execute(select(Organization).where(Organization.name == "acme")).scalar_one()
        served = registry.resolve(session, org, f"{name}:ckpt-step-10")
        assert (served.base_model, served.adapter_path, served.checkpoint_step) == (
            TINY,
            str(tmp_path / "10"),
            10,
        )
        (tmp_path / "5").rmdir()  # the trainer pruned it
        assert [c.step_number for c in checkpoints.forget_missing(session, job_id)] == [5]
        with pytest.raises(ModelNotFoundError):
            registry.resolve(session, org, f"{name}:ckpt-step-5")

    client.fine_tuning.jobs.cancel(job_id)
    assert client.fine_tuning.jobs.checkpoints.list(job_id).data == []
    assert not [m for m in client.models.list() if m.id.startswith(name)]


def test_continued_job_records_its_parent(api: TestClient, make_key, sessions, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = make_key("acme")
    client = sdk(api, key)
    parent_job = new_job(api, key)
    name = f"ft:{TINY}:acme:s:abcdefgh"
    set_job(sessions, parent_job, status="running", worker_id="w:1", reserved_model=name)
    (tmp_path / "5").mkdir()
    add_checkpoint(sessions, parent_job, 5, str(tmp_path / "5"))
    f = client.files.create(file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune")
    child = client.fine_tuning.jobs.create(model=f"{name}:ckpt-step-5", training_file=f.id)
    assert child.model == f"{name}:ckpt-step-5"
    stored = get_job(sessions, child.id)
    assert stored.model == TINY and stored.parent_model == f"{name}:ckpt-step-5"
    with pytest.raises(openai.NotFoundError) as exc:
        client.fine_tuning.jobs.create(model=f"{name}:ckpt-step-99", training_file=f.id)
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):  # another org cannot start from it
        other = sdk(api, make_key("other"))
        g = other.files.create(file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune")
        other.fine_tuning.jobs.create(model=f"{name}:ckpt-step-5", training_file=g.id)


def test_results_csv_takes_the_newest_value_of_each_step(
    api: TestClient, make_key, settings: Settings, sessions
) -> None:  # type: ignore[no-untyped-def]
    job_id = new_job(api, make_key("acme"))
    with session_scope(sessions) as session:
        for data in (
            {"step": 1, "total_steps": 2, "train_loss": 3.0, "train_mean_token_accuracy": 0.5},
            {"step": 2, "total_steps": 2, "train_loss": 9.9, "train_mean_token_accuracy": 0.1},  # superseded
            {
                "step": 2,
                "total_steps": 2,
                "train_loss": 2.0,
                "train_mean_token_accuracy": 0.75,
                "valid_loss": 2.5,
                "valid_mean_token_accuracy": 0.6,
                "full_valid_loss": 2.4,
                "full_valid_mean_token_accuracy": 0.7,
            },
        ):
            add_event(session, job_id, "m", type="metrics", data=data)
    with session_scope(sessions) as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        record = results.store_results(session, BlobStore(str(settings.blobs_dir)), job)
        assert record.purpose == "fine-tune-results"
        key = record.storage_key
    text = base64.b64decode(b"".join(BlobStore(str(settings.blobs_dir)).iter_bytes(key))).decode()
    assert text.splitlines() == [
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy,full_valid_loss,full_valid_mean_token_accuracy",
        "1,3,0.5,,,,",
        "2,2,0.75,2.5,0.6,2.4,0.7",
    ]
    with session_scope(sessions) as session:
        assert session.execute(select(FileRecord).where(FileRecord.id == record.id)).scalar_one().bytes > 0
