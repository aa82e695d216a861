"""Our responses validate against OpenAI's own published component schemas."""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.conftest import SHARED
from tests.helpers import chat_examples, to_jsonl

SPEC = SHARED / "openai-openapi.yaml"
pytestmark = pytest.mark.skipif(not SPEC.is_file(), reason=f"{SPEC.name} not found beside the repository")


@lru_cache
def _registry() -> Registry:
    spec = yaml.load(SPEC.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return Registry().with_resource(
        "urn:openai", Resource.from_contents(spec, default_specification=DRAFT202012)
    )


def assert_valid(instance: Any, schema_name: str) -> None:
    validator = Draft202012Validator(
        {"$ref": f"urn:openai#/components/schemas/{schema_name}"}, registry=_registry()
    )
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, f"{schema_name}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def test_responses_match_openai_schemas(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    headers = {"authorization": f"Bearer {make_key('acme')}"}
    f = api.post(
        "/v1/files",
        headers=headers,
        files={"file": ("t.jsonl", io.BytesIO(to_jsonl(chat_examples(10))))},
        data={"purpose": "fine-tune"},
    )
    assert_valid(f.json(), "OpenAIFile")
    assert_valid(api.get("/v1/files", headers=headers).json(), "ListFilesResponse")

    job = api.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": "loraforge/tiny-llama", "training_file": f.json()["id"], "suffix": "x"},
    ).json()
    assert_valid(job, "FineTuningJob")
    assert_valid(
        api.get("/v1/fine_tuning/jobs", headers=headers).json(), "ListPaginatedFineTuningJobsResponse"
    )
    events = api.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=headers).json()
    assert_valid(events, "ListFineTuningJobEventsResponse")
    checkpoints = api.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=headers).json()
    assert_valid(checkpoints, "ListFineTuningJobCheckpointsResponse")
    cancelled = api.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=headers).json()
    assert_valid(cancelled, "FineTuningJob")
    assert_valid(api.get("/v1/models", headers=headers).json(), "ListModelsResponse")
    assert_valid(api.get("/v1/models/loraforge/tiny-llama", headers=headers).json(), "Model")
    assert_valid(api.delete(f"/v1/files/{f.json()['id']}", headers=headers).json(), "DeleteFileResponse")
    error = api.get("/v1/files/file-nope", headers=headers).json()
    assert_valid(error, "ErrorResponse")
