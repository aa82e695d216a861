"""Check one chat (SFT) line: ``{"messages": [...], "tools"?, "parallel_tool_calls"?}``.

Accepts what OpenAI's fine-tuning API accepts for chat files (system / developer / user / assistant
/ tool roles; content as a string or text parts; assistant ``tool_calls`` and ``weight`` 0|1) and
returns the conversation normalised the way the trainer renders it (``trainer/data.py``): role,
content flattened to one string, weight, assistant ``tool_calls`` with their arguments parsed
(``catalog.tool_calls.template_tool_calls``), a tool message's ``tool_call_id``; and the tools.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loraforge.catalog.tool_calls import template_tool_calls

ROLES = ("system", "developer", "user", "assistant", "tool")
_ROLE_SET = frozenset(ROLES)
_ROLE_LIST = ", ".join(ROLES)
MESSAGE_KEYS = frozenset({"role", "content", "name", "weight", "tool_calls", "tool_call_id"})
LINE_KEYS = frozenset({"messages", "tools", "parallel_tool_calls"})

# add(code, message, path)
Report = Callable[[str, str, str], None]


@dataclass
class ChatExample:
    """A valid chat line, normalised for the trainer's chat template."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None  # the line's tool definitions, if any
    has_tool_calls: bool = False
    has_tools: bool = False
    trained_messages: int = 0  # assistant messages with weight 1
    tool_call_ids: list[str] = field(default_factory=list)
    tool_call_paths: list[str] = field(default_factory=list)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def flatten_content(content: Any, where: str, add: Report) -> str | None:
    """``content`` as one string (text parts joined by newlines, as the trainer does), or None."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        add("invalid_content", f"must be a string or a list of text parts, got {_short(content)}", where)
        return None
    texts: list[str] = []
    ok = True
    for j, part in enumerate(content):
        path = f"{where}[{j}]"
        if not isinstance(part, dict):
            add("invalid_content", f"must be a content part object, got {_short(part)}", path)
            ok = False
        elif part.get("type") != "text":
            add(
                "unsupported_content_part",
                f"type {_short(part.get('type'))} is not supported: only text parts can be trained",
                path + ".type",
            )
            ok = False
        elif not isinstance(part.get("text"), str):
            add("invalid_content", "text part has no string 'text'", path + ".text")
            ok = False
        else:
            texts.append(part["text"])
    return "\n".join(texts) if ok else None


@dataclass(frozen=True)
class _Call:
    """A well-formed tool call of an assistant message: its id, name and JSON path."""

    id: str
    name: str | None  # None: the call has no usable name (reported)
    path: str


def _check_tool_calls(calls: Any, where: str, add: Report) -> list[_Call]:
    """Validate an assistant's ``tool_calls``; return each well-formed call."""
    if not isinstance(calls, list) or not calls:
        add("invalid_tool_calls", "must be a non-empty list of tool calls", where)
        return []
    found: list[_Call] = []
    for j, call in enumerate(calls):
        path = f"{where}[{j}]"
        if not isinstance(call, dict):
            add("invalid_tool_calls", f"must be an object, got {_short(call)}", path)
            continue
        call_id, function = call.get("id"), call.get("function")
        if not isinstance(call_id, str) or not call_id:
            add("invalid_tool_calls", "is missing its string 'id'", path + ".id")
            call_id = None
        if call.get("type", "function") != "function":
            add("invalid_tool_calls", f"type {_short(call.get('type'))} is not 'function'", path + ".type")
        name = None
        if not isinstance(function, dict):
            add("invalid_tool_calls", "is missing its 'function' object", path + ".function")
        else:
            name = function.get("name")
            if not isinstance(name, str) or not name:
                add("invalid_tool_calls", "is missing its string 'name'", path + ".function.name")
                name = None
            _check_arguments(function.get("arguments"), path + ".function.arguments", add)
        if call_id is not None:
            found.append(_Call(call_id, name, path))
    return found


def _check_arguments(arguments: Any, path: str, add: Report) -> None:
    """OpenAI sends a call's arguments as a JSON string; the template needs an object in it."""
    if not isinstance(arguments, str):
        add("invalid_tool_calls", "must be a JSON string", path)
        return
    try:
        parsed = json.loads(arguments)
    except ValueError:
        add("invalid_tool_calls", "is not valid JSON", path)
        return
    if not isinstance(parsed, dict):
        add(
            "invalid_tool_calls",
            f"must be a JSON object of argument names and values, got {_short(arguments)}",
            path,
        )


def _check_tools(obj: dict[str, Any], add: Report) -> None:
    tools = obj.get("tools")
    if "tools" in obj and tools is not None:
        if not isinstance(tools, list):
            add("invalid_tools", "must be a list of tool definitions", "tools")
        else:
            for j, tool in enumerate(tools):
                path = f"tools[{j}]"
                function = tool.get("function") if isinstance(tool, dict) else None
                if not isinstance(tool, dict) or tool.get("type", "function") != "function":
                    add("invalid_tools", 'must be {"type": "function", "function": {...}}', path)
                elif not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    add("invalid_tools", "is missing its string 'name'", path + ".function.name")
                elif "parameters" in function and not isinstance(function["parameters"], dict):
                    add("invalid_tools", "must be a JSON Schema object", path + ".function.parameters")
    parallel = obj.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        add("invalid_tools", f"must be true or false, got {_short(parallel)}", "parallel_tool_calls")


def check_message(
    msg: Any, where: str, add: Report, warn: Report
) -> tuple[dict[str, Any] | None, list[_Call]]:
    """Validate one message; return its normalised form (None if it has errors) and its tool calls."""
    if not isinstance(msg, dict):
        add("invalid_message", f"must be an object, got {_short(msg)}", where)
        return None, []
    role = msg.get("role")
    if role is None:
        add("missing_role", f"is missing; it must be one of {_ROLE_LIST}", where + ".role")
        return None, []
    if role not in _ROLE_SET:
        add("unknown_role", f"{_short(role)} is not one of {_ROLE_LIST}", where + ".role")
        return None, []
    errors = 0

    def error(code: str, message: str, path: str) -> None:
        nonlocal errors
        errors += 1
        add(code, message, path)

    if len(msg) > 2 or "content" not in msg:
        for key in msg.keys() - MESSAGE_KEYS:
            warn("unknown_key", "is not a message field and is ignored", f"{where}.{key}")
    calls: list[_Call] = []
    content = msg.get("content")
    has_calls = role == "assistant" and msg.get("tool_calls") is not None
    if "tool_calls" in msg:
        if role == "assistant":
            if has_calls:
                calls = _check_tool_calls(msg["tool_calls"], where + ".tool_calls", error)
        else:
            error("invalid_tool_calls", "only assistant messages can make tool calls", where + ".tool_calls")
    text: str | None = None
    if content is None:
        if not has_calls:
            error(
                "missing_content",
                "is missing (a string or a list of text parts is required)",
                where + ".content",
            )
    else:
        text = flatten_content(content, where + ".content", error)
        if has_calls and text and text.strip():
            warn(
                "tool_call_content_ignored",
                "is not trained: in the chat template's tool-call format an assistant turn that "
                "calls tools holds the calls only",
                where + ".content",
            )
    if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
        error(
            "missing_tool_call_id",
            "is missing: a tool message answers one tool call",
            where + ".tool_call_id",
        )
    norm: dict[str, Any] = {"role": role, "content": text or ""}
    if has_calls and errors == 0:
        norm["tool_calls"] = template_tool_calls(msg["tool_calls"])
    if role == "tool" and isinstance(msg.get("tool_call_id"), str):
        norm["tool_call_id"] = msg["tool_call_id"]
    if "weight" in msg:
        weight = msg["weight"]
        if role != "assistant":
            error("invalid_weight", "is only allowed on assistant messages", where + ".weight")
        elif isinstance(weight, bool) or weight not in (0, 1):
            error("invalid_weight", f"must be 0 or 1, got {_short(weight)}", where + ".weight")
        else:
            norm["weight"] = int(weight)
    return (norm if errors == 0 else None), calls


def _tool_names(obj: dict[str, Any]) -> set[str] | None:
    """The function names the line defines in ``tools`` (None: no usable ``tools``)."""
    tools = obj.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    return {
        t["function"]["name"]
        for t in tools
        if isinstance(t, dict)
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    }


def check_chat_line(obj: dict[str, Any], add: Report, warn: Report) -> ChatExample | None:
    """Validate a chat line; None if it has errors (each reported through ``add``)."""
    errors = 0

    def error(code: str, message: str, path: str) -> None:
        nonlocal errors
        errors += 1
        add(code, message, path)

    if len(obj) > 1:
        for key in obj.keys() - LINE_KEYS:
            warn("unknown_key", "is not a chat example field and is ignored", key)
        _check_tools(obj, error)
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        error("invalid_messages", "must be a non-empty list of messages", "messages")
        return None
    normalised: list[dict[str, Any]] = []
    names = _tool_names(obj)
    example = ChatExample(messages=normalised, has_tools=bool(obj.get("tools")))
    if names is not None:
        example.tools = obj["tools"]
    pending: dict[str, str] = {}  # tool call id -> its path, until a tool message answers it
    last_calls: set[str] = set()  # ids of the calls made by the latest message
    has_assistant = False
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        norm, calls = check_message(msg, where, error, warn)
        role = msg.get("role") if isinstance(msg, dict) else None
        has_assistant = has_assistant or role == "assistant"
        if calls and len(calls) > 1 and obj.get("parallel_tool_calls") is False:
            error(
                "parallel_tool_calls_disabled",
                f"makes {len(calls)} tool calls, but the line sets parallel_tool_calls to false",
                where + ".tool_calls",
            )
        last_calls = {call.id for call in calls}
        for call in calls:
            if call.id in example.tool_call_ids:
                error(
                    "duplicate_tool_call_id",
                    f"{_short(call.id)} is used by an earlier tool call",
                    call.path + ".id",
                )
            if names is not None and call.name is not None and call.name not in names:
                error(
                    "unknown_tool",
                    f"{_short(call.name)} is not a function defined in the line's tools",
                    call.path + ".function.name",
                )
            pending[call.id] = call.path + ".id"
            example.tool_call_ids.append(call.id)
            example.tool_call_paths.append(call.path.rsplit("[", 1)[0])
        if role == "tool" and isinstance(msg.get("tool_call_id"), str):
            if pending.pop(msg["tool_call_id"], None) is None:
                error(
                    "tool_result_without_call",
                    f"{_short(msg['tool_call_id'])} matches no earlier assistant tool call",
                    where + ".tool_call_id",
                )
        if norm is not None:
            if role == "assistant":
                example.trained_messages += norm.get("weight", 1)
            normalised.append(norm)
    # A conversation may end with the assistant's calls unanswered: that is how OpenAI's format
    # teaches a model to call a tool. Any other call needs its tool message.
    for call_id, path in pending.items():
        if call_id not in last_calls:
            error("tool_call_without_result", f"{_short(call_id)} has no tool message answering it", path)
    if not has_assistant:
        error("no_assistant_message", "has no assistant message to train on", "messages")
    example.has_tool_calls = bool(example.tool_call_ids)
    return example if errors == 0 else None
