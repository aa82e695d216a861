"""The tool-call syntax of the catalog's chat templates: how calls are handed to a template, and how
a model's output is read back into OpenAI tool calls. Pure Python (the API, the worker, the trainer
and the engine all use it).

A template declares its syntax with a marker in a Jinja comment, ``loraforge:tool_format=NAME``,
so the engine reads an adapter's output with the syntax of the template pinned in ITS manifest (an
adapter trained before templates had tool calls has no marker: it is not offered tools). One
syntax exists today, ``llama3_json``: Llama 3.1's JSON tool calling as Meta documents it, the
assistant turn ``{"name": "get_weather", "parameters": {"city": "Paris"}}``, several calls joined
by ``"; "`` (what vLLM's ``llama3_json`` tool parser reads, so a vLLM replica can serve the same
adapters with ``--tool-call-parser llama3_json``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LLAMA3_JSON = "llama3_json"
_MARKER = re.compile(r"loraforge:tool_format=([A-Za-z0-9_]+)")
# Llama 3.1 may open a tool call with <|python_tag|> (a special token: decoding usually drops it).
_PYTHON_TAG = "<|python_tag|>"
_JSON = json.JSONDecoder()


def tool_format(template: str) -> str | None:
    """The tool-call syntax a chat template declares (``llama3_json``), or None if it has none."""
    found = _MARKER.search(template)
    return found.group(1) if found and found.group(1) in _FORCED_PREFIX else None


def template_tool_calls(calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` as chat templates take them: ``arguments`` parsed into a dict.

    OpenAI sends ``function.arguments`` as a JSON string; Hugging Face chat templates (Meta's
    included) expect a mapping and serialise it with ``tojson``, which gives every trained call
    the same canonical spelling whatever the spacing of the file.

    Args:
        calls: validated tool calls (``{"id", "type", "function": {"name", "arguments"}}``).

    Returns:
        New dicts; the input is not modified.

    Raises:
        ValueError: an ``arguments`` string is not a JSON object.
    """
    out = []
    for call in calls:
        function = call["function"]
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        if not isinstance(arguments, dict):
            raise ValueError("tool call arguments must be a JSON object")
        out.append(
            {
                "id": call.get("id"),
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return out


@dataclass(frozen=True)
class ParsedCall:
    """One tool call read from a model's output: the function's name and its JSON arguments."""

    name: str
    arguments: str  # a JSON object, serialised as OpenAI sends it


def _llama3_json(text: str, names: Collection[str] | None) -> list[ParsedCall] | None:
    rest = text.strip()
    rest = rest.removeprefix(_PYTHON_TAG).lstrip()
    calls: list[ParsedCall] = []
    while rest:
        try:
            obj, end = _JSON.raw_decode(rest)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        arguments = obj.get("parameters", obj.get("arguments"))
        if not isinstance(arguments, dict) or len(obj) != 2:
            return None
        if names is not None and obj["name"] not in names:
            return None
        calls.append(ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False)))
        rest = rest[end:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
            if not rest:
                return None
        elif rest:
            return None
    return calls or None


_PARSERS = {LLAMA3_JSON: _llama3_json}
# What a forced call starts with: any function (None), or the named one. It stops before a space:
# byte-level BPE joins a space to the word after it, so a prefix ending in one would be tokenized
# differently from the trained text.
_FORCED_PREFIX = {
    LLAMA3_JSON: lambda name: '{"name":' if name is None else f'{{"name": {json.dumps(name)}, "parameters":',
}


def parse_tool_calls(text: str, fmt: str, names: Collection[str] | None = None) -> list[ParsedCall] | None:
    """Read ``text`` (a whole completion) as tool calls in syntax ``fmt``.

    Args:
        text: the model's output (any forced prefix included).
        fmt: the template's tool format (:func:`tool_format`).
        names: the functions that may be called (None: any name).

    Returns:
        The calls, in order; None if ``text`` is not entirely well-formed calls to known functions
        (the caller then answers with the text as plain content).
    """
    return _PARSERS[fmt](text, names)


def may_be_tool_call(text: str, fmt: str) -> bool:
    """Whether ``text``, the start of a completion, may still turn out to be tool calls.

    Used while streaming: text that cannot be a call is sent as content at once.
    """
    head = text.lstrip().removeprefix(_PYTHON_TAG).lstrip()
    if fmt == LLAMA3_JSON:
        return head == "" or head.startswith("{") or _PYTHON_TAG.startswith(head)
    return False


def forced_prefix(fmt: str, name: str | None) -> str:
    """The completion prefix that makes the model call a tool (``name``: that function; None: any).

    The engine puts it after the generation prompt, so the model continues a call it cannot
    avoid: how ``tool_choice: "required"`` or a named function is honoured without constrained
    decoding. The prefix is part of the text that is parsed.
    """
    prefix: str = _FORCED_PREFIX[fmt](name)
    return prefix


__all__ = [
    "LLAMA3_JSON",
    "ParsedCall",
    "forced_prefix",
    "may_be_tool_call",
    "parse_tool_calls",
    "template_tool_calls",
    "tool_format",
]
