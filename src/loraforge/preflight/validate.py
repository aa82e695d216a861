"""Validate a JSONL training file in one streaming pass with constant memory.

Every line is checked (never only the first bad one): UTF-8, JSON object, format (chat,
preference, legacy prompt/completion), then the format's rules. With a :class:`TokenCounter` the
valid chat examples are also tokenized with the base model's tokenizer and chat template.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from loraforge.preflight.chat import check_chat_line
from loraforge.preflight.preference import PREFERENCE_KEYS, check_preference_line
from loraforge.preflight.report import FileReport
from loraforge.preflight.tokens import TokenCounter

# Codes reported as warnings: the example is still trained.
WARNING_CODES = frozenset({"example_truncated"})
# str.splitlines() (which the trainer uses to read the file) also breaks lines at these.
_EXTRA_LINE_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
PROGRESS_EVERY = 4096  # lines between progress callbacks
_JSON_TYPES = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}

LEGACY_HINT = (
    "is in the legacy prompt/completion format, which chat models are not trained on; convert each line "
    'to {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": COMPLETION}]}'
)
FORMAT_NAMES = {"chat": "chat", "preference": "preference (DPO)", "prompt_completion": "prompt/completion"}


def line_format(obj: dict[str, Any]) -> str | None:
    """Which training format a JSON object line is in (None: none recognisable)."""
    if "messages" in obj:
        return "chat"
    if not PREFERENCE_KEYS.isdisjoint(obj):
        return "preference"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    return None


@dataclass
class ScanState:
    """What the file-level conclusions need from a scan of (part of) a file."""

    chat_trained: bool = False  # some chat example has an assistant message with weight 1
    tools_line: int | None = None  # the first line with tool definitions (for training)


class _LineChecker:
    """State carried across lines: the file's format and the counter."""

    def __init__(self, report: FileReport, counter: TokenCounter | None, for_training: bool) -> None:
        self.report = report
        self.counter = counter
        self.for_training = for_training
        self.format_line = 0
        self.chat_trained = False
        self.tools_line: int | None = None

    def check(self, line: int, obj: Any) -> None:
        report = self.report

        def add(code: str, message: str, path: str) -> None:
            report.error(code, message, line, path)

        def warn(code: str, message: str, path: str) -> None:
            report.warn(code, message, line, path)

        if not isinstance(obj, dict):
            kind = _JSON_TYPES.get(type(obj), "value")
            add("not_a_json_object", f"is a JSON {kind}, not an object (one example per line)", "")
            return
        fmt = line_format(obj)
        if fmt is None:
            add(
                "missing_messages",
                "has no 'messages' (chat format) or 'input'/'preferred_output'/'non_preferred_output' "
                "(preference format)",
                "",
            )
            return
        if report.format is None:
            report.format, self.format_line = fmt, line
        elif fmt != report.format:
            add(
                "mixed_formats",
                f"is in the {FORMAT_NAMES[fmt]} format, but the file is in the {FORMAT_NAMES[report.format]} "
                f"format (line {self.format_line})",
                "",
            )
            return
        if fmt == "prompt_completion":
            add("legacy_prompt_completion", LEGACY_HINT, "")
        elif fmt == "preference":
            report.n_examples += check_preference_line(obj, add, warn)
        else:
            example = check_chat_line(obj, add, warn)
            if example is None:
                return
            report.n_examples += 1
            if example.trained_messages:
                self.chat_trained = True
            else:
                warn(
                    "no_trained_messages",
                    "has no assistant message with weight 1: nothing in it is trained",
                    "messages",
                )
            # Every catalog template renders tools and tool calls; an operator's own template may
            # not (no tool format declared), and the trainer renders only what the template does.
            template_tools = self.counter is None or self.counter.template.tool_format is not None
            if self.for_training and example.has_tool_calls and not template_tools:
                for path in example.tool_call_paths[:1]:
                    add(
                        "unsupported_tool_calls",
                        "cannot be trained: the base model's chat template declares no tool-call format",
                        path,
                    )
                report.n_examples -= 1
                return
            if self.for_training and example.has_tools and not template_tools and self.tools_line is None:
                self.tools_line = line  # reported once, by finish_report
            if self.counter is not None:
                self.counter.add(line, example.messages, example.tools if template_tools else None)


def parse_line(raw: bytes) -> tuple[Any, tuple[str, str] | None]:
    """Decode one raw line: ``(value, None)``, or ``(None, (code, message))`` for a line that is
    blank, not UTF-8, breaks lines the way the trainer's reader would, or is not JSON."""
    body = raw[:-1] if raw.endswith(b"\n") else raw
    if body.endswith(b"\r"):
        body = body[:-1]
    if not body.strip():
        return None, ("blank_line", "is blank (every line must be one JSON object)")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, (
            "invalid_utf8",
            f"is not valid UTF-8 (byte 0x{body[exc.start]:02x} at byte {exc.start + 1})",
        )
    found = _EXTRA_LINE_BREAKS.search(text)
    if found:
        code = ord(found.group())
        return None, (
            "unsupported_line_break",
            f"contains the raw line-break character U+{code:04X}; escape it in its JSON string "
            f"(\\u{code:04x})",
        )
    try:
        return json.loads(text), None
    except ValueError as exc:
        message, column = getattr(exc, "msg", str(exc)), getattr(exc, "colno", None)
        return None, (
            "invalid_json",
            f"is not valid JSON: {message}" + (f" (column {column})" if column else ""),
        )


# Problems that make a line not one JSON object: what ``POST /v1/files`` refuses a file for.
JSON_LEVEL_CODES = frozenset({"invalid_utf8", "unsupported_line_break", "invalid_json", "not_a_json_object"})


class LineScanner:
    """Check lines one at a time, for a stream that something else consumes (an upload).

    The same checks as :func:`scan_lines` without token counts; ``bad_lines`` counts the lines
    with at least one error, ``first_broken`` the first line that is not one JSON object.
    """

    def __init__(self) -> None:
        self.report = FileReport()
        self._checker = _LineChecker(self.report, None, False)
        self.line_no = 0
        self.bad_lines = 0
        self.first_broken: int | None = None

    def feed(self, raw: bytes) -> None:
        """Check the next line (with or without its ``\\n``)."""
        self.line_no += 1
        before = self.report.errors.total
        obj, problem = parse_line(raw)
        if problem is not None:
            self.report.error(problem[0], problem[1], self.line_no)
        else:
            self._checker.check(self.line_no, obj)
        broken = problem[0] in JSON_LEVEL_CODES if problem is not None else not isinstance(obj, dict)
        if broken and self.first_broken is None:
            self.first_broken = self.line_no
        self.bad_lines += self.report.errors.total > before


def json_issue(raw: bytes) -> tuple[str, str] | None:
    """``(code, message)`` if ``raw`` is not one JSON object (blank lines pass: they are left to the
    full validation), else None. What ``POST /v1/files`` refuses synchronously."""
    if not raw.strip():
        return None
    value, problem = parse_line(raw)
    if problem is None and not isinstance(value, dict):
        return "not_a_json_object", f"is a JSON {_JSON_TYPES.get(type(value), 'value')}, not an object"
    return problem


def scan_lines(
    lines: Iterable[bytes],
    report: FileReport,
    *,
    counter: TokenCounter | None = None,
    progress: Callable[[int], None] | None = None,
    for_training: bool = False,
    file_format: tuple[str, int] | None = None,
) -> ScanState:
    """Check every line into ``report`` (no file-level conclusions: :func:`finish_report`).

    ``file_format`` is ``(format, line)`` when the file's format was set by an earlier line (a
    later slice of the file, checked in another process: ``preflight/parallel.py``).
    """
    checker = _LineChecker(report, counter, for_training)
    if file_format is not None:
        report.format, checker.format_line = file_format
    n_bytes = line_no = 0
    for raw in lines:
        line_no += 1
        n_bytes += len(raw)
        if progress is not None and line_no % PROGRESS_EVERY == 0:
            progress(n_bytes)
        obj, problem = parse_line(raw)
        if problem is not None:
            report.error(problem[0], problem[1], line_no)
        else:
            checker.check(line_no, obj)
    report.n_lines, report.n_bytes = line_no, n_bytes
    if counter is not None:
        counter.flush()
        report.tokens = counter.stats
    return ScanState(checker.chat_trained, checker.tools_line)


def finish_report(report: FileReport, state: ScanState) -> None:
    """The file-level conclusions once every line was checked."""
    if state.tools_line is not None:
        report.warn(
            "tools_ignored",
            "are not rendered by the base model's chat template (it declares no tool-call format), "
            "so they are not trained "
            "(reported for the first line that has them)",
            state.tools_line,
            "tools",
        )
    if report.format == "chat" and report.n_examples and not state.chat_trained:
        report.error(
            "no_trained_tokens", "every assistant message in the file has weight 0: nothing to train"
        )
    elif report.n_examples == 0 and report.errors.total == 0:
        report.error("no_examples", "the file has no examples")


def validate_lines(
    lines: Iterable[bytes],
    *,
    counter: TokenCounter | None = None,
    report: FileReport | None = None,
    progress: Callable[[int], None] | None = None,
    for_training: bool = False,
) -> FileReport:
    """Validate JSONL given as raw lines (as iterating a binary file yields them).

    Args:
        lines: the file's lines, each with or without its ``\\n``.
        counter: count tokens of valid chat examples (None: structure only).
        report: the report to fill (a new one by default); the counter's problems go to it too.
        progress: called with the bytes read so far, every few thousand lines and at the end.
        for_training: also apply what the trainer needs beyond the format (tool calls need a
            template that renders them).

    Returns:
        The filled report (``tokens`` set when a counter was given).
    """
    report = report or FileReport()
    state = scan_lines(lines, report, counter=counter, progress=progress, for_training=for_training)
    finish_report(report, state)
    if progress is not None:
        progress(report.n_bytes)
    return report
