"""Jobs are planned at creation: the plan is stored, shown and handed to the trainer; a job no
worker pool can train is refused before anything is stored; training is queued per pool."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.api.app import create_app
from loraforge.contracts.train_spec import TrainPlan, load_spec
from loraforge.db.models import Job, JobEvent
from loraforge.db.session import make_engine, make_sessionmaker
from loraforge.jobs.placement import CODE, dispatch_pool
from loraforge.queue import tasks
from loraforge.queue.dispatch import CeleryDispatcher
from loraforge.queue.routing import train_queue, worker_queues
from loraforge.settings import Settings, TrainPool
from loraforge.worker.job_spec import write_spec
from tests.conftest import TEST_POOLS, RecordingDispatcher
from tests.helpers import chat_examples, to_jsonl

TINY = "loraforge/tiny-llama"
LLAMA8B = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"
LLAMA70B = "klusterai/Meta-Llama-3.3-70B-Instruct-Turbo"
SMALL_POOLS = [
    TrainPool(name="small", device="cuda", count=1, memory_gib=24),
    TrainPool(name="cpu", device="cpu", count=1, memory_gib=16),
]


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)
    yield make_sessionmaker(engine)
    engine.dispose()


def sdk(api: TestClient, key: str) -> tuple[OpenAI, str]:
    client = OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)
    file_id = client.files.create(
        file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune"
    ).id
    return client, file_id


def count(sessions: sessionmaker[Session], model: type[Any]) -> int:
    with sessions() as session:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


def test_a_job_no_worker_pool_fits_is_refused_and_nothing_is_stored(  # type: ignore[no-untyped-def]
    settings: Settings, make_key, sessions: sessionmaker[Session]
) -> None:
    """A deployment with one 24 GiB GPU and a CPU worker: 70B is refused with the memory it
    needs; 8B still fits there (as QLoRA)."""
    small = settings.model_copy(update={"train_pools": SMALL_POOLS})
    dispatcher = RecordingDispatcher()
    with TestClient(create_app(small, dispatcher=dispatcher)) as api:
        client, file_id = sdk(api, make_key("acme"))
        for extra in ({}, {"dry_run": True}):
            with pytest.raises(openai.BadRequestError) as exc:
                client.fine_tuning.jobs.create(model=LLAMA70B, training_file=file_id, extra_body=extra)
            assert exc.value.status_code == 400
            assert exc.value.code == CODE and exc.value.param == "model"
            assert "GiB on one GPU" in exc.value.message and "small (1× cuda 24 GiB)" in exc.value.message
        assert client.fine_tuning.jobs.list().data == []
        assert count(sessions, Job) == 0 and count(sessions, JobEvent) == 0
        assert dispatcher.validated == []

        job = client.fine_tuning.jobs.create(model=LLAMA8B, training_file=file_id).to_dict()
        assert job["plan"]["pool"] == "small" and job["plan"]["strategy"] == "qlora"
        assert job["plan"]["gradient_checkpointing"] is True
        # On 24 GiB NF4 8B recomputes most, not all, of its 32 layers (planner/plan.py).
        assert 0 < job["plan"]["checkpoint_layers"] < 32
        assert dispatcher.validated == [job["id"]]


def test_the_plan_is_stored_shown_and_reaches_the_trainer_spec(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session], tmp_path
) -> None:
    client, file_id = sdk(api, make_key("acme"))
    tiny = client.fine_tuning.jobs.create(model=TINY, training_file=file_id).to_dict()
    big = client.fine_tuning.jobs.create(model=LLAMA8B, training_file=file_id).to_dict()
    assert tiny["plan"]["pool"] == "cpu" and tiny["plan"]["token_budget"] is None
    assert big["plan"]["pool"] == "gpu" and big["plan"]["strategy"] == "lora"
    assert big["plan"]["gradient_checkpointing"] is False and big["plan"]["token_budget"] >= 8192
    parts = big["plan"]["breakdown_gib"]
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"), abs=0.05)
    assert parts["total"] <= 0.9 * 80 and parts["weights"] == pytest.approx(14.96, abs=0.01)

    events = [e.message for e in reversed(list(client.fine_tuning.jobs.list_events(big["id"])))]
    assert events[0] == f"Created fine-tuning job: {big['id']}"
    assert events[1].startswith("Planned: lora on 1× cuda 80 GiB (pool gpu), token budget ")
    assert "no activation checkpointing; est. peak" in events[1]
    tiny_events = [e.message for e in client.fine_tuning.jobs.list_events(tiny["id"])]
    assert any(
        m.startswith("Planned: lora on cpu 16 GiB (pool cpu), one micro-batch per step") for m in tiny_events
    )

    with sessions() as session:
        for job, device in ((tiny, "cpu"), (big, "cuda")):
            row = session.execute(select(Job).where(Job.id == job["id"])).scalar_one()
            spec = load_spec(write_spec(settings, session, row, tmp_path / job["id"]))
            stored = job["plan"]
            assert spec.device == device
            assert spec.plan == TrainPlan(
                strategy=stored["strategy"],
                num_gpus=stored["num_gpus"],
                token_budget=stored["token_budget"],
                gradient_checkpointing=stored["gradient_checkpointing"],
                checkpoint_layers=stored["checkpoint_layers"],
            )

    dry = client.fine_tuning.jobs.create(model=TINY, training_file=file_id, extra_body={"dry_run": True})
    assert dry.to_dict()["plan"]["summary"] == tiny["plan"]["summary"]


def test_training_is_queued_on_the_queue_of_the_planned_pool(  # type: ignore[no-untyped-def]
    api: TestClient,
    make_key,
    settings: Settings,
    sessions: sessionmaker[Session],
    dispatcher: RecordingDispatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, file_id = sdk(api, make_key("acme"))
    tiny = client.fine_tuning.jobs.create(model=TINY, training_file=file_id).id
    big = client.fine_tuning.jobs.create(model=LLAMA8B, training_file=file_id).id

    # Worker side: after validation (and from the reaper) the task goes to train.<pool>.
    sent: list[tuple[list[str], str]] = []
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    monkeypatch.setattr(tasks, "_sessions", lambda: sessions)
    monkeypatch.setattr(
        tasks.train_job_task, "apply_async", lambda args, queue, countdown: sent.append((args[:1], queue))
    )
    tasks.queue_training(tiny)
    tasks.queue_training(big)
    assert sent == [([tiny], "train.cpu"), ([big], "train.gpu")]

    # API side: a resumed job is queued for its pool too.
    with sessions() as session:
        session.execute(update(Job).where(Job.id == tiny).values(status="paused"))
        session.commit()
    assert client.fine_tuning.jobs.resume(tiny).status == "queued"
    assert dispatcher.trained == [tiny] and dispatcher.train_pools == ["cpu"]

    # A job created before plans is planned when it is dispatched (tests below).
    with sessions() as session:
        session.execute(update(Job).where(Job.id == big).values(plan=None))
        session.commit()
        assert (
            dispatch_pool(settings, session, session.execute(select(Job).where(Job.id == big)).scalar_one())
            == "gpu"
        )


def test_the_celery_dispatcher_puts_training_on_the_pool_queue(settings: Settings) -> None:
    """Through the real (filesystem) broker: the message lands on ``train.<pool>``."""
    CeleryDispatcher(settings).train_job("ftjob-abc", "gpu")
    folder = settings.home / "broker" / "queue"
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 1 and files[0].partition(".")[2] == "train.gpu.msg"
    message = json.loads((folder / files[0]).read_text())
    assert message["headers"]["task"] == "loraforge.train_job"
    assert message["properties"]["delivery_info"]["routing_key"] == "train.gpu"


def test_workers_consume_default_and_the_queues_of_their_pools() -> None:
    assert train_queue("h100x8") == "train.h100x8"
    assert worker_queues(TEST_POOLS) == ["default", "train.gpu", "train.cpu", "batch"]  # loraforge serve
    assert worker_queues(TEST_POOLS, ["cpu"]) == ["default", "train.cpu", "batch"]
    with pytest.raises(ValueError, match="unknown train pool"):
        worker_queues(TEST_POOLS, ["h200"])
