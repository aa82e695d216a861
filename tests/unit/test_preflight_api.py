"""The malformed-file corpus through the unmodified SDK against the API in process: the upload's
synchronous check, the file pre-flight task (run here as the worker runs it), the dry run and the
job's validation each name the defect's code, line and path, and nothing answers 5xx."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.session import make_engine, make_sessionmaker
from loraforge.jobs import file_checks
from loraforge.settings import Settings
from tests.conftest import RecordingDispatcher
from tests.helpers import chat_examples, to_jsonl
from tests.preflight_corpus import Case, cases, expected_str, find_issue

TINY = "loraforge/tiny-llama"


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def statuses(api: TestClient) -> list[int]:
    """Every HTTP status the API answered during the test."""
    seen: list[int] = []
    api.event_hooks["response"].append(lambda response: seen.append(response.status_code))
    return seen


def sdk(api: TestClient, key: str) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)


def _dry_run(client: OpenAI, file_id: str, method: str, **extra: Any) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the SDK parses the answer as a FineTuningJob without complaint
        reply = client.fine_tuning.jobs.create(
            model=TINY, training_file=file_id, method={"type": method}, extra_body={"dry_run": True, **extra}
        )
        return reply.to_dict()


@pytest.mark.slow  # the whole defect corpus through the API
def test_corpus_through_the_sdk(  # type: ignore[no-untyped-def]
    api: TestClient,
    make_key,
    settings: Settings,
    sessions: sessionmaker[Session],
    dispatcher: RecordingDispatcher,
    statuses: list[int],
) -> None:
    client = sdk(api, make_key("acme"))
    for case in cases():
        _check_case(client, case, settings, sessions, dispatcher)
    assert statuses and all(code < 500 for code in statuses), sorted(set(statuses))


def _check_case(
    client: OpenAI,
    case: Case,
    settings: Settings,
    sessions: sessionmaker[Session],
    dispatcher: RecordingDispatcher,
) -> None:
    name = f"{case.name}.jsonl"
    if case.stage == "upload":
        with pytest.raises(openai.BadRequestError) as exc:
            client.files.create(file=(name, io.BytesIO(case.data)), purpose="fine-tune")
        assert exc.value.code == "invalid_file_format" and exc.value.param == "file", case.name
        assert f"{expected_str(case)}" in exc.value.message and f"({case.code})" in exc.value.message, (
            case.name,
            exc.value.message,
        )
        return
    uploaded = client.files.create(file=(name, io.BytesIO(case.data)), purpose="fine-tune")
    assert uploaded.status == "uploaded" and dispatcher.files_validated[-1] == uploaded.id
    file_checks.validate_file_record(settings, sessions, uploaded.id)  # what the worker's task does
    checked = client.files.retrieve(uploaded.id)
    if case.stage == "file":
        assert checked.status == "error", (case.name, checked.status_details)
        assert (
            f"{expected_str(case)}" in checked.status_details and f"({case.code})" in checked.status_details
        )
    else:
        assert checked.status == "processed", (case.name, checked.status_details)

    report = _dry_run(client, uploaded.id, case.method)
    assert report["object"] == "fine_tuning.job.dry_run" and report["training_file"] == uploaded.id
    if case.stage == "warning":
        assert report["valid"] and report["error"] is None
        assert find_issue(report["training_file_report"]["warnings"], case), report["training_file_report"]
        return
    if case.code:
        errors = report["training_file_report"]["errors"]
        assert find_issue(errors, case), (case.name, errors)
    if not case.job_code:  # a job trains the file (a preference file for a DPO job)
        assert report["valid"] and report["error"] is None, (case.name, report["error"])
        return
    assert report["error"]["code"] == case.job_code and report["error"]["param"] == case.job_param

    if case.stage == "file":
        # A file that failed its check is refused at job creation, with the check's details.
        with pytest.raises(openai.BadRequestError) as exc:
            client.fine_tuning.jobs.create(
                model=TINY, training_file=uploaded.id, method={"type": case.method}
            )
        assert expected_str(case) in exc.value.message
        return
    job = client.fine_tuning.jobs.create(model=TINY, training_file=uploaded.id, method={"type": case.method})
    assert job.status == "validating_files" and dispatcher.validated[-1] == job.id
    assert file_checks.validate_job_files(settings, sessions, job.id) is False  # the worker's check
    failed = client.fine_tuning.jobs.retrieve(job.id)
    assert failed.status == "failed" and failed.error is not None
    assert (failed.error.code, failed.error.param) == (case.job_code, case.job_param), failed.error
    assert failed.error.message == report["error"]["message"]


def test_dry_run_matches_the_job_and_stores_nothing(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    client = sdk(api, make_key("acme"))
    data = to_jsonl(chat_examples(23))
    f = client.files.create(file=("t.jsonl", io.BytesIO(data)), purpose="fine-tune")
    report = _dry_run(client, f.id, "supervised", hyperparameters={"n_epochs": 3})
    assert client.fine_tuning.jobs.list().data == []  # nothing created
    assert report["valid"] and report["error"] is None
    est = report["estimate"]
    assert report["hyperparameters"] == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}
    assert (est["steps_per_epoch"], est["total_steps"]) == (6, 18)
    tokens = report["training_file_report"]["tokens"]
    assert est["estimated_trained_tokens"] == 3 * tokens["trained_tokens"] > 0
    assert isinstance(est["estimated_duration_seconds"], int) and est["estimated_duration_seconds"] > 0

    job = client.fine_tuning.jobs.create(model=TINY, training_file=f.id, hyperparameters={"n_epochs": 3})
    assert file_checks.validate_job_files(settings, sessions, job.id) is True
    queued = client.fine_tuning.jobs.retrieve(job.id)
    assert queued.status == "queued"
    # The job shows the estimate before it runs.
    assert (queued.model_extra or {})["estimate"] == {**est, "throughput_source": "default"}
    events = [e for e in client.fine_tuning.jobs.list_events(job.id) if e.message.startswith("Pre-flight:")]
    assert len(events) == 1
    assert events[0].data["estimate"] == {**est, "throughput_source": "default"}
    assert events[0].data["training_file"]["tokens"] == tokens


def test_dry_run_errors_are_4xx_like_create(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    with pytest.raises(openai.BadRequestError) as exc:
        _dry_run(client, "file-nope", "supervised")
    assert exc.value.param == "training_file"
    f = client.files.create(file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="nope/nope", training_file=f.id, extra_body={"dry_run": True})


def test_upload_check_lists_every_bad_line(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    lines = to_jsonl(chat_examples(10)).splitlines()
    lines[1], lines[6] = b"[1]", b"{oops"
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("t.jsonl", io.BytesIO(b"\n".join(lines))), purpose="fine-tune")
    assert "Line 2 is not" in exc.value.message
    assert "line 2: is a JSON array" in exc.value.message and "line 7: is not valid JSON" in exc.value.message
    assert "2 line(s) in all" in exc.value.message
    assert client.files.list().data == []


def test_upload_refusal_names_every_problem_not_only_broken_json(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    lines = to_jsonl(chat_examples(12)).splitlines()
    lines[1] = b'{"messages": [{"role": "user", "content": "hi"}'  # broken JSON on line 2
    lines[9] = lines[9].replace(b'"role": "user"', b'"role": "bot"')  # an unknown role on line 10
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("t.jsonl", io.BytesIO(b"\n".join(lines))), purpose="fine-tune")
    message = exc.value.message
    assert exc.value.code == "invalid_file_format" and "Line 2 is not" in message
    assert "line 2: is not valid JSON" in message and "(invalid_json)" in message
    assert "line 10: messages[1].role 'bot' is not one of" in message and "(unknown_role)" in message
    assert "2 line(s) in all" in message


def test_file_over_the_size_limit_is_413(api: TestClient, make_key, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    data = to_jsonl(chat_examples(400))
    assert len(data) > settings.max_upload_bytes
    with pytest.raises(openai.APIStatusError) as exc:
        client.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert exc.value.status_code == 413 and exc.value.code == "file_too_large"


def test_task_is_idempotent(
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session]
) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    f = client.files.create(file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune")
    file_checks.validate_file_record(settings, sessions, f.id)
    first = client.files.retrieve(f.id)
    file_checks.validate_file_record(settings, sessions, f.id)
    file_checks.validate_file_record(settings, sessions, "file-gone")
    assert client.files.retrieve(f.id) == first and first.status == "processed"
    assert first.status_details.startswith("10 valid example(s) in 10 line(s), format chat; 0 error(s)")


def test_dispatch_names_the_task(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from loraforge.queue.dispatch import CeleryDispatcher

    sent: list[tuple[str, list[str]]] = []
    dispatcher = CeleryDispatcher(settings)
    monkeypatch.setattr(dispatcher._app, "send_task", lambda name, args: sent.append((name, args)))
    dispatcher.validate_file("file-abc")
    assert sent == [("loraforge.validate_file", ["file-abc"])]
    import loraforge.queue.tasks as tasks

    assert tasks.validate_file_task.name == "loraforge.validate_file"


def test_validation_file_is_checked_the_same_way(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    client = sdk(api, make_key("acme"))
    train = client.files.create(
        file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(12)))), purpose="fine-tune"
    )
    lines = to_jsonl(chat_examples(3)).splitlines()
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "weight": 5, "content": "a"}]}
    lines[1] = json.dumps(bad).encode()
    valid = client.files.create(file=("v.jsonl", io.BytesIO(b"\n".join(lines))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=TINY, training_file=train.id, validation_file=valid.id)
    assert file_checks.validate_job_files(settings, sessions, job.id) is False
    error = client.fine_tuning.jobs.retrieve(job.id).error
    assert (error.code, error.param) == ("invalid_training_file", "validation_file")
    assert "line 2: messages[1].weight must be 0 or 1, got 5" in error.message
    events = {e.message.split(":")[0]: e for e in client.fine_tuning.jobs.list_events(job.id)}
    assert events["validation_file"].level == "error"
    assert events["validation_file"].data["validation_file"][0]["code"] == "invalid_weight"


def test_a_job_cancelled_during_its_preflight_gets_no_event_after_the_cancellation(  # type: ignore[no-untyped-def]
    api: TestClient,
    make_key,
    settings: Settings,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = sdk(api, make_key("acme"))
    f = client.files.create(file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(12)))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=TINY, training_file=f.id)
    real_check = file_checks.run_check

    def cancelled_meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
        check = real_check(*args, **kwargs)
        assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # lands mid-check
        return check

    monkeypatch.setattr(file_checks, "run_check", cancelled_meanwhile)
    assert file_checks.validate_job_files(settings, sessions, job.id) is False
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]  # newest first
    assert messages[0] == "The job was cancelled", messages
    assert not any(m.startswith("Pre-flight:") for m in messages)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
