"""GPU leases (``worker/gpu_leases.py``, ``worker/admission.py``): a trainer gets GPUs no other
trainer on the host holds, sees only those (CUDA_VISIBLE_DEVICES), and a job whose GPUs are busy
stays queued with exactly one re-send chain. No GPU needed: fake pools and a fake trainer."""

from __future__ import annotations

import io
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.contracts.train_spec import TrainPlan
from loraforge.contracts.trainer_launch import launch_command
from loraforge.db.models import Job, JobEvent
from loraforge.db.session import make_engine, make_sessionmaker
from loraforge.queue import tasks
from loraforge.settings import Settings, TrainPool
from loraforge.worker import gpu_leases
from loraforge.worker.gpu_leases import lock_path, try_acquire
from loraforge.worker.training import run_training
from tests.helpers import chat_examples, to_jsonl

LLAMA8B = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"


def test_two_trainers_cannot_both_hold_the_only_gpu_and_a_released_lease_is_reusable(tmp_path: Path) -> None:
    first = try_acquire(tmp_path, ["0"], 1)
    assert first is not None and first.devices == ("0",)
    assert first.env() == {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert try_acquire(tmp_path, ["0"], 1) is None  # another thread of this worker: excluded too
    first.release()
    with try_acquire(tmp_path, ["0"], 1) as again:  # type: ignore[union-attr]
        assert again.devices == ("0",)
    assert try_acquire(tmp_path, ["0"], 1) is not None


def test_a_multi_gpu_lease_takes_free_gpus_or_none(tmp_path: Path) -> None:
    busy = try_acquire(tmp_path, ["1"], 1)
    fsdp = try_acquire(tmp_path, ["0", "1", "2", "3"], 2)
    assert fsdp is not None and fsdp.env()["CUDA_VISIBLE_DEVICES"] == "0,2"
    # accelerate still runs num_gpus processes, on a rendezvous port no other lease's FSDP uses.
    cmd = launch_command("s.json", TrainPlan(strategy="fsdp", num_gpus=2), "/py", fsdp.rendezvous_port())
    assert (
        cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--main_process_port") + 1] == "29500"
    )
    # Only "3" is free: a 2-GPU job gets nothing (and holds nothing while it waits).
    assert try_acquire(tmp_path, ["0", "1", "2", "3"], 2) is None
    single = try_acquire(tmp_path, ["0", "1", "2", "3"], 1)
    assert single is not None and single.devices == ("3",) and single.rendezvous_port() == 29503
    with pytest.raises(ValueError, match="needs 4 GPUs"):
        try_acquire(tmp_path, ["0", "1"], 4)
    for lease in (busy, fsdp, single):
        assert lease is not None
        lease.release()


def test_a_dead_workers_lease_is_freed_by_the_os(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from pathlib import Path
                from loraforge.worker.gpu_leases import try_acquire
                assert try_acquire(Path({str(tmp_path)!r}), ["0"], 1) is not None
                print("held", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert try_acquire(tmp_path, ["0"], 1) is None
    finally:
        holder.kill()
        holder.wait()
    assert try_acquire(tmp_path, ["0"], 1) is not None
    assert lock_path(tmp_path, "GPU-ab/c").name == "gpu-GPU-ab_c.lock"


def test_a_lock_that_raises_releases_the_locks_already_taken(tmp_path: Path) -> None:
    """Before: GPU 0's descriptor stayed open (and locked) when GPU 1's lock file raised."""
    lock_path(tmp_path, "1").mkdir(parents=True)  # os.open(O_RDWR) of a directory: an OSError
    with pytest.raises(IsADirectoryError):
        try_acquire(tmp_path, ["0", "1"], 2)
    again = try_acquire(tmp_path, ["0"], 1)  # a leaked flock on GPU 0 would answer None here
    assert again is not None
    again.release()


def test_leases_are_per_host_even_when_the_home_is_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On NFS flock is cluster-wide: GPU 0 of host a must not block GPU 0 of host b."""
    monkeypatch.setattr(gpu_leases.socket, "gethostname", lambda: "host-a")
    assert lock_path(tmp_path, "0") == tmp_path / "run" / "gpu-leases" / "host-a" / "gpu-0.lock"
    on_a = try_acquire(tmp_path, ["0"], 1)
    assert on_a is not None and try_acquire(tmp_path, ["0"], 1) is None
    monkeypatch.setattr(gpu_leases.socket, "gethostname", lambda: "host-b")
    on_b = try_acquire(tmp_path, ["0"], 1)
    assert on_b is not None
    on_a.release()
    on_b.release()


# --- the worker: lease before start, CUDA_VISIBLE_DEVICES for the trainer, wait re-queued ---

ONE_GPU = TrainPool(name="gpu", device="cuda", count=1, memory_gib=80, devices=("3",))


@pytest.fixture
def gpu_settings(settings: Settings, tmp_path: Path) -> Settings:
    """One 80 GiB GPU (index 3 on this host) and a fake trainer that records its environment."""
    trainer = tmp_path / "fake-trainer"
    trainer.write_text(
        f'#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER" >> {tmp_path / "env"}\nexit 3\n'
    )
    trainer.chmod(trainer.stat().st_mode | stat.S_IEXEC)
    cpu = TrainPool(name="cpu", device="cpu", count=1, memory_gib=16)
    return settings.model_copy(update={"train_pools": [ONE_GPU, cpu], "trainer_python": str(trainer)})


@pytest.fixture
def sessions(gpu_settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(gpu_settings)
    yield make_sessionmaker(engine)
    engine.dispose()


def queued_8b_jobs(api: TestClient, key: str, sessions: sessionmaker[Session], n: int) -> list[str]:
    client = OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)
    file_id = client.files.create(
        file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune"
    ).id
    ids = [client.fine_tuning.jobs.create(model=LLAMA8B, training_file=file_id).id for _ in range(n)]
    with sessions() as session:
        session.execute(update(Job).where(Job.id.in_(ids)).values(status="queued", queued_at=1000))
        session.commit()
    return ids


def job(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as session:
        return session.execute(select(Job).where(Job.id == job_id)).scalar_one()


def test_a_job_whose_gpu_is_leased_waits_queued_then_trains_on_the_leased_gpu(  # type: ignore[no-untyped-def]
    gpu_settings: Settings, make_key, sessions: sessionmaker[Session], tmp_path: Path, monkeypatch
) -> None:
    from loraforge.api.app import create_app
    from tests.conftest import RecordingDispatcher

    with TestClient(create_app(gpu_settings, dispatcher=RecordingDispatcher())) as api:
        a, b = queued_8b_jobs(api, make_key("acme"), sessions, 2)
    assert job(sessions, a).plan["pool"] == "gpu"  # type: ignore[index]
    # Job a's trainer holds the only GPU: b does not start, stays queued, and owns the wait chain.
    running_a = try_acquire(gpu_settings.home, ["3"], 1)
    assert running_a is not None
    token = run_training(gpu_settings, sessions, b)
    assert token is not None and token > 1000
    row = job(sessions, b)
    assert row.status == "queued" and row.queued_at == token and not (tmp_path / "env").exists()
    # A duplicate message of b (the reaper's, a start-up reconcile's) finds the chain owned: no re-send.
    assert run_training(gpu_settings, sessions, b, wait_token=1000) is None
    # The chain's own re-send keeps waiting with a newer token.
    later = run_training(gpu_settings, sessions, b, wait_token=token)
    assert later is not None and later > token

    # The train task re-sends itself with a countdown on the pool's queue; the job stays queued.
    sent: list[Any] = []
    monkeypatch.setattr(tasks, "get_settings", lambda: gpu_settings)
    monkeypatch.setattr(tasks, "_sessions", lambda: sessions)
    monkeypatch.setattr(
        tasks.train_job_task,
        "apply_async",
        lambda args, queue, countdown: sent.append((args, queue, countdown)),
    )
    tasks.train_job_task(b, later)
    assert len(sent) == 1 and sent[0][1:] == ("train.gpu", gpu_settings.gpu_wait_seconds)
    assert sent[0][0][0] == b and sent[0][0][1] > later and job(sessions, b).status == "queued"

    # a's trainer ends: b takes the GPU, and its trainer sees only GPU 3, in nvidia-smi's order.
    running_a.release()
    assert run_training(gpu_settings, sessions, b, wait_token=sent[0][0][1]) is None
    assert (tmp_path / "env").read_text() == "3 PCI_BUS_ID\n"
    assert job(sessions, b).status == "failed"  # the fake trainer exits 3
    # The lease went with b's trainer: the GPU is free again.
    assert try_acquire(gpu_settings.home, ["3"], 1) is not None


def test_a_cpu_job_needs_no_lease(  # type: ignore[no-untyped-def]
    gpu_settings: Settings, make_key, sessions: sessionmaker[Session], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    from loraforge.api.app import create_app
    from tests.conftest import RecordingDispatcher

    with TestClient(create_app(gpu_settings, dispatcher=RecordingDispatcher())) as api:
        client = OpenAI(
            base_url="http://testserver/v1", api_key=make_key("acme"), http_client=api, max_retries=0
        )
        file_id = client.files.create(
            file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune"
        ).id
        tiny = client.fine_tuning.jobs.create(model="loraforge/tiny-llama", training_file=file_id).id
    with sessions() as session:
        session.execute(update(Job).where(Job.id == tiny).values(status="queued"))
        session.commit()
    held = try_acquire(gpu_settings.home, ["3"], 1)  # every GPU busy: a cpu job still runs
    assert run_training(gpu_settings, sessions, tiny) is None
    assert (tmp_path / "env").read_text() == " \n"  # no CUDA_VISIBLE_DEVICES from a lease
    assert held is not None
    held.release()


def events(sessions: sessionmaker[Session], job_id: str) -> list[str]:
    with sessions() as session:
        rows = session.execute(select(JobEvent.message).where(JobEvent.job_id == job_id)).scalars()
        return list(rows)


def test_an_unexpected_lease_error_keeps_the_job_queued_with_one_event(  # type: ignore[no-untyped-def]
    gpu_settings: Settings, make_key, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A lock file that cannot be opened is the host's problem: the job waits (re-sent) and says
    why once, instead of the train task dying with an unhandled OSError."""
    from loraforge.api.app import create_app
    from tests.conftest import RecordingDispatcher

    with TestClient(create_app(gpu_settings, dispatcher=RecordingDispatcher())) as api:
        (job_id,) = queued_8b_jobs(api, make_key("acme"), sessions, 1)
    lock_path(gpu_settings.home, "3").mkdir(parents=True)
    first = run_training(gpu_settings, sessions, job_id)
    second = run_training(gpu_settings, sessions, job_id, wait_token=first)
    assert first is not None and second is not None and second > first
    assert job(sessions, job_id).status == "queued" and not (tmp_path / "env").exists()
    assert sum("could not lease GPUs (IsADirectoryError" in m for m in events(sessions, job_id)) == 1


def test_a_plan_for_more_gpus_than_the_pool_has_now_is_planned_again_not_failed(  # type: ignore[no-untyped-def]
    gpu_settings: Settings, make_key, sessions: sessionmaker[Session], tmp_path: Path, monkeypatch
) -> None:
    """The pool shrank from 2 GPUs to 1 after planning: before, admit failed the job ("the plan
    needs 2 GPUs"); now it waits and its re-send re-plans it onto what the pool has."""
    from loraforge.api.app import create_app
    from tests.conftest import RecordingDispatcher

    with TestClient(create_app(gpu_settings, dispatcher=RecordingDispatcher())) as api:
        (job_id,) = queued_8b_jobs(api, make_key("acme"), sessions, 1)
    with sessions() as session:
        row = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        row.plan = {**(row.plan or {}), "strategy": "fsdp", "num_gpus": 2}
        session.commit()
    token = run_training(gpu_settings, sessions, job_id)
    assert token is not None and job(sessions, job_id).status == "queued"
    assert not (tmp_path / "env").exists()
    sent: list[Any] = []
    monkeypatch.setattr(tasks, "get_settings", lambda: gpu_settings)
    monkeypatch.setattr(tasks, "_sessions", lambda: sessions)
    monkeypatch.setattr(
        tasks.train_job_task, "apply_async", lambda args, queue, countdown: sent.append(queue)
    )
    tasks.queue_training(job_id, token)
    plan = job(sessions, job_id).plan
    assert sent == ["train.gpu"] and plan is not None and plan["num_gpus"] == 1
    with sessions() as session:
        last = session.execute(
            select(JobEvent.data).where(JobEvent.job_id == job_id).order_by(JobEvent.seq.desc())
        ).scalars()
        assert next(iter(last))["reason"] == "Its plan needs 2 GPUs and pool 'gpu' now has 1"


def test_an_invalid_kernels_setting_fails_the_job_before_the_trainer_starts(  # type: ignore[no-untyped-def]
    gpu_settings: Settings, make_key, sessions: sessionmaker[Session], tmp_path: Path, monkeypatch
) -> None:
    from loraforge.api.app import create_app
    from tests.conftest import RecordingDispatcher

    with TestClient(create_app(gpu_settings, dispatcher=RecordingDispatcher())) as api:
        (job_id,) = queued_8b_jobs(api, make_key("acme"), sessions, 1)
    monkeypatch.setenv("LORAFORGE_KERNELS", "ligre")
    assert run_training(gpu_settings, sessions, job_id) is None
    failed = job(sessions, job_id)
    assert failed.status == "failed" and failed.error is not None
    assert "LORAFORGE_KERNELS='ligre': expected one of auto, liger, torch" in failed.error["message"]
    assert not (tmp_path / "env").exists()  # the trainer never ran
    assert try_acquire(gpu_settings.home, ["3"], 1) is not None  # and its lease was given back
