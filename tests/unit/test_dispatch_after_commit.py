"""The domain services send work only once it is committed: the worker that picks a task up must
find its row (routes parse, call the service, return; they neither commit nor dispatch)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.api.app import create_app
from loraforge.db.models import Batch, FileRecord, Job
from loraforge.db.session import make_engine, make_sessionmaker, migrate, session_scope
from loraforge.settings import Settings
from tests.helpers import chat_examples, to_jsonl

TINY = "loraforge/tiny-llama"


class WorkerView:
    """A dispatcher that looks at each row from another connection, as a worker would."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.seen: list[tuple[str, str, str | None]] = []

    def _status(self, model: type[Job] | type[FileRecord], row_id: str) -> str | None:
        with session_scope(self.sessions) as session:
            return session.execute(select(model.status).where(model.id == row_id)).scalar_one_or_none()

    def validate_job(self, job_id: str) -> None:
        self.seen.append(("validate_job", job_id, self._status(Job, job_id)))

    def train_job(self, job_id: str, pool: str) -> None:
        self.seen.append(("train_job", job_id, self._status(Job, job_id)))

    def validate_file(self, file_id: str) -> None:
        self.seen.append(("validate_file", file_id, self._status(FileRecord, file_id)))

    def run_batch(self, batch_id: str, token: int) -> None:
        with session_scope(self.sessions) as session:
            status = session.execute(select(Batch.status).where(Batch.id == batch_id)).scalar_one_or_none()
        self.seen.append(("run_batch", batch_id, status))


@pytest.fixture
def world(settings: Settings) -> Iterator[tuple[TestClient, WorkerView, sessionmaker[Session]]]:
    migrate(settings)
    engine = make_engine(settings)
    sessions = make_sessionmaker(engine)
    view = WorkerView(sessions)
    with TestClient(create_app(settings, dispatcher=view)) as api:
        yield api, view, sessions
    engine.dispose()


def test_each_task_is_sent_after_its_row_is_committed(  # type: ignore[no-untyped-def]
    world: tuple[TestClient, WorkerView, sessionmaker[Session]], make_key
) -> None:
    api, view, sessions = world
    client = OpenAI(base_url="http://testserver/v1", api_key=make_key("acme"), http_client=api, max_retries=0)
    data = to_jsonl(chat_examples(10))

    uploaded = client.files.create(file=("t.jsonl", io.BytesIO(data)), purpose="fine-tune")
    upload = client.uploads.create(
        bytes=len(data), filename="u.jsonl", mime_type="text/jsonl", purpose="fine-tune"
    )
    part = client.uploads.parts.create(upload.id, data=data)
    assembled = client.uploads.complete(upload.id, part_ids=[part.id])
    assert assembled.file is not None
    job = client.fine_tuning.jobs.create(model=TINY, training_file=uploaded.id)
    with session_scope(sessions) as session:
        session.execute(update(Job).where(Job.id == job.id).values(status="paused"))
    client.fine_tuning.jobs.resume(job.id)
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": TINY, "messages": [{"role": "user", "content": "hi"}]},
    }
    requests = client.files.create(file=("b.jsonl", io.BytesIO(to_jsonl([line]))), purpose="batch")
    batch = client.batches.create(
        input_file_id=requests.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    assert view.seen == [
        ("validate_file", uploaded.id, "uploaded"),
        ("validate_file", assembled.file.id, "uploaded"),
        ("validate_job", job.id, "validating_files"),
        ("train_job", job.id, "queued"),
        ("run_batch", batch.id, "validating"),
    ]
