"""The Batch API on a live loraforge (issue 16, point 3), through the unmodified openai SDK: a
batch of tool-calling questions to the session's fine-tuned model (``tool_model``) runs on the
real worker and engine and answers as interactive chat does; its output file comes back through
``files.content``; list and cancel; the trial plan's 1,000-request cap; the ``loraforge batches``
CLI. The answers validate against OpenAI's published ``Batch`` schema. (A worker killed mid-batch:
``tests/unit/test_batches.py``.)"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import BadRequestError, OpenAI
from openai.types import Batch

from tests.helpers import WEATHER_TOOL, weather_question
from tests.integration.conftest import TOOL_CITIES, Stack
from tests.unit.test_openapi_schemas import assert_valid

pytestmark = pytest.mark.integration

TINY = "loraforge/tiny-llama"
CHAT = "/v1/chat/completions"


def requests_file(client: OpenAI, bodies: list[dict[str, Any]]) -> str:
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": CHAT, "body": b} for i, b in enumerate(bodies)]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return client.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch").id


def wait_final(client: OpenAI, batch_id: str, timeout: float = 120) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status} after {timeout} s"
        time.sleep(0.2)


def test_a_batch_on_the_fine_tuned_model_answers_as_chat_does(
    stack: Stack, tool_model: tuple[OpenAI, str]
) -> None:
    client, model = tool_model
    bodies = [
        {
            "model": model,
            "messages": weather_question(city),
            "tools": [WEATHER_TOOL],
            "temperature": 0,
            "max_tokens": 40,
        }
        for city in TOOL_CITIES[:3]
    ]
    batch = client.batches.create(
        input_file_id=requests_file(client, bodies),
        endpoint=CHAT,
        completion_window="24h",
        metadata={"k": "v"},
    )
    assert batch.status == "validating" and batch.model == model
    done = wait_final(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None and (
        done.request_counts.completed,
        done.request_counts.failed,
    ) == (3, 0)
    assert done.error_file_id is None and done.output_file_id is not None
    headers = {"Authorization": f"Bearer {client.api_key}"}
    assert_valid(httpx.get(f"{stack.base_url}/batches/{batch.id}", headers=headers).json(), "Batch")
    assert_valid(httpx.get(f"{stack.base_url}/batches", headers=headers).json(), "ListBatchesResponse")

    output = [json.loads(raw) for raw in client.files.content(done.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in output] == ["q0", "q1", "q2"]
    for o, body, city in zip(output, bodies, TOOL_CITIES, strict=False):
        answer = o["response"]["body"]
        assert o["response"]["status_code"] == 200 and answer["model"] == model
        [call] = answer["choices"][0]["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {
            "city": city
        }
        live = client.chat.completions.create(**body)
        [live_call] = live.choices[0].message.tool_calls or []
        assert live_call.function.arguments == call["function"]["arguments"]  # the same greedy answer
        assert answer["usage"]["completion_tokens"] == (live.usage.completion_tokens if live.usage else None)
    assert done.usage is not None and done.usage.output_tokens == sum(
        o["response"]["body"]["usage"]["completion_tokens"] for o in output
    )
    assert batch.id in [b.id for b in client.batches.list(limit=100)]


def test_the_cli_runs_a_batch_on_the_base_model(
    stack: Stack, tool_model: tuple[OpenAI, str], tmp_path: Path
) -> None:
    client, _ = tool_model
    env = {**stack.env, "LORAFORGE_BASE_URL": stack.base_url, "LORAFORGE_API_KEY": client.api_key}
    path = tmp_path / "requests.jsonl"
    body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    path.write_text(
        "".join(
            json.dumps({"custom_id": c, "method": "POST", "url": CHAT, "body": body}) + "\n" for c in "xy"
        )
    )

    def cli(*args: str) -> str:
        run = subprocess.run(
            [sys.executable, "-m", "loraforge", "batches", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        return run.stdout

    batch_id = cli("create", str(path), "--wait").strip()
    assert client.batches.retrieve(batch_id).status == "completed"
    answers = [json.loads(raw) for raw in cli("results", batch_id).splitlines()]
    assert [a["custom_id"] for a in answers] == ["x", "y"]
    assert all(a["response"]["body"]["model"] == TINY for a in answers)


def test_cancel_and_the_trial_plans_cap(stack: Stack, tool_model: tuple[OpenAI, str]) -> None:
    client, model = tool_model
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 64}
    batch = client.batches.create(
        input_file_id=requests_file(client, [body] * 40), endpoint=CHAT, completion_window="24h"
    )
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    cancelled = wait_final(client, batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    assert cancelled.request_counts is not None and cancelled.request_counts.completed < 40
    with pytest.raises(BadRequestError):
        client.batches.cancel(batch.id)

    trial = OpenAI(base_url=stack.base_url, api_key=stack.key("batch-trial", "trial"), max_retries=0)
    too_many = requests_file(
        trial, [{"model": TINY, "messages": [{"role": "user", "content": "hi"}]}] * 1_001
    )
    with pytest.raises(BadRequestError) as refused:
        trial.batches.create(input_file_id=too_many, endpoint=CHAT, completion_window="24h")
    assert refused.value.code == "batch_too_large"
    assert "the trial plan allows at most 1000 requests per batch" in refused.value.message
