"""Issue 4 (job lifecycle) with the unmodified openai SDK against live loraforge processes:
metrics and validation events, epoch checkpoints served as models, the results file, cancel,
pause/resume, continued fine-tuning, determinism, and crash recovery after SIGKILLing the worker.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.helpers import ANSWER, chat_examples, to_jsonl, training_prompt
from tests.integration.conftest import Stack, free_port, only_embedded

pytestmark = pytest.mark.integration

TINY = "loraforge/tiny-llama"
FINAL = ("succeeded", "failed", "cancelled")


def client_for(stack: Stack, org: str) -> OpenAI:
    return OpenAI(base_url=stack.base_url, api_key=stack.key(org), max_retries=0, timeout=120)


def upload(client: OpenAI, n: int = 20, name: str = "train.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(to_jsonl(chat_examples(n)))), purpose="fine-tune").id


def wait_status(client: OpenAI, job_id: str, statuses: tuple[str, ...], timeout: float = 180) -> object:
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} still {job.status} after {timeout}s (wanted {statuses})")
        time.sleep(0.3)


def events(client: OpenAI, job_id: str) -> list:
    """All events, oldest first."""
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=1000))))


def metrics(client: OpenAI, job_id: str) -> list[dict]:
    return [e.data for e in events(client, job_id) if e.type == "metrics"]


def wait_step(client: OpenAI, job_id: str, step: int, timeout: float = 120) -> None:
    """Until the job has trained at least ``step`` steps (it must be running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page = client.fine_tuning.jobs.list_events(job_id, limit=5)
        if any(e.type == "metrics" and e.data["step"] >= step for e in page.data):
            return
        assert client.fine_tuning.jobs.retrieve(job_id).status in ("validating_files", "queued", "running")
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not reach step {step} in {timeout}s")


def trainer_pids(job_id: str) -> list[int]:
    """Live ``python -m loraforge.trainer`` processes of this job (its spec path names the job)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if (
            b"loraforge.trainer" in cmdline
            and any(job_id.encode() in part for part in cmdline)
            and state != "Z"
        ):
            found.append(int(entry))
    return found


def wait_no_trainer(job_id: str, timeout: float) -> float:
    """Seconds until no trainer of ``job_id`` is alive (fails after ``timeout``)."""
    start = time.monotonic()
    while trainer_pids(job_id):
        if time.monotonic() - start > timeout:
            pytest.fail(f"trainer of {job_id} still alive after {timeout}s: {trainer_pids(job_id)}")
        time.sleep(0.1)
    return time.monotonic() - start


def assert_every_step_once(data: list[dict], total: int) -> None:
    steps = [d["step"] for d in data]
    assert sorted(steps) == list(range(1, total + 1)), steps
    assert all(d["total_steps"] == total for d in data)


# --------------------------------------------------------------------------- one full job, inspected


@dataclass
class Watched:
    client: OpenAI
    file_id: str
    job: object
    saw_estimated_finish: bool
    seconds: float


@pytest.fixture(scope="module")
def watched(stack: Stack) -> Watched:
    """20 examples x 20 epochs with a validation file, polled while it runs."""
    only_embedded(stack)
    client = client_for(stack, "lifecycle")
    train_id = upload(client)
    valid_id = client.files.create(
        file=("valid.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune"
    ).id
    start = time.monotonic()
    job = client.fine_tuning.jobs.create(
        model=TINY,
        training_file=train_id,
        validation_file=valid_id,
        suffix="ckpt",
        seed=7,
        hyperparameters={"n_epochs": 20},
    )
    saw_estimate = False
    while job.status not in FINAL:
        assert time.monotonic() - start < 180, f"job still {job.status}\n{stack.log_tail()}"
        time.sleep(0.3)
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status == "running" and isinstance(job.estimated_finish, int):
            saw_estimate = saw_estimate or job.estimated_finish >= job.created_at
    assert job.status == "succeeded", f"{job.error}\n{stack.log_tail()}"
    return Watched(client, train_id, job, saw_estimate, time.monotonic() - start)


def test_metrics_events_with_validation_and_final_fields(watched: Watched) -> None:
    client, job = watched.client, watched.job
    assert watched.saw_estimated_finish, "estimated_finish was never set while running"
    assert job.estimated_finish is None and isinstance(job.trained_tokens, int) and job.trained_tokens > 0
    data = metrics(client, job.id)
    assert_every_step_once(data, 100)
    by_step = {d["step"]: d for d in data}
    # Validation at every epoch end (5 steps per epoch), full validation once, at the end.
    assert {s for s, d in by_step.items() if "valid_loss" in d} >= set(range(5, 101, 5))
    assert [s for s, d in by_step.items() if "full_valid_loss" in d] == [100]
    last = by_step[100]
    assert last["train_loss"] < 0.05 and 0.0 <= last["valid_mean_token_accuracy"] <= 1.0
    assert last["full_valid_loss"] == pytest.approx(last["valid_loss"])
    messages = [e.message for e in events(client, job.id)]
    assert any(
        m.startswith("Step 100/100: training loss=") and "full validation loss=" in m for m in messages
    )


def test_checkpoints_listed_newest_first_and_paginated(watched: Watched) -> None:
    client, job = watched.client, watched.job
    page = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert [c.step_number for c in page.data] == [100, 95, 90]  # the last 3 epochs
    assert page.has_more is False
    for ckpt in page.data:
        assert ckpt.object == "fine_tuning.job.checkpoint" and ckpt.fine_tuning_job_id == job.id
        assert ckpt.id.startswith("ftckpt")
        assert ckpt.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{ckpt.step_number}"
        assert ckpt.metrics.step == ckpt.step_number and ckpt.metrics.train_loss is not None
        assert ckpt.metrics.valid_loss is not None and isinstance(ckpt.created_at, int)
    assert page.data[0].metrics.full_valid_loss is not None
    one_by_one = [c.id for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)]
    assert one_by_one == [c.id for c in page.data]
    model_ids = [m.id for m in client.models.list()]
    assert all(c.fine_tuned_model_checkpoint in model_ids for c in page.data)
    assert f"{job.fine_tuned_model}:ckpt-step-85" not in model_ids  # pruned


def test_chat_with_a_checkpoint_model(stack: Stack, watched: Watched) -> None:
    client, job = watched.client, watched.job
    name = f"{job.fine_tuned_model}:ckpt-step-90"
    assert client.models.retrieve(name).id == name
    reply = client.chat.completions.create(
        model=name, messages=training_prompt(3), temperature=0, max_tokens=40
    )
    assert reply.choices[0].message.content == ANSWER
    with pytest.raises(openai.NotFoundError):
        client_for(stack, "lifecycle-other").chat.completions.create(model=name, messages=training_prompt(3))


def test_result_file_is_base64_metrics_csv(watched: Watched) -> None:
    client, job = watched.client, watched.job
    assert len(job.result_files) == 1
    record = client.files.retrieve(job.result_files[0])
    assert record.purpose == "fine-tune-results" and record.filename == "step_metrics.csv"
    text = base64.b64decode(client.files.content(record.id).read()).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == [
        "step",
        "train_loss",
        "train_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
        "full_valid_loss",
        "full_valid_mean_token_accuracy",
    ]
    assert [int(r["step"]) for r in rows] == list(range(1, 101))
    assert rows[0]["valid_loss"] == "" and rows[4]["valid_loss"] != ""  # measured at epoch ends
    assert float(rows[-1]["train_loss"]) < 0.05 and rows[-1]["full_valid_loss"] != ""


def test_continued_fine_tuning_from_a_checkpoint(watched: Watched) -> None:
    client, job = watched.client, watched.job
    parent = f"{job.fine_tuned_model}:ckpt-step-95"
    child = client.fine_tuning.jobs.create(
        model=parent, training_file=watched.file_id, seed=3, hyperparameters={"n_epochs": 1}
    )
    assert child.model == parent
    child = wait_status(client, child.id, FINAL, timeout=120)
    assert child.status == "succeeded", child.error
    assert child.model == parent and child.fine_tuned_model.startswith(f"ft:{TINY}:lifecycle::")
    first = min(metrics(client, child.id), key=lambda d: d["step"])
    # A fresh LoRA starts near ln(vocab) or above; the parent already knows the answer.
    assert first["train_loss"] < 1.0, first
    reply = client.chat.completions.create(
        model=child.fine_tuned_model, messages=training_prompt(5), temperature=0, max_tokens=40
    )
    assert reply.choices[0].message.content == ANSWER
    with pytest.raises(openai.NotFoundError) as exc:
        client.fine_tuning.jobs.create(
            model=f"{job.fine_tuned_model}:ckpt-step-5", training_file=watched.file_id
        )
    assert exc.value.code == "model_not_found"  # pruned long ago


# --------------------------------------------------------------------------- determinism, cancel


def test_same_seed_same_metrics(stack: Stack) -> None:
    only_embedded(stack)
    client = client_for(stack, "determinism")
    file_id = upload(client)
    jobs = [
        client.fine_tuning.jobs.create(
            model=TINY, training_file=file_id, seed=1234, hyperparameters={"n_epochs": 3}
        )
        for _ in range(2)
    ]
    curves = []
    for job in jobs:
        done = wait_status(client, job.id, FINAL)
        assert done.status == "succeeded", done.error
        curves.append(
            [(d["step"], d["train_loss"], d["train_mean_token_accuracy"]) for d in metrics(client, job.id)]
        )
    assert len(curves[0]) == 15 and curves[0] == curves[1]


def test_cancel_running_job_stops_it_fast_and_leaves_nothing(stack: Stack) -> None:
    only_embedded(stack)
    client = client_for(stack, "cancels")
    file_id = upload(client)
    job = client.fine_tuning.jobs.create(model=TINY, training_file=file_id, hyperparameters={"n_epochs": 50})
    wait_step(client, job.id, 7)  # past the first epoch checkpoint
    assert trainer_pids(job.id), "no trainer process found for a running job"
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert wait_no_trainer(job.id, timeout=10) < 10
    deadline = time.monotonic() + 10
    leftovers = [
        stack.home / "adapters" / job.id,
        stack.home / "runs" / job.id / "checkpoints",
        stack.home / "blobs" / "checkpoints" / job.id,  # the store (a folder on the embedded stack)
        stack.home / "blobs" / "adapters" / job.id,
    ]
    while any(p.exists() for p in leftovers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in leftovers if p.exists()]
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None and job.result_files == []
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []
    assert not [m.id for m in client.models.list() if m.id.startswith("ft:")]  # no adapter, no checkpoint
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.cancel(job.id)
    assert "already cancelled" in exc.value.message


def test_cancelled_queued_job_never_starts(stack: Stack) -> None:
    only_embedded(stack)
    client = client_for(stack, "cancels")
    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=upload(client), hyperparameters={"n_epochs": 2}
    )
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    time.sleep(3)  # the validation and train tasks have run (and found it cancelled) by now
    messages = [e.message for e in events(client, job.id)]
    assert "Fine-tuning job started" not in messages and messages[-1] == "The job was cancelled"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert not trainer_pids(job.id)


# --------------------------------------------------------------------------- pause / resume


def test_pause_frees_the_trainer_and_resume_finishes_all_steps(stack: Stack) -> None:
    client = client_for(stack, "pauses")
    file_id = upload(client)
    # 120 steps: on a quiet machine (~0.05 s a step) the pause still lands mid-run.
    job = client.fine_tuning.jobs.create(model=TINY, training_file=file_id, hyperparameters={"n_epochs": 24})
    wait_step(client, job.id, 6)  # past the first epoch checkpoint
    assert client.fine_tuning.jobs.pause(job.id).status in ("running", "paused")
    paused = wait_status(client, job.id, ("paused",), timeout=60)
    assert paused.estimated_finish is None
    assert wait_no_trainer(job.id, timeout=5) < 5  # the accelerator is free
    texts = [e.message for e in events(client, job.id)]
    at = next(t for t in texts if t.startswith("Fine-tuning job paused at step "))
    step = int(at.split("step ")[1].split("/")[0])
    assert 6 <= step < 120
    time.sleep(1)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"  # stays paused
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait_status(client, job.id, FINAL, timeout=180)
    assert done.status == "succeeded", done.error
    texts = [e.message for e in events(client, job.id)]
    assert f"Resumed from checkpoint at step {step}/120" in texts
    assert texts.count("Fine-tuning job started") == 2
    # The resumed run opened the tokenized data the first run prepared (the run's data cache).
    ready = [t for t in texts if t.startswith("Training data ready: 20 examples")]
    assert len(ready) == 2 and sum(t.endswith("reused from an earlier run") for t in ready) == 1
    assert_every_step_once(metrics(client, job.id), 120)
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.resume(job.id)
    assert exc.value.code == "job_not_resumable"
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.pause(job.id)
    assert exc.value.code == "job_not_pausable"


# --------------------------------------------------------------------------- crash recovery


@dataclass
class Processes:
    home: Path
    env: dict[str, str]
    api_url: str
    key: str
    api: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]

    def start_worker(self) -> subprocess.Popen[bytes]:
        log = (self.home / "worker.log").open("ab")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "loraforge", "worker"], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        return self.worker

    def stop(self) -> None:
        for proc in (self.worker, self.api):
            if proc.poll() is None:
                proc.terminate()
        for proc in (self.worker, self.api):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_processes(home: Path) -> Processes:
    """API and worker as separate processes (``loraforge serve`` would exit when one dies).

    No engine: nothing here chats, and a worker that cannot reach one only logs a warning.
    """
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "LORAFORGE_HOME": str(home),
        "LORAFORGE_API_PORT": str(port),
        "LORAFORGE_ENGINE_PORT": str(free_port()),
        "LORAFORGE_HEARTBEAT_SECONDS": "1",
        "LORAFORGE_LEASE_TIMEOUT_SECONDS": "6",
        "LORAFORGE_REAPER_INTERVAL_SECONDS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    created = subprocess.run(
        [sys.executable, "-m", "loraforge", "keys", "create", "--org", "crash"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = (home / "api.log").open("ab")
    api = subprocess.Popen(
        [sys.executable, "-m", "loraforge", "api"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    procs = Processes(
        home, env, f"http://127.0.0.1:{port}", created.stdout.strip().splitlines()[-1], api, api
    )
    procs.start_worker()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{procs.api_url}/health", timeout=2).status_code == 200:
                return procs
        except httpx.HTTPError:
            time.sleep(0.3)
    procs.stop()
    pytest.fail("API did not come up")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = start_processes(tmp_path / "home")
    try:
        yield procs
    finally:
        procs.stop()


def test_sigkilled_worker_job_resumes_from_checkpoint_and_succeeds(processes: Processes) -> None:
    client = OpenAI(base_url=f"{processes.api_url}/v1", api_key=processes.key, max_retries=0, timeout=60)
    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=upload(client), hyperparameters={"n_epochs": 16}
    )
    wait_step(client, job.id, 12)  # two epoch checkpoints (steps 5 and 10) are on disk
    assert trainer_pids(job.id)
    processes.worker.send_signal(signal.SIGKILL)
    processes.worker.wait(10)
    # The trainer dies with its worker (PR_SET_PDEATHSIG): no orphan keeps training.
    assert wait_no_trainer(job.id, timeout=5) < 5
    killed_at = max(d["step"] for d in metrics(client, job.id))
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"  # nobody knows yet
    processes.start_worker()
    done = wait_status(client, job.id, FINAL, timeout=240)
    assert done.status == "succeeded", f"{done.error}\n{(processes.home / 'worker.log').read_text()[-3000:]}"
    texts = [e.message for e in events(client, job.id)]
    assert any("stopped responding; re-queued" in t for t in texts)
    resumed = [t for t in texts if t.startswith("Resumed from checkpoint at step ")]
    assert len(resumed) == 1
    step = int(resumed[0].split("step ")[1].split("/")[0])
    assert step % 5 == 0 and 10 <= step <= killed_at, (step, killed_at)
    assert texts.count("Fine-tuning job started") == 2
    assert_every_step_once(metrics(client, job.id), 80)
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)] == [80, 75, 70]
    assert [m.id for m in client.models.list()].count(done.fine_tuned_model) == 1
