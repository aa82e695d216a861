"""The API against OpenAI's contract, in process (no worker): envelope, auth, tenancy, pagination."""

from __future__ import annotations

import io

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from tests.conftest import RecordingDispatcher
from tests.helpers import chat_examples, to_jsonl

TINY = "loraforge/tiny-llama"


def sdk(api: TestClient, key: str) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)


def test_missing_and_unknown_keys_get_401_envelope(api: TestClient) -> None:
    resp = api.get("/v1/files")
    assert resp.status_code == 401
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    resp = api.get("/v1/files", headers={"authorization": "Bearer sk-unknown"})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"


def test_upload_list_retrieve_content_delete(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    data = to_jsonl(chat_examples(12))
    created = client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    # A fine-tune file is "uploaded" until the pre-flight task (tests/unit/test_preflight_api.py) runs.
    assert created.object == "file" and created.bytes == len(data) and created.status == "uploaded"
    assert client.files.retrieve(created.id).filename == "train.jsonl"
    assert client.files.content(created.id).read() == data
    assert [f.id for f in client.files.list(purpose="fine-tune")] == [created.id]
    assert client.files.list(purpose="batch").data == []
    deleted = client.files.delete(created.id)
    assert deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)


def test_pagination_follows_after_and_stops(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    ids = [
        client.files.create(file=(f"f{i}.jsonl", io.BytesIO(b'{"a": 1}\n')), purpose="fine-tune").id
        for i in range(5)
    ]
    page = client.files.list(limit=2)
    assert [f.id for f in page.data] == ids[::-1][:2] and page.has_more is True
    assert [f.id for f in client.files.list(limit=2)] == ids[::-1]
    assert [f.id for f in client.files.list(limit=3, order="asc")] == ids
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.list(after="file-nope")
    assert exc.value.param == "after"


def test_upload_limits_and_format(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    with pytest.raises(openai.APIStatusError) as exc:
        client.files.create(file=("big.jsonl", io.BytesIO(b'{"a": 1}\n' * 20000)), purpose="fine-tune")
    assert exc.value.status_code == 413
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("t.jsonl", io.BytesIO(b'{"a": 1}\n[1, 2]\n')), purpose="fine-tune")
    assert "Line 2" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("t.txt", io.BytesIO(b'{"a": 1}\n')), purpose="fine-tune")
    assert exc.value.param == "file"
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("t.jsonl", io.BytesIO(b'{"a": 1}\n')), purpose="nonsense")  # type: ignore[arg-type]
    assert exc.value.param == "purpose"
    # Nothing half-written is left behind: only the blobs of accepted files exist.
    assert client.files.list().data == []


def test_create_job_records_and_dispatches(
    api: TestClient,
    make_key,
    dispatcher: RecordingDispatcher,  # type: ignore[no-untyped-def]
) -> None:
    client = sdk(api, make_key("acme"))
    f = client.files.create(file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="meta-llama/Llama-3.1-8B-Instruct",
        training_file=f.id,
        suffix="s1",
        seed=7,
        metadata={"team": "a b"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    assert job.model == "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"  # alias resolved
    assert job.status == "validating_files" and job.seed == 7
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == "auto"
    assert dispatcher.validated == [job.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "a b"})] == [job.id]
    assert client.fine_tuning.jobs.list(metadata={"team": "x"}).data == []
    events = client.fine_tuning.jobs.list_events(job.id)
    assert [e.message for e in events][-1] == f"Created fine-tuning job: {job.id}"
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and isinstance(cancelled.finished_at, int)
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": TINY}, "training_file"),
        (
            {"model": TINY, "training_file": "F", "hyperparameters": {"n_epochs": 0}},
            "hyperparameters.n_epochs",
        ),
        (
            {"model": TINY, "training_file": "F", "hyperparameters": {"batch_size": 1000}},
            "hyperparameters.batch_size",
        ),
        ({"model": TINY, "training_file": "F", "suffix": "x" * 65}, "suffix"),
        ({"model": TINY, "training_file": "F", "bogus": 1}, "bogus"),
        ({"model": TINY, "training_file": "F", "method": {"type": "reinforcement"}}, "method.type"),
        ({"model": TINY, "training_file": "file-missing"}, "training_file"),
    ],
)
def test_bad_job_bodies_are_400_with_param(api: TestClient, make_key, body: dict, param: str) -> None:  # type: ignore[no-untyped-def]
    key = make_key("acme")
    headers = {"authorization": f"Bearer {key}"}
    f = api.post(
        "/v1/files",
        headers=headers,
        files={"file": ("t.jsonl", to_jsonl(chat_examples(10)))},
        data={"purpose": "fine-tune"},
    ).json()
    if body.get("training_file") == "F":
        body = {**body, "training_file": f["id"]}
    resp = api.post("/v1/fine_tuning/jobs", headers=headers, json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_and_unknown_routes(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    headers = {"authorization": f"Bearer {make_key('acme')}", "content-type": "application/json"}
    resp = api.post("/v1/fine_tuning/jobs", headers=headers, content=b"{not json")
    assert resp.status_code == 400 and "error" in resp.json()
    resp = api.get("/v1/nothing-here", headers=headers)
    assert resp.status_code == 404 and "error" in resp.json()


def test_tenancy_is_404_not_403(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    acme, globex = sdk(api, make_key("acme")), sdk(api, make_key("globex"))
    f = acme.files.create(file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(model=TINY, training_file=f.id)
    for call in (
        lambda: globex.files.retrieve(f.id),
        lambda: globex.files.delete(f.id),
        lambda: globex.fine_tuning.jobs.retrieve(job.id),
        lambda: globex.fine_tuning.jobs.cancel(job.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as exc:  # another org's file cannot be trained on
        globex.fine_tuning.jobs.create(model=TINY, training_file=f.id)
    assert exc.value.param == "training_file"


def test_models_list_and_base_model_paths(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    models = {m.id: m for m in client.models.list()}
    assert {
        TINY,
        "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo",
        "klusterai/Meta-Llama-3.3-70B-Instruct-Turbo",
    } <= set(models)
    assert models[TINY].tags == ["base", "fine-tunable", "servable"]  # type: ignore[attr-defined]
    assert (
        client.models.retrieve("meta-llama/Llama-3.1-8B-Instruct").id
        == "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"
    )
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("ft:nothing:here::abcdefgh")
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.models.delete(TINY)
