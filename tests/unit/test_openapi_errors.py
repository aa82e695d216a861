"""``/openapi.json`` documents the errors each operation answers, in OpenAI's envelope, and no 422."""

from __future__ import annotations

from fastapi.testclient import TestClient

from loraforge.contracts.envelope import ErrorEnvelope

ENVELOPE = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}


def test_every_operation_documents_its_errors_and_none_is_a_422(api: TestClient) -> None:
    schema = api.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    ErrorEnvelope.model_validate({"error": {"message": "m", "type": "t", "param": None, "code": "c"}})
    assert schema["components"]["schemas"]["ErrorEnvelope"]["required"] == ["error"]
    operations = [(m, p, op) for p, ops in schema["paths"].items() for m, op in ops.items()]
    for method, path, op in operations:
        responses = op["responses"]
        assert "422" not in responses, (method, path)
        if not path.startswith("/v1/"):
            continue
        for status in ("401", "429"):
            assert responses[status]["content"] == ENVELOPE, (method, path, status)
        if "{" in path:
            assert "404" in responses, (method, path)
        if "requestBody" in op:
            assert {"400", "413"} <= set(responses), (method, path)
    by = {(m, p): set(op["responses"]) for m, p, op in operations}
    assert "409" in by[("post", "/v1/fine_tuning/jobs")] and "409" not in by[("get", "/v1/fine_tuning/jobs")]
    assert "503" in by[("post", "/v1/chat/completions")]
    content = schema["paths"]["/v1/files/{file_id}/content"]["get"]["responses"]["200"]["content"]
    assert "application/octet-stream" in content
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" in chat


def test_405_names_every_method_of_the_url(api: TestClient) -> None:
    assert api.options("/v1/files").headers["allow"] == "POST, GET"
    assert api.request("PUT", "/v1/files/file-x").headers["allow"] == "GET, DELETE"
    assert api.delete("/v1/fine_tuning/jobs").json()["error"]["code"] == "method_not_allowed"
    # The model id may contain slashes: the most specific template decides.
    assert api.options("/v1/models/ft:a/b:c/export").headers["allow"] == "GET"
    assert api.options("/v1/models/ft:a/b:c").headers["allow"] == "GET, DELETE"
