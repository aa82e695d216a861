"""Tool-calling fine-tunes, data side: the templates' tool format, reading calls back, pre-flight
structure checks, and pre-flight token counts equal to the trainer's labels (``apply_chat_template``)."""

from __future__ import annotations

import copy
import io
import json
import random
from pathlib import Path
from typing import Any

import pytest

from loraforge.catalog import load_catalog
from loraforge.catalog.tool_calls import (
    LLAMA3_JSON,
    ParsedCall,
    forced_prefix,
    may_be_tool_call,
    parse_tool_calls,
    tool_format,
)
from loraforge.preflight import validate_file, validate_for_model
from loraforge.preflight.chat import check_chat_line
from loraforge.preflight.report import FileReport
from loraforge.preflight.run import make_counter
from loraforge.preflight.template import ChatTemplate
from tests.helpers import WEATHER_TOOL, to_jsonl, tool_call_examples, weather_call, weather_question

TINY = "loraforge/tiny-llama"
LLAMA = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"
SPECIAL = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def entry():  # type: ignore[no-untyped-def]
    return load_catalog().get(TINY)


def _template(model: str) -> ChatTemplate:
    entry = load_catalog().get(model)
    assert entry is not None
    return ChatTemplate(entry.chat_template_text, SPECIAL)


def _round_trip() -> dict[str, Any]:
    """A call, its result, and the answer built from it (OpenAI's format)."""
    return {
        "messages": [
            {"role": "system", "content": "You help travellers."},
            *weather_question("Paris"),
            {"role": "assistant", "content": None, "tool_calls": [weather_call("Paris")]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
            {"role": "assistant", "content": "It is 21 C in Paris."},
        ],
        "tools": [WEATHER_TOOL],
    }


def _normalised(line: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    example = check_chat_line(line, _no_issue, _no_issue)
    assert example is not None
    return example.messages, example.tools


def _no_issue(code: str, message: str, path: str) -> None:
    raise AssertionError(f"{code} at {path}: {message}")


# ------------------------------------------------------------------------------ the syntax


def test_parse_reads_calls_and_refuses_anything_else() -> None:
    names = {"get_weather", "get_time"}
    assert parse_tool_calls(CALL, LLAMA3_JSON, names) == [ParsedCall("get_weather", '{"city": "Paris"}')]
    two = CALL + '; {"name": "get_time", "arguments": {"tz": "CET"}}'
    assert parse_tool_calls(f"  <|python_tag|>{two}\n", LLAMA3_JSON, names) == [
        ParsedCall("get_weather", '{"city": "Paris"}'),
        ParsedCall("get_time", '{"tz": "CET"}'),
    ]
    # Spacing is the model's; the arguments are re-serialised the way OpenAI sends them.
    assert parse_tool_calls('{"name":"get_weather","parameters":{"city":"Zürich"}}', LLAMA3_JSON) == [
        ParsedCall("get_weather", '{"city": "Zürich"}')
    ]
    for text in (
        "It is sunny.",
        CALL[:-1],  # cut short
        CALL + " and more",
        CALL + ";",
        CALL + "; ",
        '{"name": "get_weather", "parameters": "Paris"}',
        '{"name": "get_weather", "parameters": {}, "extra": 1}',
        '{"name": 3, "parameters": {}}',
        "[" + CALL + "]",
        "",
    ):
        assert parse_tool_calls(text, LLAMA3_JSON, names) is None, text
    assert parse_tool_calls(CALL, LLAMA3_JSON, {"get_time"}) is None  # not a function of the request
    assert may_be_tool_call("", LLAMA3_JSON) and may_be_tool_call('  {"na', LLAMA3_JSON)
    assert may_be_tool_call("<|python", LLAMA3_JSON) and not may_be_tool_call("It", LLAMA3_JSON)
    # Forced prefixes stop before a space, so they tokenize as the trained text does.
    assert forced_prefix(LLAMA3_JSON, None) == '{"name":'
    assert forced_prefix(LLAMA3_JSON, "get_weather") == '{"name": "get_weather", "parameters":'
    assert CALL.startswith(forced_prefix(LLAMA3_JSON, "get_weather"))


def test_catalog_templates_declare_the_llama3_json_format() -> None:
    for entry in load_catalog():
        assert tool_format(entry.chat_template_text) == LLAMA3_JSON, entry.id
    assert tool_format("{{ messages }}") is None
    assert tool_format("{# loraforge:tool_format=unknown #}") is None


# ------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("model", [LLAMA, TINY])
def test_conversations_without_tools_render_as_before(model: str) -> None:
    messages = [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "Hi\n"},
        {"role": "assistant", "content": "Hello."},
    ]
    text, spans = _template(model).render(messages)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    )
    assert [text[a:b] for a, b in spans] == ["Hello.<|eot_id|>"]


def test_llama31_renders_tools_as_meta_documents_them() -> None:
    messages, tools = _normalised(_round_trip())
    text, spans = _template(LLAMA).render(messages, tools)
    system, user, call, result, answer = text.split("<|start_header_id|>")[1:]
    assert system == (
        "system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nYou help travellers.<|eot_id|>"
    )
    assert user.startswith(
        "user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for a "
        "function call with its proper arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and '
        "its value}.Do not use variables.\n\n"
    )
    assert json.dumps(WEATHER_TOOL, indent=4) + "\n\nWhat's the weather in Paris?<|eot_id|>" in user
    assert call == f"assistant<|end_header_id|>\n\n{CALL}<|eot_id|>"
    assert result == 'ipython<|end_header_id|>\n\n{"temp_c": 21}<|eot_id|>'
    assert answer == "assistant<|end_header_id|>\n\nIt is 21 C in Paris.<|eot_id|>"
    # The loss covers the call and the answer: not the tools, the prompt or the tool's result.
    assert [text[a:b] for a, b in spans] == [CALL + "<|eot_id|>", "It is 21 C in Paris.<|eot_id|>"]


def test_parallel_calls_and_the_tiny_models_compact_tools() -> None:
    line = {
        "messages": [
            *weather_question("Paris and Rome"),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [weather_call("Paris"), weather_call("Rome", "call_2")],
            },
        ],
        "tools": [WEATHER_TOOL],
    }
    messages, tools = _normalised(line)
    text, spans = _template(TINY).render(messages, tools)
    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        + json.dumps(WEATHER_TOOL["function"])
        + "\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat's the weather in Paris and Rome?"
    )
    both = CALL + '; {"name": "get_weather", "parameters": {"city": "Rome"}}<|eot_id|>'
    assert [text[a:b] for a, b in spans] == [both]
    parsed = parse_tool_calls(both.removesuffix("<|eot_id|>"), LLAMA3_JSON, {"get_weather"})
    assert parsed is not None and [json.loads(c.arguments)["city"] for c in parsed] == ["Paris", "Rome"]


def test_llama31_needs_a_first_user_message_for_its_tools(entry, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    line = _round_trip()
    line["messages"] = [line["messages"][0], *line["messages"][2:]]  # no user turn
    line["messages"][1:3] = []  # and no call to answer
    llama = entry.model_copy(update={"chat_template_text": load_catalog().get(LLAMA).chat_template_text})
    report = validate_for_model(io.BytesIO(to_jsonl([line] * 10)), llama, models_dir)
    [issue] = [i for i in report.errors.items if i.code == "template_error"][:1]
    assert "must start with a user message" in issue.message and issue.line == 1


# ------------------------------------------------------------------------------ pre-flight


def test_a_conversation_may_end_with_an_unanswered_call(entry, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    data = to_jsonl(tool_call_examples())
    assert validate_file(io.BytesIO(data)).ok
    report = validate_for_model(io.BytesIO(data), entry, models_dir)
    assert report.ok, report.details()
    assert report.n_examples == 10 and report.tokens is not None and report.tokens.trained_tokens > 0
    assert not report.warnings.items  # tools are rendered: no "tools_ignored"
    # An unanswered call before the end is still an error.
    line = _round_trip()
    line["messages"].pop(3)
    structure = validate_file(io.BytesIO(to_jsonl([line])))
    assert [(i.code, i.path) for i in structure.errors.items] == [
        ("tool_call_without_result", "messages[2].tool_calls[0].id")
    ]


def test_a_template_without_tool_format_refuses_tool_calls(entry, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    plain = entry.model_copy(
        update={"chat_template_text": entry.chat_template_text.replace("loraforge:tool_format", "no")}
    )
    data = to_jsonl([_round_trip()] * 10)
    report = validate_for_model(io.BytesIO(data), plain, models_dir)
    found = {(i.code, i.line, i.path) for i in report.errors.items}
    assert ("unsupported_tool_calls", 1, "messages[2].tool_calls") in found
    only_tools = [
        {**ex, "messages": ex["messages"][:2] + [{"role": "assistant", "content": "Hi"}]}
        for ex in [_round_trip()] * 10
    ]
    report = validate_for_model(io.BytesIO(to_jsonl(only_tools)), plain, models_dir)
    assert report.ok and [i.code for i in report.warnings.items] == ["tools_ignored"]


# ------------------------------------------------------------------ pre-flight == the trainer


def _random_tool_lines(n: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    cities = ["Paris", "Rome", "Oslo", "Zürich", "São Paulo"]
    lines = []
    for i in range(n):
        messages: list[dict[str, Any]] = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": f"Desk {i}."})
        for turn in range(rng.randint(1, 3)):
            picked = rng.sample(cities, rng.randint(1, 2))
            messages += weather_question(" and ".join(picked))
            calls = [weather_call(c, f"call_{i}_{turn}_{k}") for k, c in enumerate(picked)]
            assistant: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": calls}
            if rng.random() < 0.3:
                assistant["weight"] = rng.choice([0, 1])
            messages.append(assistant)
            last = turn == 2 or rng.random() < 0.3
            if last and rng.random() < 0.5:
                break  # ends with the calls
            messages += [
                {
                    "role": "tool",
                    "tool_call_id": c["id"],
                    "content": json.dumps({"temp_c": rng.randint(-5, 30)}),
                }
                for c in calls
            ]
            messages.append({"role": "assistant", "content": f"Noted {rng.randint(0, 99)}."})
            if last:
                break
        lines.append(
            {"messages": messages, "tools": [WEATHER_TOOL]} if rng.random() < 0.9 else {"messages": messages}
        )
    return lines


@pytest.mark.parametrize("model", [TINY, LLAMA])
@pytest.mark.slow  # builds the tiny model and its tokenizer with transformers (torch)
def test_token_counts_equal_the_trainers_labels(model: str, entry, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from loraforge.catalog.loading import load_tokenizer
    from loraforge.trainer.data import _validate_example, tokenize_example

    # The tiny tokenizer with each catalog template: the real Llama tokenizer is not available offline.
    template = load_catalog().get(model).chat_template_text
    # Llama 3.1's tool preamble is long for the tiny tokenizer: a longer limit, still cutting some.
    limit = 512 if model == TINY else 768
    with_template = entry.model_copy(
        update={"chat_template_text": template, "max_seq_length": limit, "context_length": limit}
    )
    tokenizer = load_tokenizer(with_template, models_dir)
    counter = make_counter(with_template, models_dir, FileReport())
    assert counter is not None
    lines = _random_tool_lines(60)
    total = trained = 0
    for line in lines:
        record = _validate_example(copy.deepcopy(line))
        full = tokenize_example(tokenizer, record)
        cut = tokenize_example(tokenizer, record, counter.max_seq_length)
        ours = counter.count(*_normalised(line))
        assert ours is not None
        assert (ours.length, ours.total, ours.trained) == (
            len(full.input_ids),
            len(cut.input_ids),
            cut.n_label_tokens,
        )
        total, trained = total + len(cut.input_ids), trained + cut.n_label_tokens
    report = validate_for_model(io.BytesIO(to_jsonl(lines)), with_template, models_dir)
    assert report.errors.total == 0, report.details()
    assert report.tokens is not None and report.tokens.truncated_examples > 0  # the cut is counted too
    assert (report.tokens.total_tokens, report.tokens.trained_tokens) == (total, trained)


@pytest.mark.slow  # builds the tiny model and its tokenizer with transformers (torch)
def test_labels_cover_the_call_and_the_answer_only(entry, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from loraforge.catalog.loading import load_tokenizer
    from loraforge.trainer.data import IGNORE_INDEX, _validate_example, tokenize_example

    tokenizer = load_tokenizer(entry, models_dir)
    example = tokenize_example(tokenizer, _validate_example(_round_trip()))
    labelled = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
    assert labelled == CALL + "<|eot_id|>It is 21 C in Paris.<|eot_id|>"
    weighted = _round_trip()
    weighted["messages"][2]["weight"] = 0  # train the answer, not the call
    example = tokenize_example(tokenizer, _validate_example(weighted))
    assert (
        tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX]) == "It is 21 C in Paris.<|eot_id|>"
    )
    # A template that declares no tool format cannot train tool calls.
    tokenizer.chat_template = entry.chat_template_text.replace("loraforge:tool_format", "no")
    with pytest.raises(ValueError, match="no tool-call format"):
        tokenize_example(tokenizer, _validate_example(_round_trip()))
