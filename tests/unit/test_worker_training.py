"""The worker's side of the trainer contract: it builds the TrainSpec itself (a job that makes no
valid spec fails in the worker, with the reason), reads the trainer's lines as typed events,
skips a line that is not one, and needs only ``loraforge.contracts``, never the trainer package."""

from __future__ import annotations

import io
import logging
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.contracts.train_spec import load_spec
from loraforge.contracts.trainer_events import ErrorEvent, MetricsEvent
from loraforge.db.models import Job, JobEvent
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.settings import Settings
from loraforge.worker import artefacts
from loraforge.worker.job_spec import build_spec, write_spec
from loraforge.worker.trainer_process import TrainerProcess
from loraforge.worker.training import run_training
from tests.helpers import chat_examples, to_jsonl
from tests.unit.test_import_boundaries import modules_after_import

TINY = "loraforge/tiny-llama"
HYPERPARAMETERS = (
    '{"type": "hyperparameters", "n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 1.0, '
    '"learning_rate": 0.005, "total_steps": 15, "n_examples": 10, "train_tokens_per_epoch": 100}'
)
METRICS = (
    '{"type": "metrics", "step": 1, "total_steps": 15, "epoch": 1, "train_loss": 2.5, '
    '"train_mean_token_accuracy": 0.25, "rewards/chosen": 0.5}'
)
ERROR = (
    '{"type": "error", "code": "invalid_training_file", "message": "Line 3: bad", "param": "training_file"}'
)
# What a trainer of another version, or a torn write, could print: none of it is an event.
NOT_EVENTS = ["{not json", '{"type": "telemetry", "gpu_util": 0.9}', '{"type": "metrics", "step": "x"}']


@pytest.fixture
def sessions(settings: Settings, api: TestClient):  # type: ignore[no-untyped-def]
    engine = make_engine(settings)  # the api fixture has migrated the database
    yield make_sessionmaker(engine)
    engine.dispose()


def queued_job(
    api: TestClient, key: str, sessions: sessionmaker[Session], **hyperparameters: object
) -> tuple[OpenAI, str]:
    """A job created through the API, then queued with ``hyperparameters`` merged into its row."""
    client = OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)
    f = client.files.create(file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune")
    job_id = client.fine_tuning.jobs.create(model=TINY, training_file=f.id).id
    with session_scope(sessions) as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        merged = {**job.hyperparameters, **hyperparameters}
        session.execute(update(Job).where(Job.id == job_id).values(status="queued", hyperparameters=merged))
    return client, job_id


def fake_trainer(tmp_path: Path, lines: list[str], exit_code: int) -> Path:
    """An interpreter stand-in: ``fake -m loraforge.trainer SPEC`` prints ``lines`` and exits."""
    script = tmp_path / "fake-trainer"
    body = "".join(f"cat <<'EOF'\n{line}\nEOF\n" for line in lines)
    script.write_text(f"#!/bin/sh\n{body}exit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def events(sessions: sessionmaker[Session], job_id: str) -> list[JobEvent]:
    with session_scope(sessions) as session:
        rows = session.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq))
        return list(rows.scalars())


def test_the_trainer_process_yields_typed_events_and_skips_other_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = fake_trainer(tmp_path, ["a log line that slipped through", *NOT_EVENTS, METRICS, ERROR], 2)
    with caplog.at_level(logging.WARNING, logger="loraforge.worker.trainer_process"):
        trainer = TrainerProcess([str(script)], tmp_path / "trainer.log", tmp_path / "pause")
        got = []
        while not trainer.finished():
            event = trainer.next_event(timeout=0.05)
            if event is not None:
                got.append(event)
        trainer.close()
    assert [type(event) for event in got] == [MetricsEvent, ErrorEvent]
    assert isinstance(got[0], MetricsEvent) and got[0].metrics.model_extra == {"rewards/chosen": 0.5}
    assert trainer.proc.returncode == 2
    skipped = [r.getMessage() for r in caplog.records if "not a known event" in r.getMessage()]
    assert len(skipped) == len(NOT_EVENTS)  # the plain text line is not even a candidate


def test_the_worker_applies_events_survives_bad_lines_and_fails_with_the_trainer_s_error(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    script = fake_trainer(tmp_path, [*NOT_EVENTS, HYPERPARAMETERS, METRICS, ERROR], 2)
    client, job_id = queued_job(api, make_key("events-org"), sessions)
    run_training(settings.model_copy(update={"trainer_python": str(script)}), sessions, job_id)

    job = client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "failed" and job.error is not None
    assert (job.error.code, job.error.message, job.error.param) == (
        "invalid_training_file",
        "Line 3: bad",
        "training_file",
    )
    hp = job.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (3, 2, 1.0)
    rows = events(sessions, job_id)
    assert any(row.message.startswith("Hyperparameters: n_epochs=3, batch_size=2") for row in rows)
    metrics = [row for row in rows if row.type == "metrics"]
    assert [row.message for row in metrics] == ["Step 1/15: training loss=2.5000"]
    assert metrics[0].data == {
        "step": 1,
        "total_steps": 15,
        "train_loss": 2.5,
        "train_mean_token_accuracy": 0.25,
        "rewards/chosen": 0.5,
    }


def test_a_job_that_makes_no_valid_spec_fails_in_the_worker_before_a_trainer_starts(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    # Stored settings the API would refuse today (an older row, a hand edit): no valid TrainSpec.
    _, job_id = queued_job(api, make_key("bad-spec-org"), sessions, lora_r=0, n_epochs=99)
    script = fake_trainer(tmp_path, [], 0)
    run_training(settings.model_copy(update={"trainer_python": str(script)}), sessions, job_id)

    # Read from the row: the API need not render settings it would never have accepted.
    with session_scope(sessions) as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        status, error = job.status, dict(job.error or {})
    assert status == "failed"
    assert error["code"] == "training_error" and error.get("param") is None
    message = str(error["message"])
    assert message.startswith("Could not start training: the job's settings make no valid training spec")
    assert "lora_r: Input should be greater than or equal to 1" in message
    assert "n_epochs must be between 1 and 50" in message
    assert "\n" not in message
    run_dir = artefacts.run_dir(settings, job_id)
    assert not (run_dir / "spec.json").exists() and not (run_dir / "trainer.log").exists()


def test_the_spec_file_is_the_spec_the_worker_built(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    _, job_id = queued_job(api, make_key("spec-org"), sessions, lora_r=8)
    with session_scope(sessions) as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        built = build_spec(settings, session, job, tmp_path / "run")
        path = write_spec(settings, session, job, tmp_path / "run")
    assert path.read_text() == built.model_dump_json(indent=2)
    assert load_spec(path) == built and built.lora_r == 8 and built.job_id == job_id


def test_the_worker_and_the_api_import_the_contracts_never_the_trainer() -> None:
    loaded = modules_after_import(
        "loraforge.queue.tasks",
        "loraforge.worker.training",
        "loraforge.api.app",
        "loraforge.preflight.estimate",
        "loraforge.planner",
    )
    assert "loraforge.contracts.trainer_events" in loaded and "loraforge.contracts.train_spec" in loaded
    assert not {m for m in loaded if m == "loraforge.trainer" or m.startswith("loraforge.trainer.")}
