"""Pure helpers for chat requests: message flattening and stop-string search (no torch)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from loraforge.catalog.tool_calls import template_tool_calls
from loraforge.serving.errors import InvalidRequest

# Part types whose text reaches the prompt; anything else (images, audio, files) is refused.
_TEXT_PARTS = {"text": "text", "refusal": "refusal"}
# OpenAI's "developer" role is the newer name of "system"; Llama templates only know "system".
_ROLE_ALIASES = {"developer": "system"}


def flatten_content(content: Any, index: int) -> str:
    """Turn OpenAI message content (a string, a list of parts, or null) into plain text.

    Args:
        content: ``str``, ``None`` or a list of ``{"type": "text", "text": ...}`` parts.
        index: the message's position, for the error's ``param``.

    Raises:
        InvalidRequest: a part is not text (this engine serves text-only models).
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        key = _TEXT_PARTS.get(str(kind))
        if key is None or not isinstance(part.get(key), str):
            raise InvalidRequest(
                f"Unsupported content part type {kind!r}: this model accepts text only.",
                param=f"messages.[{index}].content",
            )
        texts.append(part[key])
    return "".join(texts)


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``[{"role", "content"}]`` with flattened text content, ready for ``apply_chat_template``;
    an assistant's ``tool_calls`` (arguments parsed, as the trainer hands them to the template) and
    a tool message's ``tool_call_id`` are kept.

    Raises:
        InvalidRequest: no messages, non-text content, or tool-call arguments that are not a JSON object.
    """
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    out = []
    for i, message in enumerate(messages):
        role = str(message.get("role", ""))
        norm: dict[str, Any] = {
            "role": _ROLE_ALIASES.get(role, role),
            "content": flatten_content(message.get("content"), i),
        }
        calls = message.get("tool_calls")
        if calls and role == "assistant":
            try:
                norm["tool_calls"] = template_tool_calls(calls)
            except ValueError as exc:
                raise InvalidRequest(
                    f"messages[{i}].tool_calls: function arguments must be a JSON object ({exc}).",
                    param=f"messages.[{i}].tool_calls",
                ) from exc
        if message.get("tool_call_id") is not None:
            norm["tool_call_id"] = message["tool_call_id"]
        out.append(norm)
    return out


def max_prompt_chars(vocab: Iterable[str], context_length: int) -> int:
    """The most characters a prompt can have and still fit ``context_length`` tokens.

    No token stands for more characters than its vocabulary entry is long (byte-level entries
    spell one byte per character; added tokens are spelled out), so a text of more than
    ``context_length * longest entry`` characters needs more than ``context_length`` tokens.
    This bound refuses a huge prompt without tokenizing it, and never refuses one that fits.
    """
    return context_length * max((len(token) for token in vocab), default=1)


def check_prompt_size(chat: Sequence[Mapping[str, str]], limit: int, context_length: int) -> None:
    """Refuse messages whose text alone is longer than ``limit`` characters (see :func:`max_prompt_chars`).

    Raises:
        InvalidRequest: the messages cannot fit the context, whatever the tokenizer makes of them.
    """
    chars = sum(len(message["content"]) for message in chat)
    if chars > limit:
        raise InvalidRequest(
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"messages have {chars} characters, more than {context_length} tokens can hold.",
            param="messages",
            code="context_length_exceeded",
        )


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None
