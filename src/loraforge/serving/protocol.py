"""Wire models of the engine's OpenAI chat completions (no torch).

Requests ignore unknown fields and accept ``null`` for every optional one (OPENAI_CONTRACT §0, §10).
Responses are built as plain dicts with OpenAI's field names and literals. The adapter protocol
(load/unload, model list, health) is ``loraforge.contracts.engine``, shared with the engine client.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraforge.contracts.ranges import explained, int_range

# OpenAI's ``seed`` is a signed 64-bit integer; torch seeds take it (and ``seed + i`` for ``n``).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(BaseModel):
    """One part of a list-valued message content; non-text parts are refused by the engine."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class FunctionCall(_Request):
    name: str
    arguments: str | dict[str, Any]  # OpenAI sends a JSON string; a mapping is accepted too


class ToolCall(_Request):
    """An assistant message's earlier tool call (conversation history)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(BaseModel):
    """OpenAI's ``FunctionObject``; kept whole (extra fields included): the template renders it."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    """OpenAI's ``ChatCompletionTool`` (function tools only: custom tools are refused)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: FunctionDefinition


class StreamOptions(_Request):
    include_usage: bool | None = None


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: the fields this engine honours; the rest are ignored."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    # Each refusal says the whole range and the value sent (``contracts.ranges.explained``).
    max_tokens: Annotated[Annotated[int, Field(ge=1)] | None, explained("a positive integer")] = None
    max_completion_tokens: Annotated[Annotated[int, Field(ge=1)] | None, explained("a positive integer")] = (
        None
    )
    temperature: Annotated[Annotated[float, Field(ge=0, le=2)] | None, explained("a number from 0 to 2")] = (
        None
    )
    top_p: Annotated[Annotated[float, Field(ge=0, le=1)] | None, explained("a number from 0 to 1")] = None
    n: Annotated[Annotated[int, Field(ge=1, le=128)] | None, explained(int_range(1, 128))] = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: Annotated[
        Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None, explained(int_range(SEED_MIN, SEED_MAX))
    ] = None
    logprobs: bool | None = None
    tools: list[Tool] | None = None
    # "none" | "auto" | "required" | {"type": "function", ...} | {"type": "allowed_tools", ...}:
    # checked by serving.tools.plan_tools, which words the errors.
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @property
    def budget(self) -> int | None:
        """``max_completion_tokens``, else the deprecated ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def completion_id() -> str:
    """A fresh ``chatcmpl-…`` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    """Unix seconds as an int (the SDK does not coerce floats)."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def assistant_message(content: str | None, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """OpenAI's ``ChatCompletionResponseMessage``: text, or tool calls with ``content`` null."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def chat_completion(
    *,
    cid: str,
    created: int,
    model: str,
    choices: list[tuple[dict[str, Any], str]],
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """A non-streaming ``ChatCompletion``; ``choices`` are ``(message, finish_reason)`` pairs (``n``)."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": None}
            for index, (message, finish_reason) in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(
    *,
    cid: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    include_usage: bool = False,
    usage_value: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``delta=None`` makes the usage chunk (``choices: []``)."""
    chunk: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if include_usage:
        chunk["usage"] = usage_value
    return chunk
