"""A self-healing ``loraforge serve`` (issue 12): its worker SIGKILLed while a job trains, the API
keeps answering within a second and the job succeeds, resumed from its checkpoint; ``/readyz`` and
the three ``/metrics`` of a live service; a batch goes on where it stopped after its worker is
SIGKILLed; SIGTERM stops everything and hands the running job back.

Its own ``serve`` (it kills children), on the embedded backend only: the supervisor does not
depend on the backend.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from loraforge.db.models import Job, JobEvent
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.settings import Settings
from tests.helpers import chat_examples, to_jsonl
from tests.integration.conftest import Stack, free_port, start_stack, stop_stack

pytestmark = pytest.mark.integration

TINY = "loraforge/tiny-llama"
FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    worker_metrics = free_port()
    stack = start_stack(
        tmp_path_factory.mktemp("home-operations"),
        {
            # Crash recovery in seconds rather than minutes, as in test_lifecycle's SIGKILL test.
            "LORAFORGE_HEARTBEAT_SECONDS": "1",
            "LORAFORGE_LEASE_TIMEOUT_SECONDS": "6",
            "LORAFORGE_REAPER_INTERVAL_SECONDS": "1",
            "LORAFORGE_WORKER_METRICS_PORT": str(worker_metrics),
        },
    )
    stack.env["WORKER_METRICS_URL"] = f"http://127.0.0.1:{worker_metrics}/metrics"
    try:
        yield stack
    finally:
        stop_stack(stack)


def client(stack: Stack) -> OpenAI:
    return OpenAI(base_url=stack.base_url, api_key=stack.key("ops"), max_retries=0, timeout=60)


def children(stack: Stack) -> dict[str, int]:
    """``serve``'s live children by subcommand (``loraforge api|worker|engine``)."""
    assert stack.proc is not None
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == stack.proc.pid and stat[0] != "Z" and b"loraforge" in argv:
            found[argv[argv.index(b"loraforge") + 1].decode()] = int(entry)
    return found


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout}s")
        time.sleep(0.2)


def new_job(stack: Stack, n_epochs: int) -> str:
    sdk = client(stack)
    f = sdk.files.create(file=("train.jsonl", io.BytesIO(to_jsonl(chat_examples(20)))), purpose="fine-tune")
    return sdk.fine_tuning.jobs.create(
        model=TINY, training_file=f.id, hyperparameters={"n_epochs": n_epochs}
    ).id


def reached_step(stack: Stack, job_id: str, step: int) -> bool:
    page = client(stack).fine_tuning.jobs.list_events(job_id, limit=5)
    return any(e.type == "metrics" and e.data["step"] >= step for e in page.data)


@dataclass
class Poller:
    """Polls an API route every ~100 ms in a thread and keeps the worst latency and any failure."""

    url: str
    headers: dict[str, str]
    worst: float = 0.0
    count: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    answer = http.get(self.url, headers=self.headers)
                    if answer.status_code != 200:
                        self.failures.append(f"{answer.status_code}: {answer.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.worst = max(self.worst, time.monotonic() - started)
                self.count += 1
                self._stop.wait(max(0.0, 0.1 - (time.monotonic() - started)))

    def __enter__(self) -> Poller:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def test_readyz_and_the_three_metrics_endpoints(serve: Stack) -> None:
    http = httpx.Client(timeout=10)
    assert http.get(f"{serve.api_url}/healthz").json() == {"status": "ok"}
    # The worker beats its presence row once it is ready (a few seconds after serve answers).
    wait_for(lambda: http.get(f"{serve.api_url}/readyz").status_code == 200, 60, "not ready")
    checks = {c["name"]: c["status"] for c in http.get(f"{serve.api_url}/readyz").json()["checks"]}
    assert {"database", "broker", "object_store", "workers:cpu", f"engines:{TINY}"} <= set(checks)
    assert set(checks.values()) == {"ok"}
    api = http.get(f"{serve.api_url}/metrics").text
    assert sample(api, "loraforge_workers_live", pool="cpu") == 1
    engine = http.get(f"{serve.engine_url}/metrics").text
    assert sample(engine, "loraforge_engine_adapters_loaded") == 0
    worker = http.get(serve.env["WORKER_METRICS_URL"]).text
    assert sample(worker, "loraforge_jobs_running") == 0


def test_a_sigkilled_worker_is_restarted_while_the_api_answers_and_the_job_resumes(serve: Stack) -> None:
    sdk = client(serve)
    job_id = new_job(serve, n_epochs=16)  # 80 steps, a checkpoint every 5
    wait_for(lambda: reached_step(serve, job_id, 12), 180, "the job did not reach step 12")
    before = children(serve)
    assert {"api", "worker", "engine"} <= set(before)
    url = f"{serve.api_url}/v1/fine_tuning/jobs/{job_id}"
    with Poller(url, {"Authorization": f"Bearer {serve.key('ops')}"}) as poller:
        os.kill(before["worker"], signal.SIGKILL)
        wait_for(lambda: children(serve).get("worker") not in (None, before["worker"]), 60, "no new worker")
        wait_for(lambda: sdk.fine_tuning.jobs.retrieve(job_id).status in FINAL, 240, "the job did not finish")
    done = sdk.fine_tuning.jobs.retrieve(job_id)
    assert done.status == "succeeded", f"{done.error}\n{serve.log_tail()}"
    assert poller.count > 50 and not poller.failures, poller.failures[:5]
    assert poller.worst < 1.0, f"the API took {poller.worst:.2f} s to answer once"
    texts = [e.message for e in sdk.fine_tuning.jobs.list_events(job_id, limit=1000)]
    resumed = [t for t in texts if t.startswith("Resumed from checkpoint at step ")]
    assert len(resumed) == 1 and any("stopped responding; re-queued" in t for t in texts)
    assert children(serve)["api"] == before["api"] and children(serve)["engine"] == before["engine"]
    assert "worker exited with signal SIGKILL; restarting it in 1 s" in serve.log_path.read_text()
    assert "worker" in (serve.home / "logs" / "worker.log").read_text()
    # The metrics saw it: the new worker finished the job; the API counts it succeeded.
    worker = httpx.get(serve.env["WORKER_METRICS_URL"], timeout=10).text
    assert sample(worker, "loraforge_job_duration_seconds_count", status="succeeded") == 1
    api = httpx.get(f"{serve.api_url}/metrics", timeout=10).text
    assert (sample(api, "loraforge_jobs", status="succeeded") or 0) >= 1
    route = {"method": "GET", "route": "/v1/fine_tuning/jobs/{job_id}", "status": "200"}
    assert (sample(api, "loraforge_http_request_duration_seconds_count", **route) or 0) >= poller.count


def test_a_batch_survives_its_worker_being_sigkilled(serve: Stack) -> None:
    """The worker dies mid-batch; ``serve`` restarts it and the batch goes on where it stopped:
    every request answered once in the output, and the engine asked at most one request twice
    (the one in flight)."""
    sdk = client(serve)
    names = [f"q{i:02d}" for i in range(12)]
    body = {"model": TINY, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 8}
    lines = [{"custom_id": n, "method": "POST", "url": "/v1/chat/completions", "body": body} for n in names]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    route = {"method": "POST", "route": "/v1/chat/completions", "status": "200"}
    asked_before = (
        sample(
            httpx.get(f"{serve.engine_url}/metrics").text,
            "loraforge_http_request_duration_seconds_count",
            **route,
        )
        or 0
    )
    f = sdk.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch")
    batch = sdk.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")

    def progress() -> int:
        counts = sdk.batches.retrieve(batch.id).request_counts
        return counts.completed if counts else 0

    wait_for(lambda: progress() >= 3, 120, "the batch did not get going")
    before = children(serve)
    os.kill(before["worker"], signal.SIGKILL)
    killed_at = progress()
    assert killed_at < len(names), "the batch ended before the worker was killed"
    wait_for(lambda: children(serve).get("worker") not in (None, before["worker"]), 60, "no new worker")
    wait_for(
        lambda: sdk.batches.retrieve(batch.id).status in ("completed", "failed", "cancelled"),
        240,
        "the batch did not end",
    )
    done = sdk.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (len(names), 0)
    assert done.output_file_id is not None
    output = [json.loads(raw) for raw in sdk.files.content(done.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in output] == names
    asked = (
        sample(
            httpx.get(f"{serve.engine_url}/metrics").text,
            "loraforge_http_request_duration_seconds_count",
            **route,
        )
        or 0
    )
    assert len(names) <= asked - asked_before <= len(names) + 1, (asked - asked_before, killed_at)
    assert "stopped; sending it again" in (serve.home / "logs" / "worker.log").read_text()


def test_sigterm_stops_everything_and_hands_the_running_job_back(serve: Stack) -> None:
    job_id = new_job(serve, n_epochs=40)
    wait_for(lambda: reached_step(serve, job_id, 3), 180, "the job did not start training")
    running = children(serve)
    assert serve.proc is not None
    serve.proc.send_signal(signal.SIGTERM)
    try:
        assert serve.proc.wait(60) == 0
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve did not stop within 60 s\n{serve.log_tail()}")
    for pid in running.values():
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    settings = Settings(home=serve.home)
    engine = make_engine(settings)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            status = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one()
            last = session.execute(
                select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.seq.desc())
            ).scalars()
            messages = list(last)
    finally:
        engine.dispose()
    assert status == "queued", f"{status}\n{serve.log_tail()}"
    assert "is shutting down; re-queued to resume from its last checkpoint" in messages[0]
