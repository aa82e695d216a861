"""One error envelope for the API and the engine: the same invalid request gets the same ``param``
(and wording) from both, and the envelope always carries its four keys."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from loraforge.contracts.envelope import ErrorEnvelope, error_body, loc_to_param, validation_error
from loraforge.serving.app import create_engine_app
from loraforge.serving.errors import AdapterNotLoaded

MODEL = "loraforge/tiny-llama"
HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HI}, "model"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": ["hi"]}, "messages.[0]"),
        ({"model": MODEL, "messages": HI, "stream": "sometimes"}, "stream"),
    ],
)
def test_api_and_engine_agree_on_param(api: TestClient, make_key, body: dict[str, Any], param: str) -> None:  # type: ignore[no-untyped-def]
    engine = TestClient(create_engine_app(SimpleNamespace(prepare=None)))  # type: ignore[arg-type]
    from_engine = engine.post("/v1/chat/completions", json=body)
    headers = {"authorization": f"Bearer {make_key('acme')}"}
    from_api = api.post("/v1/chat/completions", json=body, headers=headers)
    assert from_api.status_code == from_engine.status_code == 400, (from_api.text, from_engine.text)
    assert from_api.json()["error"]["param"] == from_engine.json()["error"]["param"] == param
    api_error, engine_error = from_api.json()["error"], from_engine.json()["error"]
    assert api_error["type"] == engine_error["type"] == "invalid_request_error"
    # Same wording around pydantic's own text (which names each side's type: dict vs message).
    assert api_error["message"].split(":")[0] == engine_error["message"].split(":")[0]


def test_param_from_pydantic_locations() -> None:
    assert (
        loc_to_param(("body", "hyperparameters", "n_epochs", "literal['auto']")) == "hyperparameters.n_epochs"
    )
    assert loc_to_param(("body", "messages", 0, "content", "str")) == "messages.[0].content"
    assert loc_to_param(("query", "after")) == "after"
    assert loc_to_param(("body",)) is None
    extra = [{"type": "extra_forbidden", "loc": ("body", "bogus"), "msg": "Extra inputs are not permitted"}]
    assert validation_error(extra) == (
        "Unrecognized request argument supplied: bogus",
        "bogus",
        "unknown_parameter",
    )
    assert validation_error([{"type": "json_invalid", "loc": ("body", 3), "msg": "x"}])[1] is None


def test_envelope_shape_is_the_contract() -> None:
    body = error_body("nope", "invalid_request_error", None, "invalid_request")
    expected = {"message": "nope", "type": "invalid_request_error", "param": None, "code": "invalid_request"}
    assert body == {"error": expected}
    assert (
        ErrorEnvelope.model_validate(AdapterNotLoaded("ft:x").to_envelope()).error.code == "model_not_found"
    )
