"""Untrusted input in process: JSON numbers, cursors, download names, body limits, headers."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select

from loraforge.api.app import create_app
from loraforge.api.downloads import content_disposition
from loraforge.db.models import Job, JobCheckpoint, JobEvent
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.settings import Settings
from tests.conftest import RecordingDispatcher
from tests.helpers import chat_examples, to_jsonl

TINY = "loraforge/tiny-llama"
HI = [{"role": "user", "content": "hi"}]


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def post_raw(api: TestClient, key: str, path: str, text: str) -> Any:
    return api.post(path, content=text, headers={**auth(key), "content-type": "application/json"})


# ------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize(
    ("text", "param"),
    [
        ('{"model": "%s", "messages": %s, "temperature": NaN}', "temperature"),
        ('{"model": "%s", "messages": %s, "top_p": NaN}', "top_p"),
        ('{"model": "%s", "messages": %s, "max_tokens": Infinity}', "max_tokens"),
        ('{"model": "%s", "messages": %s, "frequency_penalty": -Infinity}', "frequency_penalty"),
        # Not a field anyone validates: relayed as is, it used to make the engine call a 500.
        ('{"model": "%s", "messages": %s, "made_up": NaN}', "made_up"),
        ('{"model": "%s", "messages": %s, "logit_bias": {"42": 1e400}}', "logit_bias.42"),
    ],
)
def test_non_finite_numbers_in_chat_are_400s_naming_the_parameter(
    api: TestClient, make_key, text: str, param: str
) -> None:  # type: ignore[no-untyped-def]
    resp = post_raw(
        api, make_key("acme"), "/v1/chat/completions", text % (TINY, '[{"role": "user", "content": "hi"}]')
    )
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_number", error
    assert f"'{param}'" in error["message"] and "finite number" in error["message"]


def test_non_finite_and_unreadable_numbers_elsewhere(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    key = make_key("acme")
    job = post_raw(
        api,
        key,
        "/v1/fine_tuning/jobs",
        '{"model": "m", "training_file": "file-x", "hyperparameters": {"learning_rate_multiplier": NaN}}',
    )
    assert (
        job.status_code == 400 and job.json()["error"]["param"] == "hyperparameters.learning_rate_multiplier"
    )
    upload = post_raw(
        api, key, "/v1/uploads", '{"bytes": Infinity, "filename": "a.jsonl", "purpose": "fine-tune"}'
    )
    assert upload.status_code == 400 and upload.json()["error"]["param"] == "bytes"
    # Python refuses to convert integers of more than 4,300 digits: a 400, not a 500.
    huge = post_raw(
        api, key, "/v1/chat/completions", '{"model": "m", "messages": [], "seed": %s}' % ("9" * 5000)
    )
    assert huge.status_code == 400 and huge.json()["error"]["code"] == "invalid_number", huge.text
    not_json = post_raw(api, key, "/v1/chat/completions", '{"model": ')
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"


# ------------------------------------------------------------------------------------ cursors
def _refusals(api: TestClient, key: str, path: str, foreign: str) -> tuple[Any, Any]:
    """The answers to ``after=<another org's id>`` and ``after=<an id nobody has>``."""
    random_id = re.sub(r"[A-Za-z0-9]{6}$", "Zz9Zz9", foreign)
    assert random_id != foreign
    theirs = api.get(path, params={"after": foreign}, headers=auth(key))
    nobodys = api.get(path, params={"after": random_id}, headers=auth(key))
    return theirs, nobodys


def test_another_orgs_cursor_answers_like_a_random_id_on_every_list(
    api: TestClient, make_key, settings: Settings
) -> None:  # type: ignore[no-untyped-def]
    acme, other = make_key("acme"), make_key("other")
    ids: dict[str, str] = {}
    for name, key in (("acme", acme), ("other", other)):
        client = OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)
        f = client.files.create(
            file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(12)))), purpose="fine-tune"
        )
        job = client.fine_tuning.jobs.create(model=TINY, training_file=f.id)
        hook = client.webhooks.create(
            event_types=["fine_tuning.job.failed"], name="h", url="https://example.com/h"
        )
        ids |= {f"{name}.file": f.id, f"{name}.job": job.id, f"{name}.hook": hook.id}
    engine = make_engine(settings)
    with session_scope(make_sessionmaker(engine)) as session:
        for name in ("acme", "other"):
            job = session.execute(select(Job).where(Job.id == ids[f"{name}.job"])).scalar_one()
            ids[f"{name}.event"] = session.execute(
                select(JobEvent.id).where(JobEvent.job_id == job.id).limit(1)
            ).scalar_one()
            ckpt = JobCheckpoint(
                id=f"ftckpt-{name}000000",
                org_id=job.org_id,
                job_id=job.id,
                step_number=1,
                fine_tuned_model_checkpoint=f"ft:{TINY}:{name}::x:ckpt-step-1",
                base_model=TINY,
                adapter_path="/nowhere",
                metrics={},
                created_at=1,
            )
            session.add(ckpt)
            ids[f"{name}.ckpt"] = ckpt.id
    engine.dispose()
    job = ids["acme.job"]
    lists = {
        "/v1/files": ids["other.file"],
        "/v1/fine_tuning/jobs": ids["other.job"],
        f"/v1/fine_tuning/jobs/{job}/events": ids["other.event"],
        f"/v1/fine_tuning/jobs/{job}/checkpoints": ids["other.ckpt"],
        "/v1/webhook_endpoints": ids["other.hook"],
    }
    for path, foreign in lists.items():
        theirs, nobodys = _refusals(api, acme, path, foreign)
        assert theirs.status_code == nobodys.status_code == 400, (path, theirs.text)
        mine, random = theirs.json()["error"], nobodys.json()["error"]
        assert mine["message"].replace(foreign, "ID") == random["message"].replace(
            re.sub(r"[A-Za-z0-9]{6}$", "Zz9Zz9", foreign), "ID"
        ), path
        assert (
            mine["param"] == random["param"] == "after" and mine["code"] == random["code"] == "invalid_cursor"
        )


# ---------------------------------------------------------------------------------- downloads
@pytest.mark.parametrize(
    "name",
    [
        "ファイル名.jsonl",
        "x; filename*=UTF-8''evil.sh; y.jsonl",
        "a\\b;c=d.jsonl",
        "Café résumé.jsonl",
    ],
)
def test_download_names_are_encoded_not_injected(api: TestClient, make_key, name: str) -> None:  # type: ignore[no-untyped-def]
    client = OpenAI(base_url="http://testserver/v1", api_key=make_key("acme"), http_client=api, max_retries=0)
    data = to_jsonl(chat_examples(10))
    uploaded = client.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune")
    assert client.files.retrieve(uploaded.id).filename == name
    resp = api.get(f"/v1/files/{uploaded.id}/content", headers=auth(make_key("acme")))
    assert resp.status_code == 200 and resp.content == data
    header = resp.headers["content-disposition"]
    header.encode("ascii")  # a header is ASCII; a raw non-ASCII name used to make this a 500
    # Exactly one quoted fallback and one filename* parameter: nothing the name could add.
    match = re.fullmatch(
        r"attachment; filename=\"([^\"\\;]*)\"; filename\*=UTF-8''([A-Za-z0-9%!#$&+\-.^_`|~]+)", header
    )
    assert match, header
    from urllib.parse import unquote

    assert unquote(match.group(2)) == name


def test_content_disposition_of_names_with_quotes_and_line_breaks() -> None:
    header = content_disposition("x.jsonl\"; filename*=UTF-8''evil.sh\r\nSet-Cookie: a=b")
    assert header.count("filename*=") == 1 and "\r" not in header and "\n" not in header
    assert header.startswith('attachment; filename="x.jsonl__ filename__UTF-8__evil.shSet-Cookie_ a_b"; ')
    assert content_disposition("ファイル名.jsonl").startswith('attachment; filename="file.jsonl"; ')


# ------------------------------------------------------------------------------- body limits
@pytest.fixture
def small_api(settings: Settings) -> Iterator[TestClient]:
    limited = settings.model_copy(update={"max_request_bytes": 4096})
    with TestClient(create_app(limited, dispatcher=RecordingDispatcher())) as client:
        yield client


def test_bodies_over_the_limit_are_413s_before_parsing(small_api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    key = make_key("acme")
    big = '{"model": "m", "messages": [{"role": "user", "content": "%s"}]}' % ("x" * 10_000)
    declared = post_raw(small_api, key, "/v1/chat/completions", big)
    assert declared.status_code == 413, declared.text
    assert declared.json()["error"]["code"] == "request_too_large"
    assert "4096 bytes" in declared.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 1000

    chunked = small_api.post(
        "/v1/fine_tuning/jobs", content=chunks(), headers={**auth(key), "content-type": "application/json"}
    )
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    # Uploads have their own (larger) limits.
    data = to_jsonl(chat_examples(60))
    assert len(data) > 4096
    upload = small_api.post(
        "/v1/files", headers=auth(key), files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"}
    )
    assert upload.status_code == 200, upload.text


# ----------------------------------------------------------------------------------- headers
def test_pages_and_answers_carry_protective_headers(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    page = api.get("/")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert re.search(r"script-src 'self' 'sha256-[A-Za-z0-9+/=]+'", policy) and "unsafe" not in policy
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    asset = api.get("/static/js/main.js")
    assert asset.headers["content-security-policy"] == policy
    answer = api.get("/v1/models", headers=auth(make_key("acme")))
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    # Swagger UI loads from a CDN: off by default; the OpenAPI document stays.
    assert api.get("/docs").status_code == 404 and api.get("/redoc").status_code == 404
    assert api.get("/openapi.json").status_code == 200


def test_docs_can_be_turned_on(settings: Settings) -> None:
    with TestClient(
        create_app(settings.model_copy(update={"api_docs": True}), RecordingDispatcher())
    ) as client:
        docs = client.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        assert "content-security-policy" not in docs.headers
