"""Tool calling on the engine's HTTP face, read by the openai SDK: tool calls in OpenAI's format,
streamed deltas the SDK assembles, fallback to content, tool_choice, and the 400s. The model's
output is scripted (a stand-in engine with the real request checks, rendering and prefixes); the
trained model is exercised end to end in ``tests/integration/test_tool_calling.py``."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pytest
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator
from openai import BadRequestError, OpenAI
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from loraforge.catalog import load_catalog
from loraforge.serving.app import create_engine_app
from loraforge.serving.chat import normalize_messages
from loraforge.serving.tools import NO_TOOLS, ToolPlan, tool_prompt
from tests.helpers import WEATHER_TOOL, weather_question
from tests.unit.test_openapi_schemas import EXTRACT

TINY = "loraforge/tiny-llama"
OLD = "ft:old-adapter"  # an adapter whose pinned template predates tool calls
CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` as JSON Schema (``anyOf`` with null), which jsonschema reads."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _nullable(value) for key, value in node.items() if key != "nullable"}
    return {"anyOf": [out, {"type": "null"}]} if node.get("nullable") is True else out


@lru_cache
def _registry() -> Registry:
    spec = _nullable(json.loads(EXTRACT.read_text()))
    return Registry().with_resource(
        "urn:openai", Resource.from_contents(spec, default_specification=DRAFT202012)
    )


def assert_valid(instance: Any, schema_name: str) -> None:
    """``instance`` validates against OpenAI's published component schema ``schema_name``."""
    validator = Draft202012Validator(
        {"$ref": f"urn:openai#/components/schemas/{schema_name}"}, registry=_registry()
    )
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(instance)]
    assert not errors, f"{schema_name}: " + "; ".join(errors[:5])


@dataclass(frozen=True)
class Request:
    """What the app reads of ``serving.generation.GenerationRequest`` (that module imports torch)."""

    model: str
    tool_format: str | None
    prefill: str
    seed: int | None = None


@dataclass(frozen=True)
class Result:
    """``serving.generation.GenerationResult``'s fields."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class ScriptedEngine:
    """The engine's request side for real (messages, tools, template, forced prefix); the model's
    output is whatever the test scripts, streamed in small pieces."""

    def __init__(self) -> None:
        self.entry = load_catalog().get(TINY)
        self.output = ""
        self.prepared: list[dict[str, Any]] = []

    @property
    def base_model(self) -> str:
        return self.entry.id

    def prepare(
        self, model_name: str, messages: Sequence[Mapping[str, Any]], *, tools: ToolPlan = NO_TOOLS, **kw: Any
    ) -> Request:
        chat = normalize_messages(messages)
        template = self.entry.chat_template_text
        if model_name == OLD:
            template = template.replace("loraforge:tool_format", "no")
        fmt, prefill = tool_prompt(model_name, template, tools)
        self.prepared.append({"chat": chat, "tools": tools.tools, "prefill": prefill})
        return Request(model_name, fmt, prefill)

    def _result(self, request: Request) -> Result:
        # The completion continues the forced prefix: the script holds the whole answer.
        text = self.output.removeprefix(request.prefill)
        return Result(text, 3, max(1, len(text) // 4), "stop")

    def run(self, request: Request) -> Result:
        return self._result(request)

    def run_many(self, requests: Sequence[Request]) -> list[Result]:
        return [self._result(r) for r in requests]

    def run_stream(self, request: Request, cancel: threading.Event | None = None) -> Iterator[Any]:
        result = self._result(request)
        yield from (result.text[i : i + 5] for i in range(0, len(result.text), 5))
        yield result


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
def http(engine: ScriptedEngine) -> TestClient:
    return TestClient(create_engine_app(engine))


@pytest.fixture
def sdk(http: TestClient) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)


def _ask(**extra: Any) -> dict[str, Any]:
    return {"model": TINY, "messages": weather_question("Paris"), "tools": [WEATHER_TOOL], **extra}


def test_a_call_comes_back_in_openais_format(sdk: OpenAI, http: TestClient, engine: ScriptedEngine) -> None:
    engine.output = CALL
    reply = sdk.chat.completions.create(**_ask())
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # The tools reached the template, with the conversation.
    assert engine.prepared[-1]["tools"] == [WEATHER_TOOL] and engine.prepared[-1]["prefill"] == ""
    raw = http.post("/v1/chat/completions", json=_ask()).json()
    assert_valid(raw, "CreateChatCompletionResponse")
    assert_valid(raw["choices"][0]["message"]["tool_calls"][0], "ChatCompletionMessageToolCall")


def test_streamed_calls_are_assembled_by_the_sdk(
    sdk: OpenAI, http: TestClient, engine: ScriptedEngine
) -> None:
    engine.output = CALL + '; {"name": "get_weather", "parameters": {"city": "Rome"}}'
    with sdk.chat.completions.stream(**_ask()) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    cities = [json.loads(c.function.arguments)["city"] for c in choice.message.tool_calls]
    assert cities == ["Paris", "Rome"] and len({c.id for c in choice.message.tool_calls}) == 2
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.name, json.loads(e.arguments)) for e in done] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
    ]
    chunks = list(sdk.chat.completions.create(**_ask(), stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    text = http.post("/v1/chat/completions", json={**_ask(), "stream": True}).text
    payloads = [e.removeprefix("data: ") for e in text.split("\n\n") if e.strip()]
    assert payloads[-1] == "[DONE]"
    for payload in payloads[:-1]:
        assert_valid(json.loads(payload), "CreateChatCompletionStreamResponse")


@pytest.mark.parametrize(
    "output",
    [
        "It is sunny in Paris.",
        '{"label": "refund"}',  # JSON, but not a call
        CALL[:-2],  # cut short
        '{"name": "get_stock", "parameters": {"ticker": "X"}}',  # not a function of the request
    ],
)
def test_anything_else_is_plain_content(sdk: OpenAI, engine: ScriptedEngine, output: str) -> None:
    engine.output = output
    reply = sdk.chat.completions.create(**_ask())
    assert reply.choices[0].message.content == output and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    with sdk.chat.completions.stream(**_ask()) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == output and not final.choices[0].message.tool_calls


def test_tool_choice(sdk: OpenAI, engine: ScriptedEngine) -> None:
    engine.output = CALL
    # none: no tools in the prompt, nothing parsed.
    reply = sdk.chat.completions.create(**_ask(tool_choice="none"))
    assert reply.choices[0].message.content == CALL and engine.prepared[-1]["tools"] is None
    # required: the completion starts inside a call.
    reply = sdk.chat.completions.create(**_ask(tool_choice="required"))
    assert engine.prepared[-1]["prefill"] == '{"name":'
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"
    # A named function: its name is forced too.
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = sdk.chat.completions.create(**_ask(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=named))
    assert engine.prepared[-1]["prefill"] == '{"name": "get_weather", "parameters":'
    assert engine.prepared[-1]["tools"] == [WEATHER_TOOL, TIME_TOOL]
    assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}
    # allowed_tools: every tool rendered, only the allowed ones read back.
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [TIME_TOOL]}}
    reply = sdk.chat.completions.create(**_ask(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=allowed))
    assert reply.choices[0].message.content == CALL
    # parallel_tool_calls false keeps the first call.
    engine.output = CALL + "; " + CALL
    reply = sdk.chat.completions.create(**_ask(parallel_tool_calls=False))
    assert len(reply.choices[0].message.tool_calls) == 1


def test_history_with_calls_and_results_reaches_the_template(sdk: OpenAI, engine: ScriptedEngine) -> None:
    engine.output = "It is 21 C."
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        *weather_question("Paris"),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    reply = sdk.chat.completions.create(**_ask(messages=messages))
    assert reply.choices[0].message.content == "It is 21 C."
    chat = engine.prepared[-1]["chat"]
    assert chat[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert chat[2] == {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "call_1"}


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (
            {"model": TINY, "messages": weather_question("Paris"), "tool_choice": "auto"},
            "tool_choice",
            "only allowed",
        ),
        (_ask(tool_choice="sometimes"), "tool_choice", "expected 'none'"),
        (_ask(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", "'nope'"),
        (_ask(tools=[WEATHER_TOOL, WEATHER_TOOL]), "tools", "unique"),
        (_ask(tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools.[0].type", ""),
        (_ask(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools.[0].function.name", ""),
        (_ask(model=OLD), "tools", "no tool-call format"),
        (
            _ask(
                messages=[
                    *weather_question("Paris"),
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c", "content": "1"},
                ]
            ),
            "messages.[1].tool_calls",
            "JSON object",
        ),
    ],
)
def test_bad_tool_requests_get_a_400(http: TestClient, body: dict[str, Any], param: str, words: str) -> None:
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_sdk_sees_400_for_tool_choice_without_tools(sdk: OpenAI) -> None:
    with pytest.raises(BadRequestError) as info:
        sdk.chat.completions.create(model=TINY, messages=weather_question("Paris"), tool_choice="required")
    assert info.value.param == "tool_choice"


@pytest.mark.slow  # builds the tiny model (torch)
def test_the_engine_prompt_is_the_trained_text_up_to_the_call(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from loraforge.catalog.loading import load_model, load_tokenizer
    from loraforge.serving.engine import Engine
    from loraforge.trainer.data import _validate_example, tokenize_example
    from tests.helpers import tool_call_examples

    entry = load_catalog().get(TINY)
    tokenizer = load_tokenizer(entry, tmp_path)
    engine = Engine(load_model(entry, tmp_path), tokenizer, entry)
    try:
        trained = tokenize_example(tokenizer, _validate_example(tool_call_examples(("Paris",))[0])).input_ids
        for forced in (None, "get_weather"):
            plan = ToolPlan([WEATHER_TOOL], frozenset(["get_weather"]), forced=True, forced_name=forced)
            request = engine.prepare(TINY, weather_question("Paris"), tools=plan)
            assert request.tool_format == "llama3_json" and CALL.startswith(request.prefill)
            # Same tokens as training, through the forced prefix: the model continues its own call.
            assert list(request.input_ids) == trained[: len(request.input_ids)]
            assert len(request.input_ids) < len(trained) - 5
        free = engine.prepare(
            TINY, weather_question("Paris"), tools=ToolPlan([WEATHER_TOOL], frozenset(["get_weather"]))
        )
        assert free.prefill == "" and list(free.input_ids) == trained[: len(free.input_ids)]
    finally:
        engine.close()
