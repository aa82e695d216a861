"""Health, readiness and metrics in process: ``/healthz``, ``/readyz`` (each dependency by name,
503 until all are ok), the API's ``/metrics`` scraped with ``prometheus_client.parser`` (values move
when things happen; route templates, not raw paths), multi-process sums, the worker's metrics
server and its presence rows."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.api.app import create_app
from loraforge.db.models import Job, WorkerHeartbeat
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.ops import presence
from loraforge.ops.metrics import WorkerMetrics, serve_worker_metrics
from loraforge.serving.app import create_engine_app
from loraforge.settings import Settings
from tests.conftest import RecordingDispatcher
from tests.helpers import chat_examples, to_jsonl
from tests.net import free_port, serve_in_thread

REPO = Path(__file__).resolve().parents[2]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition text: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def sessions(settings: Settings, api: TestClient) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def fake_engine_url() -> Iterator[str]:
    """A real HTTP engine app (a fake model) on a loopback port: what ``/readyz`` probes."""
    fake = SimpleNamespace(prepare=None, base_model="loraforge/tiny-llama", loaded_adapters=lambda: [])
    with serve_in_thread(create_engine_app(fake)) as url:  # type: ignore[arg-type]
        yield url


def test_healthz_is_alive_without_dependencies(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}


def test_readyz_names_each_dependency_and_is_503_until_all_are_ok(
    settings: Settings, sessions: sessionmaker[Session], fake_engine_url: str
) -> None:
    settings = settings.model_copy(update={"engines": {"loraforge/tiny-llama": [fake_engine_url]}})
    with TestClient(create_app(settings, dispatcher=RecordingDispatcher())) as client:
        answer = client.get("/readyz")
        assert answer.status_code == 503
        checks = {c["name"]: c for c in answer.json()["checks"]}
        assert list(checks) == [
            "database",
            "broker",
            "object_store",
            "workers:gpu",
            "workers:cpu",
            "engines:loraforge/tiny-llama",
        ]
        assert checks["database"]["status"] == checks["object_store"]["status"] == "ok"
        assert checks["engines:loraforge/tiny-llama"]["status"] == "ok"
        # No worker has started: nothing made the broker folders, nobody serves a pool.
        assert "broker folder" in checks["broker"]["reason"]
        assert checks["workers:gpu"]["reason"].startswith("no worker serving pool gpu beat in")

        (settings.home / "broker" / "queue").mkdir(parents=True)
        presence.beat(sessions, "host-a:1", ["gpu"], 0)
        presence.beat(sessions, "host-b:2", ["cpu"], 0)
        answer = client.get("/readyz")
        assert answer.status_code == 200, answer.json()
        assert {c["status"] for c in answer.json()["checks"]} == {"ok"}

        # The cpu worker stops beating: not ready, and the reason says which pool.
        with session_scope(sessions) as session:
            session.execute(
                update(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == "host-b:2").values(beat_at=0)
            )
        answer = client.get("/readyz")
        bad = [c for c in answer.json()["checks"] if c["status"] == "error"]
        assert answer.status_code == 503 and [c["name"] for c in bad] == ["workers:cpu"]


def test_readyz_reports_an_unreachable_engine(settings: Settings) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = settings.model_copy(update={"engines": {"loraforge/tiny-llama": [dead]}})
    with TestClient(create_app(settings, dispatcher=RecordingDispatcher())) as client:
        checks = {c["name"]: c for c in client.get("/readyz").json()["checks"]}
    engine = checks["engines:loraforge/tiny-llama"]
    assert engine["status"] == "error" and dead in engine["reason"]


def test_api_metrics_move_when_things_happen(api: TestClient, make_key, sessions) -> None:  # type: ignore[no-untyped-def]
    before = api.get("/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    assert value(before.text, "loraforge_jobs", status="validating_files") == 0
    assert value(before.text, "loraforge_queue_depth", pool="cpu") == 0

    client = OpenAI(base_url="http://testserver/v1", api_key=make_key("acme"), http_client=api, max_retries=0)
    f = client.files.create(file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="loraforge/tiny-llama", training_file=f.id)
    client.fine_tuning.jobs.retrieve(job.id)
    client.fine_tuning.jobs.retrieve(job.id)
    after = api.get("/metrics").text
    assert value(after, "loraforge_jobs", status="validating_files") == 1
    route = {"method": "GET", "route": "/v1/fine_tuning/jobs/{job_id}", "status": "200"}
    assert value(after, "loraforge_http_request_duration_seconds_count", **route) == 2
    assert not [key for key in samples(after) if job.id in str(key)]  # templates, never raw paths

    with session_scope(sessions) as session:
        session.execute(update(Job).where(Job.id == job.id).values(status="queued"))
    presence.beat(sessions, "host-a:1", ["cpu"], 0)
    later = api.get("/metrics").text
    assert value(later, "loraforge_jobs", status="queued") == 1
    assert value(later, "loraforge_queue_depth", pool="cpu") == 1  # planned onto the cpu pool
    assert value(later, "loraforge_workers_live", pool="cpu") == 1
    assert value(later, "loraforge_workers_live", pool="gpu") == 0
    assert (
        value(
            later,
            "loraforge_http_request_duration_seconds_count",
            method="GET",
            route="unmatched",
            status="404",
        )
        is None
    )
    api.get("/v1/nothing/here")
    assert (
        value(
            api.get("/metrics").text,
            "loraforge_http_request_duration_seconds_count",
            method="GET",
            route="unmatched",
            status="404",
        )
        == 1
    )


RECORD = """
import sys
from loraforge.ops.api_metrics import ApiMetrics
m = ApiMetrics()
for _ in range(int(sys.argv[1])):
    m.requests.labels("GET", "/v1/models", "200").observe(0.01)
"""
SCRAPE = """
import sys
from loraforge.db.session import make_engine, make_sessionmaker
from loraforge.ops.api_metrics import ApiMetrics
from loraforge.settings import Settings
settings = Settings()
sys.stdout.write(ApiMetrics().render(settings, make_sessionmaker(make_engine(settings))).decode())
"""


@pytest.mark.slow  # three Python processes
def test_api_metrics_sum_over_processes_in_multiprocess_mode(settings: Settings, tmp_path: Path) -> None:
    """What ``loraforge api --workers N`` relies on: each uvicorn process writes its own files
    to ``PROMETHEUS_MULTIPROC_DIR`` and whichever answers the scrape reports the sum."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
        "PYTHONPATH": str(REPO / "src"),
        "LORAFORGE_HOME": str(settings.home),
        "LORAFORGE_TRAIN_POOLS": json.dumps([{"name": "cpu", "device": "cpu", "memory_gib": 8}]),
    }
    for count in (3, 4):
        subprocess.run([sys.executable, "-c", RECORD, str(count)], env=env, check=True, timeout=60)
    text = subprocess.run(
        [sys.executable, "-c", SCRAPE], env=env, check=True, timeout=60, capture_output=True, text=True
    ).stdout
    route = {"method": "GET", "route": "/v1/models", "status": "200"}
    assert value(text, "loraforge_http_request_duration_seconds_count", **route) == 7
    assert value(text, "loraforge_jobs", status="queued") == 0


def test_worker_metrics_server_and_throughput_gauge(settings: Settings) -> None:
    metrics = WorkerMetrics()
    port = free_port()
    server = serve_worker_metrics(settings.model_copy(update={"worker_metrics_port": port}), metrics)
    assert server is not None
    try:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
        metrics.throughput("ftjob-1", 1234.5)
        metrics.job_ended("succeeded", 42)
        metrics.webhook_failed(final=False)
        text = httpx.get(f"{base}/metrics").text
        assert value(text, "loraforge_job_trained_tokens_per_second", job_id="ftjob-1") == 1234.5
        assert value(text, "loraforge_job_duration_seconds_count", status="succeeded") == 1
        assert value(text, "loraforge_webhook_delivery_failures_total", final="false") == 1
        metrics.throughput("ftjob-1", None)  # the run ended: the job's series goes away
        assert (
            value(
                httpx.get(f"{base}/metrics").text, "loraforge_job_trained_tokens_per_second", job_id="ftjob-1"
            )
            is None
        )
        assert httpx.get(f"{base}/other").status_code == 404
    finally:
        server.shutdown()
    assert serve_worker_metrics(settings, metrics) is None  # port 0: off


def test_presence_rows_live_age_out_and_are_forgotten(settings: Settings, sessions) -> None:  # type: ignore[no-untyped-def]
    beat = presence.PresenceBeat(
        settings.model_copy(update={"heartbeat_seconds": 0.05}), sessions, "host-c:3"
    )
    beat.start(["cpu"])
    deadline = time.monotonic() + 10
    while not presence.live_workers(settings, sessions) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [(w.worker_id, w.pools) for w in presence.live_workers(settings, sessions)] == [
        ("host-c:3", ["cpu"])
    ]
    beat.stop()  # a clean stop removes the row at once
    assert presence.live_workers(settings, sessions) == []
    presence.beat(sessions, "host-d:4", ["gpu"], 0)
    with session_scope(sessions) as session:
        session.execute(update(WorkerHeartbeat).values(beat_at=1))  # dead for ages
    presence.beat(sessions, "host-e:5", ["gpu"], 0)  # any beat forgets long-dead rows
    with session_scope(sessions) as session:
        assert [r.worker_id for r in session.query(WorkerHeartbeat).all()] == ["host-e:5"]
