"""Pre-flight and chunked uploads against a live loraforge (API + Celery worker + engine), with the
unmodified ``openai`` SDK, on a stack whose ``/v1/files`` limit is small:

* the malformed-file corpus (tests/preflight_corpus.py): every defect answered with its code, line
  and path by the upload check, the worker's file task, the dry run and real jobs; no 5xx;
* the dry run, ``loraforge validate`` and the real job agree (tokens, steps, trained tokens);
* a file over the ``/v1/files`` limit goes up with ``uploads.upload_file_chunked`` and trains.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.helpers import chat_examples, to_jsonl
from tests.integration.conftest import Stack, start_stack, stop_stack
from tests.preflight_corpus import Case, cases, expected_str, find_issue, long_answer_example

pytestmark = pytest.mark.integration

TINY = "loraforge/tiny-llama"
FILES_LIMIT = 60_000  # LORAFORGE_MAX_UPLOAD_BYTES on this stack
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def pf_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory.mktemp("home-preflight"), {"LORAFORGE_MAX_UPLOAD_BYTES": str(FILES_LIMIT)}
    )
    try:
        yield stack
    finally:
        stop_stack(stack)


@pytest.fixture(scope="module")
def statuses() -> list[int]:
    return []


@pytest.fixture(scope="module")
def client(pf_stack: Stack, statuses: list[int]) -> OpenAI:
    http = openai.DefaultHttpxClient(event_hooks={"response": [lambda r: statuses.append(r.status_code)]})
    return OpenAI(
        base_url=pf_stack.base_url, api_key=pf_stack.key("acme"), max_retries=0, timeout=120, http_client=http
    )


def _finish(client: OpenAI, job_id: str, stack: Stack, limit: float = 300) -> Any:
    start = time.monotonic()
    job = client.fine_tuning.jobs.retrieve(job_id)
    while job.status not in TERMINAL:
        if time.monotonic() - start > limit:
            pytest.fail(f"job {job_id} still {job.status}\n{stack.log_tail()}")
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job_id)
    return job


def _dry_run(client: OpenAI, file_id: str, method: str = "supervised", **extra: Any) -> dict[str, Any]:
    return client.fine_tuning.jobs.create(
        model=TINY, training_file=file_id, method={"type": method}, extra_body={"dry_run": True, **extra}
    ).to_dict()


def test_corpus_through_the_live_service(client: OpenAI, pf_stack: Stack, statuses: list[int]) -> None:
    jobs: list[tuple[Case, str, dict[str, Any]]] = []
    for case in cases():
        name = f"{case.name}.jsonl"
        if case.stage == "upload":
            with pytest.raises(openai.BadRequestError) as exc:
                client.files.create(file=(name, io.BytesIO(case.data)), purpose="fine-tune")
            assert expected_str(case) in exc.value.message and f"({case.code})" in exc.value.message
            continue
        uploaded = client.files.create(file=(name, io.BytesIO(case.data)), purpose="fine-tune")
        checked = client.files.wait_for_processing(uploaded.id, poll_interval=0.2, max_wait_seconds=120)
        if case.stage == "file":
            assert checked.status == "error", (case.name, checked.status_details)
            assert expected_str(case) in checked.status_details and f"({case.code})" in checked.status_details
        else:
            assert checked.status == "processed", (case.name, checked.status_details)
        report = _dry_run(client, uploaded.id, case.method)
        if case.stage == "warning":
            assert report["error"] is None and find_issue(report["training_file_report"]["warnings"], case)
            continue
        if not case.job_code:  # a file a job trains (a preference file for a DPO job: test_dpo.py)
            assert report["error"] is None and report["valid"] is True, (case.name, report)
            continue
        if case.code:
            assert find_issue(report["training_file_report"]["errors"], case), (case.name, report)
        assert (report["error"]["code"], report["error"]["param"]) == (case.job_code, case.job_param)
        if case.stage == "file":
            with pytest.raises(openai.BadRequestError) as exc:  # refused at creation, with the details
                client.fine_tuning.jobs.create(
                    model=TINY, training_file=uploaded.id, method={"type": case.method}
                )
            assert expected_str(case) in exc.value.message
        else:
            job = client.fine_tuning.jobs.create(
                model=TINY, training_file=uploaded.id, method={"type": case.method}
            )
            jobs.append((case, job.id, report["error"]))
    assert len(jobs) == len([c for c in cases() if c.stage == "job" and c.job_code])
    for case, job_id, error in jobs:  # the worker's own verdict, against the dry run's
        job = _finish(client, job_id, pf_stack)
        assert job.status == "failed", (case.name, job.status)
        assert job.error.to_dict() == error, case.name
    assert statuses and max(statuses) < 500, sorted(set(statuses))


def test_dry_run_cli_and_real_job_agree(client: OpenAI, pf_stack: Stack, tmp_path: Path) -> None:
    # 19 short examples and one whose answer is cut at tiny-llama's 512 tokens.
    lines = to_jsonl(chat_examples(19)).splitlines() + [long_answer_example()]
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / "train.jsonl"
    path.write_bytes(data)
    uploaded = client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    dry = _dry_run(client, uploaded.id, hyperparameters={"n_epochs": 3})
    cli = pf_stack.cli("validate", str(path), "--model", TINY, "--n-epochs", "3", "--json")
    local = json.loads(cli.stdout)
    assert dry["valid"] and local["valid"] and cli.returncode == 0

    ours, theirs = dict(dry["training_file_report"]), dict(local["training_file_report"])
    assert ours == theirs  # every count, warning and token figure
    assert ours["tokens"]["truncated_examples"] == 1 and ours["n_warnings"] >= 1
    timing = ("estimated_duration_seconds", "throughput_tokens_per_second", "throughput_source")
    assert {k: v for k, v in dry["estimate"].items() if k not in timing} == {
        k: v for k, v in local["estimate"].items() if k not in timing
    }
    assert (
        dry["hyperparameters"]
        == local["hyperparameters"]
        == {
            "n_epochs": 3,
            "batch_size": 4,
            "learning_rate_multiplier": 1.0,
        }
    )

    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=uploaded.id, hyperparameters={"n_epochs": 3}
    )
    job = _finish(client, job.id, pf_stack)
    assert job.status == "succeeded", job.error
    est = dry["estimate"]
    assert job.trained_tokens == est["estimated_trained_tokens"]
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (3, 4)
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200)]
    assert any(m.startswith("Hyperparameters:") and f"({est['total_steps']} steps)" in m for m in messages)
    preflight = next(
        e
        for e in client.fine_tuning.jobs.list_events(job.id, limit=200)
        if e.message.startswith("Pre-flight:")
    )
    assert preflight.data["training_file"]["tokens"] == ours["tokens"]

    # A bad file: the CLI exits 1 with the error the dry run and the job give.
    bad = tmp_path / "seven.jsonl"
    bad.write_bytes(to_jsonl(chat_examples(7)))
    failing = pf_stack.cli("validate", str(bad), "--model", TINY, "--json", check=False)
    assert failing.returncode == 1
    assert json.loads(failing.stdout)["error"]["code"] == "invalid_n_examples"


def test_chunked_upload_over_the_files_limit_trains(client: OpenAI, pf_stack: Stack) -> None:
    data = to_jsonl(chat_examples(240))
    assert len(data) > FILES_LIMIT
    with pytest.raises(openai.APIStatusError) as exc:
        client.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert exc.value.status_code == 413
    upload = client.uploads.upload_file_chunked(
        file=data,
        filename="big.jsonl",
        bytes=len(data),
        mime_type="application/jsonl",
        purpose="fine-tune",
        part_size=25_000,
        md5=hashlib.md5(data).hexdigest(),
    )
    assert upload.status == "completed" and upload.file is not None and upload.file.bytes == len(data)
    checked = client.files.wait_for_processing(upload.file.id, poll_interval=0.2, max_wait_seconds=120)
    assert checked.status == "processed", checked.status_details
    dry = _dry_run(client, upload.file.id, hyperparameters={"n_epochs": 1})
    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=upload.file.id, hyperparameters={"n_epochs": 1}
    )
    job = _finish(client, job.id, pf_stack)
    assert job.status == "succeeded", job.error
    assert job.trained_tokens == dry["estimate"]["estimated_trained_tokens"] > 0
    reply = client.chat.completions.create(
        model=job.fine_tuned_model, messages=chat_examples(1)[0]["messages"][:2], max_tokens=5
    )
    assert reply.choices[0].message.content is not None
