"""Our responses validate against OpenAI's own published component schemas, and our
``/openapi.json`` describes every JSON response.

OpenAI's schemas come from ``tests/assets/openai-schemas.json``, an extract of its published spec
(``tests/assets/extract_openai_schemas.py`` says which version and how to refresh it).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.models import FineTunedModel, Job
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.jobs import checkpoints
from loraforge.jobs.file_checks import validate_job_files
from loraforge.jobs.state import JobStatus, add_event, transition
from loraforge.settings import Settings
from tests.helpers import chat_examples, to_jsonl

EXTRACT = Path(__file__).resolve().parents[1] / "assets" / "openai-schemas.json"
TINY = "loraforge/tiny-llama"
# Routes whose answer is not a JSON object of ours: bytes, a tar, the engine's (streamed) answer.
RAW_ROUTES = {
    ("GET", "/v1/files/{file_id}/content"),
    ("GET", "/v1/models/{model}/export"),
    ("POST", "/v1/chat/completions"),
}


@lru_cache
def _openai() -> dict[str, Any]:
    return json.loads(EXTRACT.read_text())


@lru_cache
def _registry() -> Registry:
    return Registry().with_resource(
        "urn:openai", Resource.from_contents(_openai(), default_specification=DRAFT202012)
    )


def assert_valid(instance: Any, schema_name: str) -> None:
    validator = Draft202012Validator(
        {"$ref": f"urn:openai#/components/schemas/{schema_name}"}, registry=_registry()
    )
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, f"{schema_name}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


@pytest.fixture
def sessions(settings: Settings, api: TestClient) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)  # the api fixture has migrated the database
    yield make_sessionmaker(engine)
    engine.dispose()


def _upload_file(api: TestClient, headers: dict[str, str], name: str, **form: str) -> dict[str, Any]:
    r = api.post(
        "/v1/files",
        headers=headers,
        files={"file": (name, io.BytesIO(to_jsonl(chat_examples(10))))},
        data={"purpose": "fine-tune", **form},
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_extract_holds_every_schema_it_references() -> None:
    schemas = _openai()["components"]["schemas"]
    refs = {
        ref.rsplit("/", 1)[-1]
        for ref in _walk_refs(schemas)  # every $ref resolves inside the extract
    }
    assert refs <= set(schemas), refs - set(schemas)
    assert _openai()["info"]["version"]
    assert EXTRACT.stat().st_size < 1_000_000


def _walk_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _walk_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_refs(value)


def test_responses_match_openai_schemas(api: TestClient, make_key, settings: Settings, sessions) -> None:  # type: ignore[no-untyped-def]
    headers = {"authorization": f"Bearer {make_key('acme')}"}
    f = _upload_file(api, headers, "t.jsonl")
    assert_valid(f, "OpenAIFile")
    expiring = _upload_file(
        api, headers, "v.jsonl", **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"}
    )
    assert_valid(expiring, "OpenAIFile")
    assert_valid(api.get("/v1/files", headers=headers).json(), "ListFilesResponse")
    assert_valid(api.get(f"/v1/files/{f['id']}", headers=headers).json(), "OpenAIFile")

    data = to_jsonl(chat_examples(10))
    upload = api.post(
        "/v1/uploads",
        headers=headers,
        json={
            "bytes": len(data),
            "filename": "u.jsonl",
            "mime_type": "application/jsonl",
            "purpose": "fine-tune",
        },
    ).json()
    assert_valid(upload, "Upload")
    part = api.post(
        f"/v1/uploads/{upload['id']}/parts", headers=headers, files={"data": ("p", io.BytesIO(data))}
    ).json()
    assert_valid(part, "UploadPart")
    completed = api.post(
        f"/v1/uploads/{upload['id']}/complete", headers=headers, json={"part_ids": [part["id"]]}
    ).json()
    assert completed["status"] == "completed" and completed["file"] is not None
    assert_valid(completed, "Upload")

    job = api.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={
            "model": TINY,
            "training_file": f["id"],
            "validation_file": expiring["id"],
            "suffix": "x",
            "metadata": {"team": "a"},
        },
    ).json()
    assert_valid(job, "FineTuningJob")
    _run_to_success(settings, sessions, job["id"], f"ft:{TINY}:acme:x:abcdefgh")
    succeeded = api.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=headers).json()
    assert succeeded["status"] == "succeeded" and succeeded["estimate"] and succeeded["plan"]
    assert_valid(succeeded, "FineTuningJob")
    assert_valid(
        api.get("/v1/fine_tuning/jobs", headers=headers).json(), "ListPaginatedFineTuningJobsResponse"
    )
    events = api.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=headers).json()
    assert {e["type"] for e in events["data"]} == {"message", "metrics"}
    assert_valid(events, "ListFineTuningJobEventsResponse")
    for event in events["data"]:
        assert_valid(event, "FineTuningJobEvent")
    page = api.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=headers).json()
    assert len(page["data"]) == 1
    assert_valid(page, "ListFineTuningJobCheckpointsResponse")
    assert_valid(page["data"][0], "FineTuningJobCheckpoint")

    failed = api.post(
        "/v1/fine_tuning/jobs", headers=headers, json={"model": TINY, "training_file": f["id"]}
    ).json()
    with session_scope(sessions) as session:
        error = {"code": "invalid_training_file", "message": "bad", "param": "training_file"}
        transition(session, failed["id"], JobStatus.FAILED, "failed", level="error", error=error)
    assert_valid(api.get(f"/v1/fine_tuning/jobs/{failed['id']}", headers=headers).json(), "FineTuningJob")
    cancelled = api.post(
        "/v1/fine_tuning/jobs", headers=headers, json={"model": TINY, "training_file": f["id"]}
    ).json()
    assert_valid(
        api.post(f"/v1/fine_tuning/jobs/{cancelled['id']}/cancel", headers=headers).json(), "FineTuningJob"
    )

    models = api.get("/v1/models", headers=headers).json()
    assert {m.get("step_number") for m in models["data"]} == {None, 2}  # base, fine-tuned, checkpoint
    assert_valid(models, "ListModelsResponse")
    for model in (TINY, succeeded["fine_tuned_model"], f"{succeeded['fine_tuned_model']}:ckpt-step-2"):
        assert_valid(api.get(f"/v1/models/{model}", headers=headers).json(), "Model")
    deleted = api.delete(f"/v1/models/{succeeded['fine_tuned_model']}", headers=headers).json()
    assert_valid(deleted, "DeleteModelResponse")
    assert_valid(api.delete(f"/v1/files/{expiring['id']}", headers=headers).json(), "DeleteFileResponse")
    assert_valid(api.get("/v1/files/file-nope", headers=headers).json(), "ErrorResponse")


def _run_to_success(settings: Settings, sessions: sessionmaker[Session], job_id: str, name: str) -> None:
    """What a worker records for a job: its pre-flight, metrics, a checkpoint, the model."""
    validate_job_files(settings, sessions, job_id)
    with session_scope(sessions) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(status="running", worker_id="w:1", reserved_model=name)
        )
        add_event(session, job_id, "Step 2/4", type="metrics", data={"step": 2, "train_loss": 0.5})
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        checkpoints.record(session, job, 2, str(settings.home), {"step": 2, "train_loss": 0.5})
        transition(
            session,
            job_id,
            JobStatus.SUCCEEDED,
            "The job has successfully completed",
            expect={"worker_id": "w:1"},
            fine_tuned_model=name,
            trained_tokens=100,
            result_files=["file-results"],
        )
        session.add(
            FineTunedModel(
                id=name,
                org_id=job.org_id,
                job_id=job_id,
                base_model=TINY,
                adapter_path="unused",
                created_at=1,
            )
        )


def test_openapi_describes_every_json_response(api: TestClient) -> None:
    doc = api.get("/openapi.json").json()
    operations = [
        (method.upper(), path, op)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        if (method.upper(), path) not in RAW_ROUTES
    ]
    assert len(operations) >= 27
    for method, path, op in operations:
        ok = next(code for code in op["responses"] if code.startswith("2"))
        schema = op["responses"][ok]["content"]["application/json"]["schema"]
        # A named model (or a union of them), not a free-form object.
        refs = [schema.get("$ref")] + [s.get("$ref") for s in schema.get("anyOf", [])]
        assert any(refs), f"{method} {path}: {schema}"

    schemas = doc["components"]["schemas"]
    status = schemas["FineTuningJob"]["properties"]["status"]
    status = schemas[status["$ref"].rsplit("/", 1)[-1]] if "$ref" in status else status
    assert set(status["enum"]) == {
        "validating_files",
        "queued",
        "running",
        "paused",
        "succeeded",
        "failed",
        "cancelled",
    }
    assert schemas["FineTuningJob"]["properties"]["object"]["const"] == "fine_tuning.job"


@pytest.mark.parametrize(
    "name",
    [
        "OpenAIFile",
        "ListFilesResponse",
        "DeleteFileResponse",
        "Upload",
        "UploadPart",
        "FineTuningJob",
        "ListPaginatedFineTuningJobsResponse",
        "FineTuningJobEvent",
        "ListFineTuningJobEventsResponse",
        "FineTuningJobCheckpoint",
        "ListFineTuningJobCheckpointsResponse",
        "ListModelsResponse",
        "DeleteModelResponse",
        "Batch",
        "ListBatchesResponse",
    ],
)
def test_our_schema_promises_what_openai_requires(api: TestClient, name: str) -> None:
    """Every property OpenAI's component requires, our component of that name requires too."""
    ours = api.get("/openapi.json").json()["components"]["schemas"][name]
    theirs = _openai()["components"]["schemas"][name]
    assert set(theirs.get("required", [])) <= set(ours["required"]), name
