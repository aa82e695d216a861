"""A corpus of malformed training files, one defect each, with the answer each must get.

Each :class:`Case` is a file (bytes) and the issue loraforge must report for it: ``code``, ``line``
(1-based; None for the whole file) and JSON ``path`` ("" for the whole line). ``stage`` says who
catches it first:

* ``upload``: ``POST /v1/files`` refuses the file (400, every bad line listed);
* ``file``: the pre-flight task after the upload marks the file ``error``;
* ``job``: only a job (or dry run) can tell, because it needs the base model or the method.
* ``warning``: not an error; the job runs, and the issue is reported as a warning.

``method`` is the job's ``method.type``; ``job_code`` what the job fails with (empty: it passes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tests.helpers import SYSTEM, chat_examples

N = 12  # examples in each file: enough for a job (at least 10)
BAD = 3  # the line that carries the defect


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    code: str
    line: int | None
    path: str
    stage: str  # upload | file | job | warning
    method: str = "supervised"
    job_code: str = "invalid_training_file"
    job_param: str = "training_file"


def _lines(examples: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(e).encode() for e in examples]


def _join(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


def chat_file(bad_line: bytes | None = None, n: int = N) -> bytes:
    """``n`` valid chat lines, line ``BAD`` replaced by ``bad_line``."""
    lines = _lines(chat_examples(n))
    if bad_line is not None:
        lines[BAD - 1] = bad_line
    return _join(lines)


def _chat(messages: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"messages": messages, **extra}).encode()


def _turns(
    assistant: dict[str, Any] | None = None, user: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": SYSTEM},
        user or {"role": "user", "content": "Ticket 3: my order has not arrived"},
        assistant or {"role": "assistant", "content": '{"label": "refund"}'},
    ]


def preference_examples(n: int = N) -> list[dict[str, Any]]:
    return [
        {
            "input": {"messages": [{"role": "user", "content": f"Ticket {i}: where is my order?"}]},
            "preferred_output": [{"role": "assistant", "content": "It ships tomorrow."}],
            "non_preferred_output": [{"role": "assistant", "content": "No idea."}],
        }
        for i in range(n)
    ]


def preference_file(bad: dict[str, Any] | None = None) -> bytes:
    examples = preference_examples()
    if bad is not None:
        examples[BAD - 1] = bad
    return _join(_lines(examples))


def _pref(**changes: Any) -> dict[str, Any]:
    example = dict(preference_examples(1)[0])
    for key, value in changes.items():
        if value is None:
            example.pop(key, None)
        else:
            example[key] = value
    return example


_CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"id": 3}'}}
_TOOL_RESULT = {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'}
_TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def _tool_chat(calls: list[dict[str, Any]], results: list[dict[str, Any]], **extra: Any) -> bytes:
    messages = [
        {"role": "user", "content": "Where is order 3?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        *results,
        {"role": "assistant", "content": "It has shipped."},
    ]
    return _chat(messages, **extra)


def long_prompt_example() -> bytes:
    # ~3000 words before the assistant turn: cut at tiny-llama's 512 tokens, nothing trained is left.
    return _chat(_turns(user={"role": "user", "content": "please classify this message " * 750}))


def long_answer_example() -> bytes:
    return _chat(_turns(assistant={"role": "assistant", "content": "refund shipping label " * 400}))


def cases() -> list[Case]:
    """Every malformed file of the corpus."""
    m = "messages"
    out = [
        # --- refused at upload: not a JSON object per line ---
        Case("not_utf8", chat_file(b'{"messages": "caf\xe9"}'), "invalid_utf8", BAD, "", "upload"),
        Case("invalid_json", chat_file(b'{"messages": [}'), "invalid_json", BAD, "", "upload"),
        Case(
            "truncated_json", chat_file(b'{"messages": [{"role": "user"'), "invalid_json", BAD, "", "upload"
        ),
        Case("single_quotes", chat_file(b"{'messages': []}"), "invalid_json", BAD, "", "upload"),
        Case("trailing_comma", chat_file(b'{"messages": [],}'), "invalid_json", BAD, "", "upload"),
        Case("bom", b"\xef\xbb\xbf" + chat_file(), "invalid_json", 1, "", "upload"),
        Case("array_line", chat_file(b"[1, 2]"), "not_a_json_object", BAD, "", "upload"),
        Case("string_line", chat_file(b'"hello"'), "not_a_json_object", BAD, "", "upload"),
        Case("number_line", chat_file(b"42"), "not_a_json_object", BAD, "", "upload"),
        Case("null_line", chat_file(b"null"), "not_a_json_object", BAD, "", "upload"),
        Case(
            "raw_line_separator",
            chat_file('{"messages": [{"role": "user", "content": "a\u2028b"}]}'.encode()),
            "unsupported_line_break",
            BAD,
            "",
            "upload",
        ),
        # --- found by the pre-flight task after the upload ---
        Case("blank_line", chat_file(b""), "blank_line", BAD, "", "file"),
        Case("whitespace_line", chat_file(b"   \t "), "blank_line", BAD, "", "file"),
        Case("missing_messages", chat_file(b'{"msgs": []}'), "missing_messages", BAD, "", "file"),
        Case("empty_messages", chat_file(_chat([])), "invalid_messages", BAD, m, "file"),
        Case("messages_not_list", chat_file(b'{"messages": "hi"}'), "invalid_messages", BAD, m, "file"),
        Case(
            "message_not_object",
            chat_file(
                _chat([{"role": "user", "content": "x"}, "hello", {"role": "assistant", "content": "y"}])
            ),
            "invalid_message",
            BAD,
            "messages[1]",
            "file",
        ),
        Case(
            "missing_role",
            chat_file(_chat(_turns(user={"content": "no role"}))),
            "missing_role",
            BAD,
            "messages[1].role",
            "file",
        ),
        Case(
            "unknown_role_bot",
            chat_file(_chat([*_turns()[:2], {"role": "bot", "content": "x"}, _turns()[2]])),
            "unknown_role",
            BAD,
            "messages[2].role",
            "file",
        ),
        Case(
            "unknown_role_function",
            chat_file(_chat(_turns(user={"role": "function", "name": "f", "content": "x"}))),
            "unknown_role",
            BAD,
            "messages[1].role",
            "file",
        ),
        Case(
            "missing_content",
            chat_file(_chat(_turns(user={"role": "user"}))),
            "missing_content",
            BAD,
            "messages[1].content",
            "file",
        ),
        Case(
            "null_system_content",
            chat_file(_chat([{"role": "system", "content": None}, *_turns()[1:]])),
            "missing_content",
            BAD,
            "messages[0].content",
            "file",
        ),
        Case(
            "content_not_text",
            chat_file(_chat(_turns(user={"role": "user", "content": 42}))),
            "invalid_content",
            BAD,
            "messages[1].content",
            "file",
        ),
        Case(
            "image_part",
            chat_file(
                _chat(
                    _turns(
                        user={"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                    )
                )
            ),
            "unsupported_content_part",
            BAD,
            "messages[1].content[0].type",
            "file",
        ),
        Case(
            "text_part_without_text",
            chat_file(_chat(_turns(user={"role": "user", "content": [{"type": "text"}]}))),
            "invalid_content",
            BAD,
            "messages[1].content[0].text",
            "file",
        ),
        Case("no_assistant", chat_file(_chat(_turns()[:2])), "no_assistant_message", BAD, m, "file"),
        Case(
            "weight_2",
            chat_file(_chat(_turns(assistant={"role": "assistant", "content": "x", "weight": 2}))),
            "invalid_weight",
            BAD,
            "messages[2].weight",
            "file",
        ),
        Case(
            "weight_string",
            chat_file(_chat(_turns(assistant={"role": "assistant", "content": "x", "weight": "1"}))),
            "invalid_weight",
            BAD,
            "messages[2].weight",
            "file",
        ),
        Case(
            "weight_bool",
            chat_file(_chat(_turns(assistant={"role": "assistant", "content": "x", "weight": True}))),
            "invalid_weight",
            BAD,
            "messages[2].weight",
            "file",
        ),
        Case(
            "weight_on_user",
            chat_file(_chat(_turns(user={"role": "user", "content": "x", "weight": 1}))),
            "invalid_weight",
            BAD,
            "messages[1].weight",
            "file",
        ),
        Case(
            "tool_call_without_result",
            chat_file(_tool_chat([_CALL], [])),
            "tool_call_without_result",
            BAD,
            "messages[1].tool_calls[0].id",
            "file",
        ),
        Case(
            "tool_result_without_call",
            chat_file(_chat([*_turns()[:2], {**_TOOL_RESULT, "tool_call_id": "call_9"}, _turns()[2]])),
            "tool_result_without_call",
            BAD,
            "messages[2].tool_call_id",
            "file",
        ),
        Case(
            "tool_message_without_id",
            chat_file(_chat([*_turns()[:2], {"role": "tool", "content": "x"}, _turns()[2]])),
            "missing_tool_call_id",
            BAD,
            "messages[2].tool_call_id",
            "file",
        ),
        Case(
            "tool_arguments_not_string",
            chat_file(
                _tool_chat(
                    [{**_CALL, "function": {"name": "lookup", "arguments": {"id": 3}}}], [_TOOL_RESULT]
                )
            ),
            "invalid_tool_calls",
            BAD,
            "messages[1].tool_calls[0].function.arguments",
            "file",
        ),
        Case(
            "tool_arguments_not_json",
            chat_file(
                _tool_chat([{**_CALL, "function": {"name": "lookup", "arguments": "{id: 3"}}], [_TOOL_RESULT])
            ),
            "invalid_tool_calls",
            BAD,
            "messages[1].tool_calls[0].function.arguments",
            "file",
        ),
        Case(
            "duplicate_tool_call_id",
            chat_file(_tool_chat([_CALL, _CALL], [_TOOL_RESULT])),
            "duplicate_tool_call_id",
            BAD,
            "messages[1].tool_calls[1].id",
            "file",
        ),
        Case(
            "tool_arguments_not_object",
            chat_file(
                _tool_chat([{**_CALL, "function": {"name": "lookup", "arguments": "[3]"}}], [_TOOL_RESULT])
            ),
            "invalid_tool_calls",
            BAD,
            "messages[1].tool_calls[0].function.arguments",
            "file",
        ),
        Case(
            "unknown_tool",
            chat_file(
                _tool_chat(
                    [{**_CALL, "function": {"name": "ship", "arguments": "{}"}}], [_TOOL_RESULT], tools=_TOOLS
                )
            ),
            "unknown_tool",
            BAD,
            "messages[1].tool_calls[0].function.name",
            "file",
        ),
        Case(
            "parallel_tool_calls_disabled",
            chat_file(
                _tool_chat(
                    [_CALL, {**_CALL, "id": "call_2"}],
                    [_TOOL_RESULT, {**_TOOL_RESULT, "tool_call_id": "call_2"}],
                    parallel_tool_calls=False,
                )
            ),
            "parallel_tool_calls_disabled",
            BAD,
            "messages[1].tool_calls",
            "file",
        ),
        Case(
            "tools_not_list",
            chat_file(_chat(_turns(), tools="lookup")),
            "invalid_tools",
            BAD,
            "tools",
            "file",
        ),
        Case(
            "parallel_tool_calls_not_bool",
            chat_file(_chat(_turns(), parallel_tool_calls="yes")),
            "invalid_tools",
            BAD,
            "parallel_tool_calls",
            "file",
        ),
        Case(
            "legacy_prompt_completion",
            _join([json.dumps({"prompt": f"q{i}", "completion": "a"}).encode() for i in range(N)]),
            "legacy_prompt_completion",
            1,
            "",
            "file",
        ),
        Case(
            "mixed_formats",
            chat_file(json.dumps(preference_examples(1)[0]).encode()),
            "mixed_formats",
            BAD,
            "",
            "file",
        ),
        Case(
            "all_weight_zero",
            _join(
                [
                    _chat(_turns(assistant={"role": "assistant", "content": "x", "weight": 0}))
                    for _ in range(N)
                ]
            ),
            "no_trained_tokens",
            None,
            "",
            "file",
        ),
        # --- malformed DPO (preference) lines ---
        Case(
            "dpo_missing_preferred",
            preference_file(_pref(preferred_output=None)),
            "missing_preferred_output",
            BAD,
            "preferred_output",
            "file",
            method="dpo",
        ),
        Case(
            "dpo_two_rejected",
            preference_file(
                _pref(
                    non_preferred_output=[
                        {"role": "assistant", "content": "a"},
                        {"role": "assistant", "content": "b"},
                    ]
                )
            ),
            "invalid_preference_output",
            BAD,
            "non_preferred_output",
            "file",
            method="dpo",
        ),
        Case(
            "dpo_preferred_by_user",
            preference_file(_pref(preferred_output=[{"role": "user", "content": "a"}])),
            "invalid_preference_output",
            BAD,
            "preferred_output[0].role",
            "file",
            method="dpo",
        ),
        Case(
            "dpo_preferred_without_content",
            preference_file(_pref(preferred_output=[{"role": "assistant"}])),
            "missing_content",
            BAD,
            "preferred_output[0].content",
            "file",
            method="dpo",
        ),
        Case(
            "dpo_input_not_object",
            preference_file(_pref(input="where is my order?")),
            "invalid_preference_input",
            BAD,
            "input",
            "file",
            method="dpo",
        ),
        Case(
            "dpo_input_ends_with_assistant",
            preference_file(
                _pref(
                    input={
                        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
                    }
                )
            ),
            "invalid_preference_input",
            BAD,
            "input.messages[1].role",
            "file",
            method="dpo",
        ),
        Case(
            "dpo_input_unknown_role",
            preference_file(_pref(input={"messages": [{"role": "human", "content": "q"}]})),
            "unknown_role",
            BAD,
            "input.messages[0].role",
            "file",
            method="dpo",
        ),
        # --- only a job against its base model and method can tell ---
        Case(
            "seven_examples",
            chat_file(n=7),
            "too_few_examples",
            None,
            "",
            "job",
            job_code="invalid_n_examples",
        ),
        Case(
            "prompt_longer_than_context",
            chat_file(long_prompt_example()),
            "example_too_long",
            BAD,
            "",
            "job",
        ),
        Case("chat_file_for_dpo", chat_file(), "wrong_method", None, "", "job", method="dpo"),
        Case("dpo_file_for_supervised", preference_file(), "wrong_method", None, "", "job"),
        Case(
            "valid_dpo_file",
            preference_file(),
            "",
            None,
            "",
            "job",
            method="dpo",
            job_code="",  # a DPO job trains it: no job error
        ),
        # --- not errors: the job trains and says so ---
        Case(
            "text_beside_tool_calls",
            chat_file(
                _tool_chat([{**_CALL}], [_TOOL_RESULT]).replace(b'"content": null', b'"content": "Looking."')
            ),
            "tool_call_content_ignored",
            BAD,
            "messages[1].content",
            "warning",
        ),
        Case(
            "answer_longer_than_context",
            chat_file(long_answer_example()),
            "example_truncated",
            BAD,
            "",
            "warning",
        ),
    ]
    return out


def expected_str(case: Case) -> str:
    """How the issue appears in ``status_details`` / messages: ``line 3: messages[1].role ... (code)``."""
    where = f"line {case.line}: " if case.line is not None else ""
    return where + (f"{case.path} " if case.path else "")


def find_issue(issues: list[dict[str, Any]], case: Case) -> dict[str, Any] | None:
    """The issue dict (from a report's ``errors``/``warnings``) matching the case, or None."""
    for issue in issues:
        if issue["code"] == case.code and issue["line"] == case.line and (issue["path"] or "") == case.path:
            return issue
    return None
