"""The trainer's ``data_progress`` lines as the worker applies them: job events every 10% with the
estimate, ``estimated_finish`` from it, a "ready" event; and the job's tokenized data removed when
the job fails (``worker/training.py``) or succeeds (``strip_training_state``)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loraforge.contracts.trainer_events import DataProgressEvent, parse_event
from loraforge.db.models import JobEvent
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.ids import now
from loraforge.settings import Settings
from loraforge.worker import artefacts, training
from loraforge.worker.progress import RunProgress
from tests.unit.test_job_failures import WID, job_row, new_job, set_job


@pytest.fixture
def sessions(settings: Settings, api: TestClient) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)
    yield make_sessionmaker(engine)
    engine.dispose()


def _messages(sessions: sessionmaker[Session], job_id: str) -> list[str]:
    with session_scope(sessions) as session:
        rows = session.execute(
            select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
        )
        return [message for (message,) in rows]


def test_preparing_data_is_shown_with_its_estimate(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    job_id = new_job(api, make_key("acme"))
    set_job(sessions, job_id, status="running", worker_id=WID, heartbeat_at=now())
    run = RunProgress(settings, sessions, job_id)
    for fraction in (0.05, 0.08, 0.2, 0.25, 0.6):  # 0.08 and 0.25: under 10% since the last event
        line = DataProgressEvent(fraction=fraction, elapsed_s=10 * fraction, eta_s=100.0 * (1 - fraction))
        run.handle(parse_event(line.to_line()))  # through the wire format, as the worker reads it
    job = job_row(sessions, job_id)
    assert job.estimated_finish is not None and abs(job.estimated_finish - (now() + 40)) <= 2
    run.handle(DataProgressEvent(fraction=1.0, elapsed_s=7.5, eta_s=0, n_examples=57406))
    preparing = [m for m in _messages(sessions, job_id) if "data" in m]
    assert preparing == [
        "Preparing data: 5% done, est. 95 s to first step",
        "Preparing data: 20% done, est. 80 s to first step",
        "Preparing data: 60% done, est. 40 s to first step",
        "Training data ready: 57406 examples, prepared in 8 s",
    ]
    run.handle(DataProgressEvent(fraction=1.0, elapsed_s=0.1, eta_s=0, n_examples=57406, cached=True))
    assert (
        _messages(sessions, job_id)[-1] == "Training data ready: 57406 examples, reused from an earlier run"
    )


def test_the_data_cache_goes_when_the_job_ends(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    failed, done = new_job(api, make_key("acme")), new_job(api, make_key("acme"))
    for job_id in (failed, done):
        folder = artefacts.data_dir(settings, job_id) / "abc"
        folder.mkdir(parents=True)
        (folder / "prepared.json").write_text(json.dumps({"rows": 1, "parts": []}))
    set_job(sessions, failed, status="running", worker_id=WID, heartbeat_at=now())
    training._finish(settings, sessions, failed, WID, RunProgress(settings, sessions, failed), 1)
    assert job_row(sessions, failed).status == "failed"
    assert not artefacts.data_dir(settings, failed).exists()
    artefacts.strip_training_state(settings, done)  # what a succeeded job's end does
    assert not artefacts.data_dir(settings, done).exists()
