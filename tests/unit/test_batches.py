"""The Batch API (issue 16, point 3) through the unmodified SDK, with the worker's side run in
process against a vLLM-style engine on a real port: a batch on a fine-tuned model ends with its
output and error files, answers validate against OpenAI's ``Batch`` schema, a bad input file is
refused with every problem listed, the plans' size limits, cancel and expiry keep the results so
far, and a worker SIGKILLed mid-batch is resumed without running a finished line again."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from openai import BadRequestError, NotFoundError, OpenAI
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.models import Batch, BatchResult, FineTunedModel, Organization
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.plans import BATCH_REQUEST_LIMITS
from loraforge.settings import Settings
from loraforge.worker.batch_reaper import stranded
from loraforge.worker.batches import run_batch
from tests.conftest import TEST_POOLS, RecordingDispatcher
from tests.net import serve_in_thread
from tests.unit.test_openapi_schemas import assert_valid

TINY = "loraforge/tiny-llama"
FT = "ft:tiny-llama:acme:support:abc123"
CHAT = "/v1/chat/completions"


def line(custom_id: str, model: str = FT, **body: Any) -> dict[str, Any]:
    """One request of a batch input file; the user turn names the request."""
    messages = [{"role": "user", "content": f"request {custom_id}"}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": model, "messages": messages, **body},
    }


def jsonl(items: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in items).encode()


class FakeEngine:
    """A vLLM-style engine: adapters answer only once loaded (404 before, then hot-loaded by the
    fleet); each answer echoes the request's user turn; ``max_tokens: 0`` is refused with a 400;
    every request it answers is counted by its user turn. ``delay`` slows each answer."""

    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.seen: list[str] = []
        self.delay = 0.0
        self.app = FastAPI()
        self.app.post("/v1/load_lora_adapter")(self.load)
        self.app.post("/v1/chat/completions")(self.chat)

    async def load(self, request: Request) -> JSONResponse:
        self.loaded.append((await request.json())["lora_name"])
        return JSONResponse("ok")

    async def chat(self, request: Request) -> JSONResponse:
        import asyncio

        body = await request.json()
        if body["model"] != TINY and body["model"] not in self.loaded:
            error = {
                "message": f"The model `{body['model']}` does not exist.",
                "type": "NotFoundError",
                "code": 404,
            }
            return JSONResponse({"error": error}, status_code=404)
        if body.get("max_tokens") == 0:
            error = {
                "message": "max_tokens must be at least 1",
                "type": "invalid_request_error",
                "code": "invalid_value",
            }
            return JSONResponse({"error": error}, status_code=400)
        await asyncio.sleep(self.delay)
        content = body["messages"][-1]["content"]
        self.seen.append(content)
        return JSONResponse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"echo {content}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        )


@pytest.fixture
def engine() -> Iterator[tuple[str, FakeEngine]]:
    fake = FakeEngine()
    with serve_in_thread(fake.app) as url:
        yield url, fake


@pytest.fixture
def settings(tmp_path: Path, migrated_sqlite: Path) -> Settings:
    """The suite's settings, with room for a 1,001-request upload."""
    settings = Settings(home=tmp_path / "home", max_upload_bytes=1024 * 1024, train_pools=TEST_POOLS)
    if not settings.database_url:
        settings.home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(migrated_sqlite, settings.home / "loraforge.sqlite")
    return settings


@pytest.fixture
def sessions(settings: Settings, api: TestClient) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)  # the api fixture has migrated the database
    yield make_sessionmaker(engine)
    engine.dispose()


def sdk(api: TestClient, key: str) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)


def fine_tune(sessions: sessionmaker[Session], org_name: str) -> None:
    """Register ``FT`` for the org, as a finished job does."""
    with session_scope(sessions) as session:
        org_id = session.execute(select(Organization.id).where(Organization.name == org_name)).scalar_one()
        session.add(
            FineTunedModel(
                id=FT,
                org_id=org_id,
                job_id="ftjob-x",
                base_model=TINY,
                adapter_path="adapters/ftjob-x",
                created_at=1,
            )
        )


def worker(settings: Settings, url: str, chunk_seconds: float = 60.0) -> Settings:
    """The worker's settings: the same home, the fake engine serving the tiny model."""
    return settings.model_copy(update={"engines": {TINY: [url]}, "batch_chunk_seconds": chunk_seconds})


def drive(
    settings: Settings, sessions: sessionmaker[Session], batch_id: str, token: int, stretches: int = 100
) -> int:
    """Run the batch's tasks as the worker would, each sending the next; return the last token."""
    for _ in range(stretches):
        following = run_batch(settings, sessions, batch_id, token)
        if following is None:
            return token
        token = following.token
    return token


def output_lines(client: OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.files.content(file_id).text.splitlines()]


def test_a_batch_on_a_fine_tuned_model_writes_its_output_and_error_files(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions, dispatcher: RecordingDispatcher, engine
) -> None:
    url, fake = engine
    client = sdk(api, make_key("acme"))
    fine_tune(sessions, "acme")
    items = [line("a"), line("b"), line("c", max_tokens=0), line("d"), line("e")]
    uploaded = client.files.create(file=("requests.jsonl", io.BytesIO(jsonl(items))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h", metadata={"run": "nightly"}
    )
    assert batch.status == "validating" and batch.model == FT and batch.request_counts.total == 5
    assert batch.metadata == {"run": "nightly"} and dispatcher.batches == [(batch.id, 1)]
    assert_valid(api.get(f"/v1/batches/{batch.id}", headers=client.auth_headers).json(), "Batch")

    drive(worker(settings, url), sessions, batch.id, 1)

    done = client.batches.retrieve(batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 4, 1)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.usage is not None and (done.usage.input_tokens, done.usage.output_tokens) == (12, 8)
    assert fake.loaded == [FT]  # the fleet hot-loaded the fine-tune into the engine
    assert done.output_file_id and done.error_file_id
    output = output_lines(client, done.output_file_id)
    assert [o["custom_id"] for o in output] == ["a", "b", "d", "e"]  # input order
    for o, custom_id in zip(output, "abde", strict=True):
        assert o["error"] is None and o["response"]["status_code"] == 200 and o["id"].startswith("batch_req_")
        assert o["response"]["body"]["model"] == FT
        assert o["response"]["body"]["choices"][0]["message"]["content"] == f"echo request {custom_id}"
    (error,) = output_lines(client, done.error_file_id)
    assert error["custom_id"] == "c" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["message"] == "max_tokens must be at least 1"
    files = client.files.retrieve(done.output_file_id)
    assert files.purpose == "batch_output" and files.filename == f"{batch.id}_output.jsonl"
    with session_scope(sessions) as session:  # the per-request results are gone into the files
        assert session.execute(select(func.count()).select_from(BatchResult)).scalar_one() == 0

    headers = client.auth_headers
    assert_valid(api.get(f"/v1/batches/{batch.id}", headers=headers).json(), "Batch")
    second = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    page = api.get("/v1/batches", headers=headers, params={"limit": 1}).json()
    assert_valid(page, "ListBatchesResponse")
    assert [b["id"] for b in page["data"]] == [second.id] and page["has_more"] is True
    assert [b.id for b in client.batches.list(limit=1, after=second.id)] == [batch.id]
    assert [b.id for b in client.batches.list()] == [second.id, batch.id]
    with pytest.raises(NotFoundError):
        sdk(api, make_key("other")).batches.retrieve(batch.id)


def test_a_bad_input_file_is_refused_with_every_problem_listed(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))

    def create(data: bytes, purpose: str = "batch", **kw: Any) -> Any:
        f = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose=purpose)  # type: ignore[arg-type]
        args = {"input_file_id": f.id, "endpoint": CHAT, "completion_window": "24h", **kw}
        return client.batches.create(**args)

    good = jsonl([line("a", model=TINY)])
    with pytest.raises(BadRequestError) as refused:
        create(good, purpose="fine-tune")
    assert refused.value.code == "invalid_file_purpose" and refused.value.param == "input_file_id"
    broken = (
        jsonl([line("a", model=TINY)])
        + b"{not json\n"
        + jsonl(
            [{**line("c", model=TINY), "url": "/v1/embeddings"}, line("a", model=TINY), {"custom_id": "e"}]
        )
    )
    with pytest.raises(BadRequestError) as refused:
        create(broken)
    message = refused.value.message
    assert "4 invalid line(s)" in message and "Line 2 is not valid JSON" in message
    assert "Line 3: 'url' must be the batch's endpoint" in message
    assert "Line 4: custom_id 'a' is used twice" in message and "Line 5: 'method' must be 'POST'" in message
    with pytest.raises(BadRequestError) as refused:
        create(jsonl([line("a", model=TINY), line("b", model="loraforge/other")]))
    assert refused.value.code == "mixed_models"
    with pytest.raises(NotFoundError) as missing:
        create(jsonl([line("a", model="ft:nobody")]))
    assert missing.value.code == "model_not_found"
    with pytest.raises(BadRequestError) as refused:
        create(good, endpoint="/v1/embeddings")
    assert refused.value.param == "endpoint"
    with pytest.raises(BadRequestError) as refused:
        create(b"\n\n")
    assert refused.value.code == "empty_file"
    with pytest.raises(NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")


def test_the_plans_cap_the_requests_of_one_batch(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    assert BATCH_REQUEST_LIMITS == {"trial": 1_000, "core": 100_000, "scale": 500_000, "enterprise": None}
    data = jsonl([line(str(i), model=TINY) for i in range(1_001)])
    trial = sdk(api, make_key("small", tier="trial"))
    f = trial.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch")
    with pytest.raises(BadRequestError) as refused:
        trial.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert refused.value.code == "batch_too_large" and refused.value.status_code == 400
    assert "1001 requests; the trial plan allows at most 1000" in refused.value.message
    core = sdk(api, make_key("bigger", tier="core"))
    f = core.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch")
    batch = core.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert batch.request_counts.total == 1_001


def test_cancel_keeps_the_results_so_far_and_expiry_lists_the_requests_never_run(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions, engine
) -> None:
    url, fake = engine
    client = sdk(api, make_key("acme"))
    items = jsonl([line(c, model=TINY) for c in "abcd"])
    f = client.files.create(file=("in.jsonl", io.BytesIO(items)), purpose="batch")
    # Stretches of one request each (the time is up after every request).
    step = worker(settings, url, chunk_seconds=1e-6)

    batch = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    following = run_batch(step, sessions, batch.id, 1)
    assert following is not None and client.batches.retrieve(batch.id).request_counts.completed == 1
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    assert run_batch(step, sessions, batch.id, following.token) is None
    cancelled = client.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at and cancelled.error_file_id is None
    assert cancelled.output_file_id and [
        o["custom_id"] for o in output_lines(client, cancelled.output_file_id)
    ] == ["a"]
    with pytest.raises(BadRequestError) as refused:
        client.batches.cancel(batch.id)
    assert refused.value.code == "batch_not_cancellable"

    late = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    following = run_batch(step, sessions, late.id, 1)
    assert following is not None
    with session_scope(sessions) as session:
        session.execute(update(Batch).where(Batch.id == late.id).values(expires_at=int(time.time()) - 1))
    assert run_batch(step, sessions, late.id, following.token) is None
    expired = client.batches.retrieve(late.id)
    assert expired.status == "expired" and expired.expired_at
    assert (expired.request_counts.completed, expired.request_counts.failed) == (1, 3)
    assert expired.error_file_id is not None
    unrun = output_lines(client, expired.error_file_id)
    assert [u["custom_id"] for u in unrun] == ["b", "c", "d"]
    assert all(u["response"] is None and u["error"]["code"] == "batch_expired" for u in unrun)
    assert fake.seen == ["request a", "request a"]  # one request of each batch ran


def test_a_stale_task_stops_and_a_lapsed_lease_is_sent_again(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions, engine
) -> None:
    url, fake = engine
    client = sdk(api, make_key("acme"))
    f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl([line("a", model=TINY)]))), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    step = worker(settings, url)
    assert stranded(step, sessions) == []  # its lease (from creation) is fresh
    with session_scope(sessions) as session:  # nobody took its task for longer than the lease
        session.execute(update(Batch).where(Batch.id == batch.id).values(heartbeat_at=1))
    assert stranded(step, sessions) == [(batch.id, 2)]
    assert stranded(step, sessions) == []  # sent once
    assert run_batch(step, sessions, batch.id, 1) is None  # the first task, taken late, stops
    assert client.batches.retrieve(batch.id).status == "validating" and fake.seen == []
    drive(step, sessions, batch.id, 2)
    assert client.batches.retrieve(batch.id).status == "completed" and fake.seen == ["request a"]


_WORKER = """
import sys
from loraforge.db.session import make_engine, make_sessionmaker
from loraforge.settings import Settings
from loraforge.worker.batches import run_batch

settings = Settings.model_validate_json(sys.argv[1])
run_batch(settings, make_sessionmaker(make_engine(settings)), sys.argv[2], 1)
"""


@pytest.mark.slow
def test_a_worker_killed_mid_batch_is_resumed_without_running_a_finished_line_again(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions, engine
) -> None:
    url, fake = engine
    fake.delay = 0.1
    client = sdk(api, make_key("acme"))
    names = [f"r{i:02d}" for i in range(12)]
    f = client.files.create(
        file=("in.jsonl", io.BytesIO(jsonl([line(n, model=TINY) for n in names]))), purpose="batch"
    )
    batch = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    step = worker(settings, url)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER, step.model_dump_json(), batch.id],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        deadline = time.monotonic() + 60
        while client.batches.retrieve(batch.id).request_counts.completed < 4:
            assert proc.poll() is None and time.monotonic() < deadline, "the worker did not get going"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = client.batches.retrieve(batch.id)
    assert killed.status == "in_progress" and 4 <= killed.request_counts.completed < len(names)
    finished = killed.request_counts.completed
    seen_before = list(fake.seen)

    # The restarted worker's reaper: the dead process on this host held the batch, so it is sent
    # again at once, without waiting for the lease to lapse.
    resent = stranded(step, sessions)
    assert resent == [(batch.id, 2)]
    drive(step, sessions, batch.id, 2)

    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts.completed == len(names)
    assert done.output_file_id
    assert [o["custom_id"] for o in output_lines(client, done.output_file_id)] == names
    # Every line ran once, but for the one in flight when the worker died (at most one).
    ran = [s.removeprefix("request ") for s in fake.seen]
    assert sorted(set(ran)) == names
    again = [n for n in names if ran.count(n) > 1]
    assert len(again) <= 1 and len(seen_before) - finished <= 1
    assert all(n not in again for n in names[:finished])
