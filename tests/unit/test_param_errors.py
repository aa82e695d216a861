"""Every refused parameter says what is allowed and what was sent, as a 400 naming it.

Table-driven over every parameter of ``POST /v1/fine_tuning/jobs`` (both places hyperparameters
go) and every numeric parameter of chat completions (answered by the engine, whose 400 the API
relays unchanged; here the engine's app is asked directly).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from loraforge.api.app import create_app
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.orgs import create_api_key, get_or_create_org
from loraforge.serving.app import create_engine_app
from loraforge.settings import Settings
from tests.conftest import TEST_POOLS, RecordingDispatcher, _error_has_code

TINY = "loraforge/tiny-llama"
BASE = {"model": TINY, "training_file": "file-abc"}

# (body fields, expected param, words from the allowed range, what was sent as the message shows it)
JOB_CASES: list[tuple[dict[str, Any], str, str, str]] = [
    ({"model": ""}, "model", "at least 1 character", '""'),
    ({"model": 7}, "model", "valid string", "7"),
    ({"training_file": ""}, "training_file", "at least 1 character", '""'),
    ({"validation_file": 3}, "validation_file", "valid string", "3"),
    ({"suffix": "has space"}, "suffix", "1 to 64 characters", '"has space"'),
    ({"suffix": "x" * 65}, "suffix", "1 to 64 characters", '"xxxx'),
    ({"seed": 2**100}, "seed", "an integer from 0 to 2147483647", str(2**100)),
    ({"seed": -1}, "seed", "an integer from 0 to 2147483647", "-1"),
    ({"seed": 1.5}, "seed", "an integer from 0 to 2147483647", "1.5"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16", '{"k0"'),
    ({"metadata": {"k": 5}}, "metadata", "string values", '{"k": 5}'),
    ({"dry_run": "maybe"}, "dry_run", "valid boolean", '"maybe"'),
    ({"method": {"type": "ppo"}}, "method.type", "'supervised', 'dpo' or 'reinforcement'", '"ppo"'),
    ({"integrations": [{"type": "mlflow", "wandb": {}}]}, "integrations.[0].type", "'wandb'", '"mlflow"'),
]
HYPER_CASES: list[tuple[str, Any, str, str]] = [
    ("n_epochs", 200, "'auto' or an integer from 1 to 50", "200"),
    ("n_epochs", 0, "'auto' or an integer from 1 to 50", "0"),
    ("n_epochs", "many", "'auto' or an integer from 1 to 50", '"many"'),
    ("batch_size", 257, "'auto' or an integer from 1 to 256", "257"),
    ("learning_rate_multiplier", 0, "'auto' or a number greater than 0 and at most 100", "0"),
    ("learning_rate_multiplier", 1000, "'auto' or a number greater than 0 and at most 100", "1000"),
    ("lora_r", 2048, "an integer from 1 to 1024", "2048"),
    ("lora_alpha", 0, "an integer from 1 to 4096", "0"),
    ("lora_dropout", 1.0, "a number from 0 up to (not including) 1", "1.0"),
    ("lora_target_modules", [], "'all-linear', or a non-empty list", "[]"),
    ("max_seq_length", 4, "an integer of at least 8", "4"),
    ("warmup_ratio", 1.5, "a number from 0 to 1", "1.5"),
    ("weight_decay", -0.1, "a number from 0 to 10", "-0.1"),
]


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, migrated_sqlite: Path
) -> Iterator[tuple[TestClient, str]]:
    """One app and key for the whole table: requests are refused before anything is stored."""
    settings = Settings(home=tmp_path_factory.mktemp("params") / "home", train_pools=TEST_POOLS)
    settings.home.mkdir(parents=True)
    shutil.copyfile(migrated_sqlite, settings.home / "loraforge.sqlite")
    engine = make_engine(settings)
    with session_scope(make_sessionmaker(engine)) as session:
        key = create_api_key(session, get_or_create_org(session, "acme", None))
    engine.dispose()
    with TestClient(create_app(settings, dispatcher=RecordingDispatcher())) as client:
        client.event_hooks["response"].append(_error_has_code)
        yield client, key


def _post(api: TestClient, key: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = api.post("/v1/fine_tuning/jobs", json=body, headers={"authorization": f"Bearer {key}"})
    assert resp.status_code == 400, resp.text
    error: dict[str, Any] = resp.json()["error"]
    return error


@pytest.mark.parametrize(("fields", "param", "allowed", "got"), JOB_CASES)
def test_job_parameters(
    shared: tuple[TestClient, str], fields: dict[str, Any], param: str, allowed: str, got: str
) -> None:
    error = _post(*shared, {**BASE, **fields})
    assert error["param"] == param, error
    assert allowed in error["message"] and f"got {got}" in error["message"], error
    assert error["type"] == "invalid_request_error" and error["code"] in ("invalid_value", "invalid_type")


@pytest.mark.parametrize(("name", "value", "allowed", "got"), HYPER_CASES)
@pytest.mark.parametrize("where", ["hyperparameters", "method.supervised.hyperparameters"])
def test_hyperparameters(
    shared: tuple[TestClient, str], where: str, name: str, value: Any, allowed: str, got: str
) -> None:
    hyper = {name: value}
    body = (
        {**BASE, "hyperparameters": hyper}
        if where == "hyperparameters"
        else {**BASE, "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}}}
    )
    error = _post(*shared, body)
    assert error["param"] == f"{where}.{name}", error
    message = error["message"]
    assert message.startswith(f"{where}.{name} must be {allowed}") and message.endswith(f"; got {got}"), error
    assert error["code"] == "invalid_value"


def test_the_issue_example_reads_as_asked(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    error = _post(api, make_key("acme"), {**BASE, "hyperparameters": {"n_epochs": 200}})
    assert error["message"] == "hyperparameters.n_epochs must be 'auto' or an integer from 1 to 50; got 200"


def test_unknown_and_missing_parameters_have_codes(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    key = make_key("acme")
    unknown = _post(api, key, {**BASE, "n_epochs": 3})
    assert unknown["code"] == "unknown_parameter" and unknown["param"] == "n_epochs"
    missing = _post(api, key, {"model": TINY})
    assert missing["code"] == "missing_required_parameter" and missing["param"] == "training_file"
    assert missing["message"] == "Missing required parameter: 'training_file'."


# Chat: (field, value, expected param, allowed, got)
CHAT_CASES: list[tuple[str, Any, str, str]] = [
    ("temperature", 2.5, "a number from 0 to 2", "2.5"),
    ("temperature", -1, "a number from 0 to 2", "-1"),
    ("top_p", 1.5, "a number from 0 to 1", "1.5"),
    ("n", 0, "an integer from 1 to 128", "0"),
    ("n", 129, "an integer from 1 to 128", "129"),
    ("max_tokens", 0, "a positive integer", "0"),
    ("max_tokens", 1.5, "a positive integer", "1.5"),
    ("max_completion_tokens", -3, "a positive integer", "-3"),
    ("seed", 2**100, "an integer from -9223372036854775808 to 9223372036854775807", str(2**100)),
]


@pytest.fixture
def engine_client() -> TestClient:
    # Validation runs before the engine is touched: a stand-in with no methods is enough.
    return TestClient(create_engine_app(SimpleNamespace(prepare=None)))  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "value", "allowed", "got"), CHAT_CASES)
def test_chat_numbers(engine_client: TestClient, name: str, value: Any, allowed: str, got: str) -> None:
    body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], name: value}
    resp = engine_client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == name and error["message"] == f"{name} must be {allowed}; got {got}", error
    assert error["code"] == "invalid_value"
