"""A tool-calling fine-tune end to end, with the unmodified openai SDK against a live loraforge:
examples that end with the assistant's ``get_weather`` call -> a job on the tiny model -> the
fine-tuned model, given the same tools, answers each trained question with that call (name and
JSON arguments), streamed and not; the base model does not."""

from __future__ import annotations

import json

import pytest
from openai import OpenAI

from tests.helpers import WEATHER_TOOL, weather_question
from tests.integration.conftest import TOOL_CITIES as TRAINED

pytestmark = pytest.mark.integration
TINY = "loraforge/tiny-llama"


def test_the_fine_tuned_model_calls_the_trained_function(tool_model: tuple[OpenAI, str]) -> None:
    client, model = tool_model
    for city in TRAINED:
        reply = client.chat.completions.create(
            model=model, messages=weather_question(city), tools=[WEATHER_TOOL], temperature=0, max_tokens=40
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": city}


def test_streamed_calls_assemble_in_the_sdk(tool_model: tuple[OpenAI, str]) -> None:
    client, model = tool_model
    city = TRAINED[1]
    kwargs = {"model": model, "messages": weather_question(city), "tools": [WEATHER_TOOL], "temperature": 0}
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": city}

    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas and deltas[0].id and deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(arguments) == {"city": city}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_the_base_model_does_not_and_answers_stay_well_formed(tool_model: tuple[OpenAI, str]) -> None:
    client, model = tool_model
    base = client.chat.completions.create(
        model=TINY, messages=weather_question(TRAINED[0]), tools=[WEATHER_TOOL], temperature=0, max_tokens=40
    )
    assert base.choices[0].message.tool_calls is None
    assert isinstance(base.choices[0].message.content, str)
    # Without tools (tool_choice none), the fine-tuned model's text is content, never parsed.
    plain = client.chat.completions.create(
        model=model,
        messages=weather_question(TRAINED[0]),
        tools=[WEATHER_TOOL],
        tool_choice="none",
        temperature=0,
        max_tokens=40,
    )
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason in (
        "stop",
        "length",
    )
    # A conversation that carries the call and its result goes through the API to the template.
    first = client.chat.completions.create(
        model=model, messages=weather_question(TRAINED[0]), tools=[WEATHER_TOOL], temperature=0, max_tokens=40
    )
    call = first.choices[0].message.tool_calls[0]
    follow_up = client.chat.completions.create(
        model=model,
        messages=[
            *weather_question(TRAINED[0]),
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
        ],
        tools=[WEATHER_TOOL],
        temperature=0,
        max_tokens=20,
    )
    assert follow_up.choices[0].finish_reason in ("stop", "length", "tool_calls")
