"""Dispatch re-plans a job without a usable plan: none (created before plans), a pool that is no
longer configured, or a pool that shrank under it. A job that never had a plan and fits nothing is
failed; one whose pool went away or shrank stays queued with one warning event (the pools may
come back). And ``loraforge serve`` resolves the pools once, hands the same list to the API and
the worker, and refuses to start CPU-only when GPU detection fails."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.api.app import create_app
from loraforge.catalog import load_catalog
from loraforge.cli import serve_children_env
from loraforge.db.models import Job, JobEvent
from loraforge.db.session import make_engine, make_sessionmaker
from loraforge.jobs.placement import CODE
from loraforge.planner import gpus, pools
from loraforge.planner.memory import CUDA_RESERVED_GIB, GIB, total_params
from loraforge.planner.pools import resolve_pools
from loraforge.queue import tasks
from loraforge.queue.routing import worker_queues
from loraforge.settings import Settings, TrainPool
from tests.conftest import RecordingDispatcher
from tests.helpers import chat_examples, to_jsonl

LLAMA8B = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"
CPU = TrainPool(name="cpu", device="cpu", count=1, memory_gib=16)
H200 = TrainPool(name="h200", device="cuda", count=1, memory_gib=140)


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)
    yield make_sessionmaker(engine)
    engine.dispose()


def queued_job(api: TestClient, key: str, sessions: sessionmaker[Session], model: str, **values: Any) -> str:
    """A job created through the API, then set to ``queued`` with ``values`` (e.g. plan=None)."""
    client = OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)
    file_id = client.files.create(
        file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune"
    ).id
    job_id = client.fine_tuning.jobs.create(model=model, training_file=file_id).id
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**{"status": "queued", **values}))
        session.commit()
    return job_id


def send_training(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, sessions: sessionmaker[Session], job_id: str
) -> list[str]:
    """``tasks.queue_training`` (the worker's and the reaper's dispatch); the queues sent to."""
    sent: list[str] = []
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    monkeypatch.setattr(tasks, "_sessions", lambda: sessions)
    monkeypatch.setattr(
        tasks.train_job_task, "apply_async", lambda args, queue, countdown: sent.append(queue)
    )
    tasks.queue_training(job_id)
    return sent


def stored(sessions: sessionmaker[Session], job_id: str) -> tuple[Job, list[str]]:
    with sessions() as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        events = session.execute(select(JobEvent.message).where(JobEvent.job_id == job_id)).scalars()
        return job, list(events)


def test_a_job_without_a_plan_is_planned_for_its_model_when_dispatched(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session], monkeypatch
) -> None:
    """8B created before plans goes to the GPU pool (cpu is not pools[0] by luck: it is listed
    first here), with its plan stored and a "Planned" event; never to the CPU."""
    cpu_first = settings.model_copy(update={"train_pools": [CPU, H200]})
    job_id = queued_job(api, make_key("acme"), sessions, LLAMA8B, plan=None)
    assert send_training(monkeypatch, cpu_first, sessions, job_id) == ["train.h200"]
    job, events = stored(sessions, job_id)
    assert job.status == "queued" and job.plan is not None
    assert job.plan["pool"] == "h200" and job.plan["device"] == "cuda" and job.plan["strategy"] == "lora"
    assert sum(m.startswith("Planned: lora on 1× cuda 140 GiB (pool h200)") for m in events) == 1


def test_a_job_without_a_plan_that_fits_nowhere_fails_cleanly(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session], monkeypatch
) -> None:
    job_id = queued_job(api, make_key("acme"), sessions, LLAMA8B, plan=None)
    cpu_only = settings.model_copy(update={"train_pools": [CPU]})
    assert send_training(monkeypatch, cpu_only, sessions, job_id) == []
    job, events = stored(sessions, job_id)
    assert job.status == "failed" and job.error is not None
    assert job.error["code"] == CODE and job.error["param"] == "model"
    assert "no memory plan" in job.error["message"] and "No worker pool can train" in job.error["message"]
    assert events[-1].startswith("The job failed:")


def test_a_job_planned_onto_a_pool_that_is_gone_is_planned_again(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session], monkeypatch
) -> None:
    job_id = queued_job(api, make_key("acme"), sessions, LLAMA8B)  # planned onto "gpu" (TEST_POOLS)
    renamed = settings.model_copy(update={"train_pools": [H200, CPU]})
    assert send_training(monkeypatch, renamed, sessions, job_id) == ["train.h200"]
    job, events = stored(sessions, job_id)
    assert job.plan is not None and job.plan["pool"] == "h200" and job.status == "queued"
    assert events[-1].startswith("Planned: lora on 1× cuda 140 GiB (pool h200)")
    # Its plan is usable now: dispatching again neither re-plans nor adds events.
    assert send_training(monkeypatch, renamed, sessions, job_id) == ["train.h200"]
    assert len(stored(sessions, job_id)[1]) == len(events)


def test_resuming_a_job_whose_pool_is_gone_and_that_fits_nowhere_keeps_it_queued(  # type: ignore[no-untyped-def]
    settings: Settings, make_key, sessions: sessionmaker[Session]
) -> None:
    dispatcher = RecordingDispatcher()
    with TestClient(create_app(settings, dispatcher=dispatcher)) as api:
        job_id = queued_job(api, make_key("acme"), sessions, LLAMA8B, status="paused")
    small = settings.model_copy(
        update={"train_pools": [TrainPool(name="t4", device="cuda", memory_gib=15), CPU]}
    )
    with TestClient(create_app(small, dispatcher=dispatcher)) as api:
        client = OpenAI(
            base_url="http://testserver/v1", api_key=make_key("acme"), http_client=api, max_retries=0
        )
        resumed = client.fine_tuning.jobs.resume(job_id)
    # Before: failed model_too_large_for_workers. The pool may come back (a config fix): it waits.
    assert resumed.status == "queued" and resumed.error is None
    assert dispatcher.trained == []
    job, events = stored(sessions, job_id)
    assert job.plan is not None and job.plan["pool"] == "gpu"  # the old plan is kept
    assert "'gpu' is no longer configured" in events[-1] and "stays queued" in events[-1]


def test_a_job_whose_gpu_pool_vanished_stays_queued_with_one_warning_until_a_pool_fits(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session], monkeypatch
) -> None:
    """The review's scenario: serve came up CPU-only (a failed detection); the reaper's re-sends
    re-plan a cuda-only 8B job that fits no configured pool. It must not be failed: it stays
    queued, nothing is sent, the warning event is added once (not per re-send), and once the GPU
    pool is back the next dispatch sends it there."""
    job_id = queued_job(api, make_key("acme"), sessions, LLAMA8B)  # planned onto "gpu"
    cpu_only = settings.model_copy(update={"train_pools": [CPU]})
    for _ in range(3):  # three re-sends
        assert send_training(monkeypatch, cpu_only, sessions, job_id) == []
    job, events = stored(sessions, job_id)
    assert job.status == "queued" and job.error is None
    warnings = [m for m in events if "stays queued" in m]
    assert len(warnings) == 1 and "'gpu' is no longer configured" in warnings[0]
    assert "No worker pool can train" in warnings[0]
    assert send_training(monkeypatch, settings, sessions, job_id) == ["train.gpu"]  # pool back


def test_a_pool_that_shrank_under_a_plan_is_planned_again(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session], monkeypatch
) -> None:
    """Same pool name, less memory than the plan was made for: not only a vanished name counts."""
    job_id = queued_job(api, make_key("acme"), sessions, LLAMA8B)
    assert stored(sessions, job_id)[0].plan["strategy"] == "lora"  # type: ignore[index]
    shrunk = settings.model_copy(
        update={"train_pools": [TrainPool(name="gpu", device="cuda", memory_gib=24), CPU]}
    )
    assert send_training(monkeypatch, shrunk, sessions, job_id) == ["train.gpu"]
    job, events = stored(sessions, job_id)
    assert job.plan is not None and job.plan["strategy"] == "qlora" and job.plan["memory_gib"] == 24
    assert events[-1].startswith("Planned: qlora on 1× cuda 24 GiB (pool gpu)")
    # A plan for more GPUs than the pool has now is stale too (placement.stale_reason).
    from loraforge.jobs.placement import stale_reason

    fsdp = {**job.plan, "strategy": "fsdp", "num_gpus": 4}
    assert stale_reason(fsdp, [TrainPool(name="gpu", device="cuda", count=2, memory_gib=24)]) == (
        "Its plan needs 4 GPUs and pool 'gpu' now has 2"
    )
    assert stale_reason(job.plan, [TrainPool(name="gpu", device="cuda", count=2, memory_gib=24)]) is None


# --- loraforge serve: one resolution, the same pools for every child ---


def fake_gpus(monkeypatch: pytest.MonkeyPatch, *memories: float) -> None:
    found = tuple(gpus.Gpu(str(i), gib) for i, gib in enumerate(memories))
    monkeypatch.setattr(pools, "detect_gpus", lambda: found)
    monkeypatch.setattr(pools, "detect_gpus_at_start", lambda: found)


def child_settings(env: dict[str, str], home: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("LORAFORGE_TRAIN_POOLS", env["LORAFORGE_TRAIN_POOLS"])
    return Settings(home=home)


def test_serve_hands_its_children_the_pools_it_resolved(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two GPUs: the engine is pinned to GPU 0 and training leases GPU 1; the API and the worker
    read the same list (so the API plans only onto queues the worker consumes)."""
    auto = settings.model_copy(update={"train_pools": None})
    fake_gpus(monkeypatch, 79.6, 79.6)
    envs = serve_children_env(auto)
    assert envs["api"]["LORAFORGE_TRAIN_POOLS"] == envs["worker"]["LORAFORGE_TRAIN_POOLS"]
    assert envs["engine"]["CUDA_VISIBLE_DEVICES"] == "0" and "CUDA_VISIBLE_DEVICES" not in envs["worker"]
    # Detection now fails in the children: they do not detect, they read what serve resolved.
    fake_gpus(monkeypatch)
    api_pools = resolve_pools(child_settings(envs["api"], tmp_path, monkeypatch))
    worker_pools = resolve_pools(child_settings(envs["worker"], tmp_path, monkeypatch))
    assert api_pools == worker_pools
    gpu = api_pools[0]
    assert (gpu.name, gpu.count, gpu.memory_gib, gpu.devices) == ("gpu", 1, 79.6, ("1",))
    assert worker_queues(worker_pools) == ["default", "train.gpu", "train.cpu", "batch"]


def test_serve_with_one_gpu_plans_training_around_the_engines_weights(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    serving_8b = settings.model_copy(update={"train_pools": None, "serve_base_model": LLAMA8B})
    fake_gpus(monkeypatch, 79.6)
    envs = serve_children_env(serving_8b)
    (gpu, cpu) = [TrainPool.model_validate(p) for p in json.loads(envs["worker"]["LORAFORGE_TRAIN_POOLS"])]
    entry = load_catalog().get(LLAMA8B)
    assert entry is not None and entry.arch is not None
    engine = total_params(entry.arch) * 2 / GIB + CUDA_RESERVED_GIB  # bf16 weights + context
    assert gpu.devices == ("0",) and gpu.memory_gib == pytest.approx(79.6 - engine, abs=0.06)
    assert "CUDA_VISIBLE_DEVICES" not in envs["engine"] and cpu.device == "cpu"


def test_serve_passes_configured_pools_through(settings: Settings) -> None:
    envs = serve_children_env(settings)
    listed = [TrainPool.model_validate(p) for p in json.loads(envs["api"]["LORAFORGE_TRAIN_POOLS"])]
    assert listed == settings.train_pools and envs["engine"]["LORAFORGE_TRAIN_POOLS"]


def test_serve_does_not_start_cpu_only_when_gpu_detection_fails(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A detection that *failed* (not "no nvidia-smi") is retried and then ends serve with the
    reason; before, serve handed its children a cpu-only list for their whole life."""
    from typer.testing import CliRunner

    from loraforge import cli, supervisor
    from loraforge.db import session as db_session

    def failing() -> tuple[gpus.Gpu, ...]:
        raise gpus.GpuDetectionError("GPU detection failed 3 times: nvidia-smi did not answer within 20 s")

    monkeypatch.setattr(pools, "detect_gpus_at_start", failing)
    auto = settings.model_copy(update={"train_pools": None})
    with pytest.raises(gpus.GpuDetectionError):
        serve_children_env(auto)
    spawned: list[list[str]] = []
    monkeypatch.setattr(cli, "get_settings", lambda: auto)
    monkeypatch.setattr(db_session, "migrate", lambda _settings: None)
    monkeypatch.setattr(supervisor, "Supervisor", lambda specs, **_: spawned.append([s.name for s in specs]))
    result = CliRunner().invoke(cli.app, ["serve"])
    assert result.exit_code == 2 and spawned == []
    assert "did not answer" in result.output and "LORAFORGE_TRAIN_POOLS" in result.output
