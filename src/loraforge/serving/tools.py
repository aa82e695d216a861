"""Tool calling on the engine (no torch): a chat request's ``tools``/``tool_choice`` -> what the
prompt renders and which output is read back as calls; OpenAI's message and stream shapes for them.

The prompt renders the tools with the chat template that serves the model (an adapter's own, from
its manifest) and the model's output is read back with that template's tool-call syntax
(:mod:`loraforge.catalog.tool_calls`). Output that is not entirely well-formed calls to functions
of the request is answered as plain content, never an error.

``tool_choice``:

* ``"auto"`` (the default with tools): the model chooses; its output is parsed.
* ``"none"``: the tools are left out of the prompt and nothing is parsed (the model answers as
  it would without tools, instead of writing calls nobody reads).
* ``"required"`` / a named function: the completion is started with the template's call prefix
  (``{"name":`` or ``{"name": "f", "parameters":``), so the model continues a call; there is no
  constrained decoding, so a model that still writes no valid call gets its text back as content.
* ``{"type": "allowed_tools", ...}``: every tool is rendered, only the allowed ones are parsed.

``parallel_tool_calls: false`` keeps the first call. Streaming sends text at once when it cannot
be a call; a completion that may be one is held until it ends, then sent as tool-call deltas (one
with the id and name, one with the arguments) or, if it is not a call after all, as content:
holding it is what makes the fallback to content possible once deltas would have gone out.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from loraforge.catalog.tool_calls import (
    ParsedCall,
    forced_prefix,
    may_be_tool_call,
    parse_tool_calls,
    tool_format,
)
from loraforge.serving.errors import InvalidRequest
from loraforge.serving.protocol import ChatCompletionRequest


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for the prompt and the output.

    Attributes:
        tools: the definitions to render into the prompt (None: none).
        names: the functions the output may call (None: the output is not parsed).
        forced: the model must call a tool (``required``, a named function, allowed_tools required).
        forced_name: the one function it must call, if named.
        parallel: more than one call per answer is allowed.
    """

    tools: list[dict[str, Any]] | None = None
    names: frozenset[str] | None = None
    forced: bool = False
    forced_name: str | None = None
    parallel: bool = True


NO_TOOLS = ToolPlan()


def _choice_error(message: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid value for 'tool_choice': {message}", param="tool_choice")


def plan_tools(body: ChatCompletionRequest) -> ToolPlan:
    """Check ``tools``, ``tool_choice`` and ``parallel_tool_calls`` and say what they mean.

    Raises:
        InvalidRequest: ``tool_choice`` without tools, an unknown mode or function, duplicate
            function names.
    """
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise _choice_error("'tool_choice' is only allowed when 'tools' are specified.")
        return NO_TOOLS
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    names = [tool.function.name for tool in body.tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("Function names in 'tools' must be unique.", param="tools")
    parallel = body.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        return ToolPlan(tools, frozenset(names), parallel=parallel)
    if choice == "none":
        return NO_TOOLS
    if choice == "required":
        return ToolPlan(tools, frozenset(names), forced=True, parallel=parallel)
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise _choice_error(f"function {name!r} is not one of the functions in 'tools'.")
        return ToolPlan(tools, frozenset([name]), forced=True, forced_name=name, parallel=parallel)
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        return _allowed_tools(choice.get("allowed_tools"), tools, names, parallel)
    raise _choice_error("expected 'none', 'auto', 'required', or a function or allowed_tools object.")


def _allowed_tools(spec: Any, tools: list[dict[str, Any]], names: list[str], parallel: bool) -> ToolPlan:
    mode = spec.get("mode") if isinstance(spec, dict) else None
    listed = spec.get("tools") if isinstance(spec, dict) else None
    if mode not in ("auto", "required") or not isinstance(listed, list) or not listed:
        raise _choice_error("allowed_tools needs a 'mode' (auto or required) and a non-empty 'tools' list.")
    allowed = set()
    for item in listed:
        function = item.get("function") if isinstance(item, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise _choice_error(f"allowed tool {name!r} is not one of the functions in 'tools'.")
        allowed.add(name)
    return ToolPlan(tools, frozenset(allowed), forced=mode == "required", parallel=parallel)


def tool_prompt(model: str, template: str, plan: ToolPlan) -> tuple[str | None, str]:
    """The serving template's tool syntax and the call prefix the prompt must end with.

    Raises:
        InvalidRequest: tools were given, but ``template`` declares no tool-call format (an adapter
            trained before templates rendered tools).
    """
    if not plan.tools:
        return None, ""
    fmt = tool_format(template)
    if fmt is None:
        raise InvalidRequest(
            f"The model `{model}` cannot call tools: its chat template has no tool-call format.",
            param="tools",
        )
    return fmt, forced_prefix(fmt, plan.forced_name) if plan.forced else ""


def read_calls(plan: ToolPlan, tool_format: str | None, text: str) -> list[dict[str, Any]] | None:
    """``text`` (forced prefix included) as OpenAI tool calls, or None if it is not one."""
    if plan.names is None or tool_format is None:
        return None
    calls = parse_tool_calls(text, tool_format, plan.names)
    if not calls:
        return None
    return [_tool_call(call) for call in (calls if plan.parallel else calls[:1])]


def _tool_call(call: ParsedCall) -> dict[str, Any]:
    """OpenAI's ``ChatCompletionMessageToolCall``."""
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


class ToolStream:
    """Turns a streamed completion into content deltas, or holds it while it may be tool calls.

    Args:
        plan: the request's tools.
        tool_format: the serving template's tool-call syntax (None: no tools).
        prefill: the forced call prefix the prompt ended with ("" if none).
    """

    def __init__(self, plan: ToolPlan, tool_format: str | None, prefill: str = "") -> None:
        self._plan, self._format = plan, tool_format
        self._held = prefill
        self._live = plan.names is None or tool_format is None

    @property
    def parsing(self) -> bool:
        """Whether the output may still become tool calls (content is then held back)."""
        return not self._live

    def feed(self, text: str) -> str:
        """Take the next text delta; return the content to send now ("" while it is held)."""
        if self._live:
            return text
        self._held += text
        assert self._format is not None
        if may_be_tool_call(self._held, self._format):
            return ""
        self._live = True
        out, self._held = self._held, ""
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]] | None]:
        """At the end: the content still held, or the tool calls it turned out to be."""
        if self._live:
            return "", None
        calls = read_calls(self._plan, self._format, self._held)
        return ("", calls) if calls else (self._held, None)


def call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streaming ``delta`` objects for ``calls``: per call, its id and name, then its arguments."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(calls):
        function = call["function"]
        head = {"name": function["name"], "arguments": ""}
        deltas.append(
            {"tool_calls": [{"index": index, "id": call["id"], "type": "function", "function": head}]}
        )
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": function["arguments"]}}]})
    return deltas


__all__ = ["NO_TOOLS", "ToolPlan", "ToolStream", "call_deltas", "plan_tools", "read_calls", "tool_prompt"]
