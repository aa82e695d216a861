"""Render a catalog chat template the way ``transformers``' ``apply_chat_template`` does, without
importing transformers (the API and worker processes never load torch).

The environment mirrors ``transformers.utils.chat_template_utils._cached_compile_jinja_template``:
a sandboxed Jinja environment with ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, the same
``tojson``/``raise_exception``/``strftime_now`` helpers, and a ``{% generation %}`` tag that records
the character span of every assistant block (transformers' ``AssistantTracker``). Token counts are
then derived from those spans exactly as ``return_assistant_tokens_mask`` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loraforge.catalog.tool_calls import tool_format

# (rendered blocks so far, generation spans found) while a render is being tracked.
_Tracking = tuple[list[str], list[tuple[int, int]]]


class GenerationTracker(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}``: renders its body and records its character span."""

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment) -> None:
        super().__init__(environment)
        self._tracking: ContextVar[_Tracking | None] = ContextVar("generation_tracking", default=None)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation", []), [], [], body).set_lineno(lineno)

    def _generation(self, caller: Any) -> str:
        text: str = caller()
        tracking = self._tracking.get()
        if tracking is not None:
            blocks, spans = tracking
            start = len("".join(blocks))
            spans.append((start, start + len(text)))
        return text

    @contextmanager
    def track(self, blocks: list[str], spans: list[tuple[int, int]]) -> Iterator[None]:
        token = self._tracking.set((blocks, spans))
        try:
            yield
        finally:
            self._tracking.reset(token)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; transformers overrides it the same way.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template that renders a conversation and its assistant (generation) spans."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTracker, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)
        self._tracker: GenerationTracker = next(
            ext for ext in env.extensions.values() if isinstance(ext, GenerationTracker)
        )
        self._special = dict(special_tokens)
        self.source = source

    def render(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        """Render ``messages`` (no generation prompt) and return the text and generation spans.

        Args:
            messages: the conversation, as the trainer passes it to ``apply_chat_template``.
            tools: the example's tool definitions (None: none), as the trainer passes them.

        Returns:
            The rendered text and the ``[start, end)`` character span of each generation block.

        Raises:
            jinja2.TemplateError: the template refused the conversation.
        """
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        with self._tracker.track(blocks, spans):
            for block in self._template.generate(
                messages=messages, tools=tools, documents=None, add_generation_prompt=False, **self._special
            ):
                blocks.append(block)
        return "".join(blocks), spans

    @property
    def tool_format(self) -> str | None:
        """The tool-call syntax the template declares (None: it renders no tools or tool calls)."""
        return tool_format(self.source)

    def mentions(self, name: str) -> bool:
        """Whether the template source refers to ``name`` (e.g. ``tool_calls``) at all."""
        return name in self.source


@lru_cache(maxsize=16)
def compile_template(source: str, special_items: tuple[tuple[str, str], ...]) -> ChatTemplate:
    """A cached :class:`ChatTemplate` for ``source`` with the given special-token variables."""
    return ChatTemplate(source, dict(special_items))
