"""Check one preference (DPO) line, OpenAI's format:

``{"input": {"messages": [...], "tools"?, "parallel_tool_calls"?},
"preferred_output": [{"role": "assistant", "content": ...}],
"non_preferred_output": [{"role": "assistant", "content": ...}]}``
"""

from __future__ import annotations

from typing import Any

from loraforge.preflight.chat import Report, check_message, flatten_content

PREFERENCE_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})


def _check_output(obj: dict[str, Any], key: str, error: Report) -> str | None:
    if key not in obj:
        error(f"missing_{key}", "is missing: a list with one assistant message is required", key)
        return None
    output = obj[key]
    if not isinstance(output, list) or len(output) != 1:
        error("invalid_preference_output", "must be a list with exactly one assistant message", key)
        return None
    msg = output[0]
    where = f"{key}[0]"
    if not isinstance(msg, dict) or msg.get("role") != "assistant":
        role = msg.get("role") if isinstance(msg, dict) else None
        error(
            "invalid_preference_output", f"must be an assistant message, got role {role!r}", where + ".role"
        )
        return None
    if msg.get("content") is None:
        error(
            "missing_content", "is missing (a string or a list of text parts is required)", where + ".content"
        )
        return None
    return flatten_content(msg["content"], where + ".content", error)


def check_preference_line(obj: dict[str, Any], add: Report, warn: Report) -> bool:
    """Validate a DPO line; True if it has no errors (each reported through ``add``)."""
    errors = 0

    def error(code: str, message: str, path: str) -> None:
        nonlocal errors
        errors += 1
        add(code, message, path)

    for key in obj.keys() - PREFERENCE_KEYS:
        warn("unknown_key", "is not a preference example field and is ignored", key)
    inp = obj.get("input")
    if not isinstance(inp, dict):
        error("invalid_preference_input", "must be an object with a 'messages' list", "input")
    else:
        messages = inp.get("messages")
        if not isinstance(messages, list) or not messages:
            error("invalid_preference_input", "must be a non-empty list of messages", "input.messages")
        else:
            for i, msg in enumerate(messages):
                check_message(msg, f"input.messages[{i}]", error, warn)
            last = messages[-1]
            if isinstance(last, dict) and last.get("role") in ("system", "developer", "assistant"):
                error(
                    "invalid_preference_input",
                    "must end with a user message: the outputs answer it",
                    f"input.messages[{len(messages) - 1}].role",
                )
    preferred = _check_output(obj, "preferred_output", error)
    rejected = _check_output(obj, "non_preferred_output", error)
    if preferred is not None and preferred == rejected:
        warn("identical_outputs", "is the same as preferred_output: nothing to learn", "non_preferred_output")
    return errors == 0
