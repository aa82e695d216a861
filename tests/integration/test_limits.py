"""Issue 13 §2 against live loraforge processes, with the unmodified openai SDK: the plans'
request and concurrency limits, the hosted-model limit under simultaneous creations, counters and
idempotency shared by several API processes (PostgreSQL + Redis), storage expiry by the worker's
sweeper, and model deletion taking checkpoints, engine copies and files with it."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
from openai import OpenAI
from sqlalchemy import update

from loraforge.db.models import FileRecord
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.ids import now
from loraforge.settings import Settings
from loraforge.storage import adapter_key, checkpoints_prefix
from loraforge.storage.blobs import BlobStore
from tests.helpers import ANSWER, chat_examples, to_jsonl, training_prompt
from tests.integration.conftest import Stack, free_port, only_embedded

pytestmark = pytest.mark.integration

TINY = "loraforge/tiny-llama"


def _client(stack: Stack, org: str, tier: str | None = None) -> OpenAI:
    return OpenAI(base_url=stack.base_url, api_key=stack.key(org, tier), max_retries=0, timeout=120)


def _stack_settings(stack: Stack) -> Settings:
    return Settings(
        home=stack.home,
        database_url=stack.env.get("LORAFORGE_DATABASE_URL", ""),
        storage_url=stack.env.get("LORAFORGE_STORAGE_URL", ""),
    )


def _stack_store(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> BlobStore:
    """The stack's object store as its processes see it (S3 credentials from the stack's env)."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        if name in stack.env:
            monkeypatch.setenv(name, stack.env[name])
    return BlobStore(_stack_settings(stack).blob_store_url)


def test_requests_per_minute_429_in_the_envelope(stack: Stack) -> None:
    client = _client(stack, "live-rpm-org", "core")
    stack.cli("orgs", "set", "live-rpm-org", "--rpm", "3")
    page = client.models.with_raw_response.list()
    assert page.headers["x-ratelimit-limit-requests"] == "3"
    assert page.headers["x-ratelimit-remaining-requests"] == "2"
    client.files.list()
    client.fine_tuning.jobs.list()
    with pytest.raises(openai.RateLimitError) as exc:
        client.models.list()
    assert exc.value.status_code == 429 and exc.value.code == "rate_limit_exceeded"
    assert exc.value.body["type"] == "requests"  # type: ignore[index]
    headers = exc.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60 and headers["x-ratelimit-remaining-requests"] == "0"


def test_concurrent_requests_over_the_plan_get_429_until_one_ends(stack: Stack) -> None:
    client = _client(stack, "live-busy-org", "core")
    # Before the org's first request: API processes reuse a key's limits for auth_cache_seconds.
    stack.cli("orgs", "set", "live-busy-org", "--max-concurrent", "1")
    big = client.files.create(file=("big.bin", io.BytesIO(b"x" * (24 * 1024 * 1024))), purpose="user_data")
    headers = {"authorization": f"Bearer {stack.key('live-busy-org')}"}
    # A download the client does not read stays in flight: the server blocks on a full socket.
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=60) as slow:
        with slow.stream("GET", f"/files/{big.id}/content") as held:
            assert held.status_code == 200
            with pytest.raises(openai.RateLimitError) as exc:
                client.models.list()
            assert "1 requests in progress" in exc.value.message
            assert exc.value.response.headers["retry-after"] == "1"
    deadline = time.monotonic() + 30  # the slot is given back once the server sees the close
    while True:
        try:
            client.models.list()
            break
        except openai.RateLimitError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    client.files.delete(big.id)


def test_five_simultaneous_job_creations_by_a_trial_org_make_one_job(stack: Stack) -> None:
    client = _client(stack, "live-race-org", "trial")
    file_id = client.files.create(
        file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune"
    ).id
    barrier = threading.Barrier(5)
    outcomes: list[str] = []

    def create() -> None:
        barrier.wait()
        try:
            outcomes.append(client.fine_tuning.jobs.create(model=TINY, training_file=file_id).id)
        except openai.BadRequestError as exc:
            outcomes.append(str(exc.code))

    threads = [threading.Thread(target=create) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    created = [o for o in outcomes if o.startswith("ftjob-")]
    assert len(created) == 1 and sorted(set(outcomes) - set(created)) == ["hosted_model_limit_reached"], (
        outcomes
    )
    assert [j.id for j in client.fine_tuning.jobs.list().data] == created
    client.fine_tuning.jobs.cancel(created[0])


@contextmanager
def _api_process(stack: Stack, *args: str) -> Iterator[str]:
    port = free_port()
    log = (stack.home / f"api-{port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraforge", "api", "--port", str(port), *args],
        env=stack.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (stack.home / f"api-{port}.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "API process not healthy"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_several_api_processes_share_counters_and_idempotency(stack: Stack) -> None:
    if stack.backend == "embedded":
        refused = stack.cli("api", "--workers", "2", check=False)
        assert refused.returncode == 2 and "LORAFORGE_RATE_LIMIT_STORAGE_URL" in refused.stderr
        pytest.skip("several API processes need Redis (the postgres-redis stack)")
    key = stack.key("live-multi-org", "core")
    stack.cli("orgs", "set", "live-multi-org", "--rpm", "6")
    headers = {"authorization": f"Bearer {key}"}
    with _api_process(stack, "--workers", "2") as first, _api_process(stack) as second:
        statuses = [
            httpx.get(f"{url}/v1/models", headers=headers, timeout=30).status_code
            for url in (first, second) * 5
        ]
        assert statuses == [200] * 6 + [429] * 4  # six in all, whichever process answered

        other = {"authorization": f"Bearer {stack.key('live-idem-org', 'core')}"}
        body = to_jsonl(chat_examples(5))
        answers: list[httpx.Response] = []

        def post(url: str) -> None:
            for _ in range(20):  # 409 while the first request with the key is running
                answer = httpx.post(
                    f"{url}/v1/files",
                    headers={**other, "idempotency-key": "same-key"},
                    files={"file": ("i.jsonl", body)},
                    data={"purpose": "fine-tune"},
                    timeout=30,
                )
                if answer.status_code != 409:
                    answers.append(answer)
                    return
                time.sleep(0.2)

        threads = [threading.Thread(target=post, args=(url,)) for url in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].json()["id"] == answers[1].json()["id"]
        listed = httpx.get(f"{second}/v1/files", headers=other, timeout=30).json()["data"]
        assert [f["id"] for f in listed] == [answers[0].json()["id"]]


def test_expired_files_are_swept_by_the_worker(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(stack, "live-expiry-org")
    doomed = client.files.create(
        file=("e.jsonl", io.BytesIO(to_jsonl(chat_examples(5)))),
        purpose="fine-tune",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    store = _stack_store(stack, monkeypatch)
    blob = next(key for key in store.find("files") if key.endswith(f"/{doomed.id}"))
    settings = _stack_settings(stack)
    engine = make_engine(settings)
    with session_scope(make_sessionmaker(engine)) as session:
        session.execute(update(FileRecord).where(FileRecord.id == doomed.id).values(expires_at=now() - 1))
    engine.dispose()
    assert doomed.id not in [f.id for f in client.files.list().data]
    deadline = time.monotonic() + 60  # the worker sweeps every LORAFORGE_STORAGE_SWEEP_SECONDS (1 s)
    while store.exists(blob):
        assert time.monotonic() < deadline, f"expired file still stored\n{stack.log_tail()}"
        time.sleep(0.2)


def _adapter_dirs(stack: Stack, job_id: str) -> list[str]:
    """The job's adapter and checkpoints still stored: in the object store, or as the worker's
    working copies on this machine (the embedded stack runs the worker here)."""
    store = BlobStore(_stack_settings(stack).blob_store_url)
    stored = [adapter_key(job_id)] if store.exists(adapter_key(job_id)) else []
    stored += [f"{checkpoints_prefix(job_id)}/{name}" for name in store.names(checkpoints_prefix(job_id))]
    local = [stack.home / "adapters" / job_id, *(stack.home / "runs" / job_id / "checkpoints").glob("step-*")]
    return stored + [str(path) for path in local if path.is_dir()]


def test_deleting_models_takes_checkpoints_engine_copies_and_files(stack: Stack) -> None:
    only_embedded(stack)
    client = _client(stack, "live-delete-org")
    file_id = client.files.create(
        file=("train.jsonl", io.BytesIO(to_jsonl(chat_examples(20)))), purpose="fine-tune"
    ).id
    job = client.fine_tuning.jobs.create(model=TINY, training_file=file_id, hyperparameters={"n_epochs": 20})
    deadline = time.monotonic() + 240
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job.status}\n{stack.log_tail()}"
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", f"{job.error}\n{stack.log_tail()}"
    model = job.fine_tuned_model or ""
    checkpoints = [c.fine_tuned_model_checkpoint for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
    assert checkpoints and all(c.startswith(model + ":ckpt-step-") for c in checkpoints)
    stored = _adapter_dirs(stack, job.id)
    assert len([ref for ref in stored if not ref.startswith("/")]) == 1 + len(checkpoints)
    answer = client.chat.completions.create(model=checkpoints[0], messages=training_prompt(3), temperature=0)
    assert answer.choices[0].message.content  # served (and so loaded into the engine)

    deleted = client.models.delete(checkpoints[0])
    assert (deleted.id, deleted.deleted) == (checkpoints[0], True)
    engine_adapters = httpx.get(f"{stack.engine_url}/health", timeout=10).json().get("adapters", [])
    assert checkpoints[0] not in engine_adapters
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=checkpoints[0], messages=training_prompt(3))
    gone = f"step-{int(checkpoints[0].rsplit('-', 1)[1]):07d}"
    assert _adapter_dirs(stack, job.id) == [ref for ref in stored if not ref.endswith(gone)]

    reply = client.chat.completions.create(
        model=model, messages=training_prompt(3), temperature=0, max_tokens=40
    )
    assert reply.choices[0].message.content == ANSWER
    assert client.models.delete(model).deleted is True
    assert _adapter_dirs(stack, job.id) == []
    listed = {m.id for m in client.models.list().data}
    headers = {"authorization": f"Bearer {stack.key('live-delete-org')}"}
    for name in [model, *checkpoints[1:]]:
        assert name not in listed
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=name, messages=training_prompt(3))
        export = httpx.get(f"{stack.base_url}/models/{name}/export", headers=headers, timeout=30)
        assert export.status_code == 404
