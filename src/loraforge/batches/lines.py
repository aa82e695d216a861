"""The batch input file: one request a line, ``{custom_id, method: "POST", url, body}``.

Pure: bytes in, checked requests or the problems found out. The API checks the whole file when a
batch is created (every problem reported at once, with its line number); the worker reads the same
file back with :func:`iter_requests` to run it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

# Problems listed in one refusal; the rest are counted.
MAX_PROBLEMS = 10


@dataclass(frozen=True)
class BatchRequest:
    """One checked request: its index among the file's requests, line number, id and body."""

    index: int
    line: int
    custom_id: str
    body: dict[str, Any]


@dataclass
class Problem:
    """What is wrong with one line (OpenAI's ``BatchError``: code, message, param, line)."""

    line: int
    message: str
    code: str = "invalid_request"
    param: str | None = None


@dataclass
class Scan:
    """What reading a whole file found: the requests' count and model, and its problems."""

    count: int = 0
    models: set[str] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)
    bad_lines: int = 0


def split_lines(chunks: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """``(line number, bytes)`` of each non-blank line of a stream of chunks (1-based numbers)."""
    pending = b""
    number = 0
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            number += 1
            if line.strip():
                yield number, line
    if pending.strip():
        yield number + 1, pending


def parse_line(number: int, raw: bytes, endpoint: str) -> tuple[str, dict[str, Any]] | Problem:
    """The ``(custom_id, body)`` of one line, or what is wrong with it."""
    try:
        item = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return Problem(number, f"Line {number} is not valid JSON: {exc}.", "invalid_json")
    if not isinstance(item, dict):
        return Problem(number, f"Line {number} is not a JSON object.", "invalid_json")
    unknown = sorted(set(item) - {"custom_id", "method", "url", "body"})
    if unknown:
        return Problem(number, f"Line {number} has unknown field(s) {', '.join(unknown)}.", param=unknown[0])
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return Problem(number, f"Line {number}: 'custom_id' must be a non-empty string.", param="custom_id")
    if item.get("method") != "POST":
        return Problem(number, f"Line {number}: 'method' must be 'POST'.", "invalid_method", "method")
    if item.get("url") != endpoint:
        return Problem(
            number,
            f"Line {number}: 'url' must be the batch's endpoint '{endpoint}'; got {item.get('url')!r}.",
            "invalid_url",
            "url",
        )
    body = item.get("body")
    if not isinstance(body, dict):
        return Problem(number, f"Line {number}: 'body' must be a JSON object.", param="body")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return Problem(number, f"Line {number}: 'body.model' must be a model name.", param="body.model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return Problem(
            number, f"Line {number}: 'body.messages' must be a non-empty list.", param="body.messages"
        )
    if body.get("stream"):
        return Problem(
            number, f"Line {number}: batch requests cannot stream ('body.stream').", param="body.stream"
        )
    return custom_id, body


def scan(chunks: Iterable[bytes], endpoint: str) -> Scan:
    """Check every line of a batch input file.

    Besides each line's own shape: ``custom_id`` values are unique and every request names the
    same model.

    Args:
        chunks: the file's bytes.
        endpoint: the batch's endpoint, which every line's ``url`` must name.

    Returns:
        The requests' count, the models named, and the first :data:`MAX_PROBLEMS` problems.
    """
    result = Scan()
    seen: set[str] = set()
    for number, raw in split_lines(chunks):
        result.count += 1
        parsed = parse_line(number, raw, endpoint)
        if isinstance(parsed, tuple) and parsed[0] in seen:
            parsed = Problem(
                number,
                f"Line {number}: custom_id '{parsed[0]}' is used twice.",
                "duplicate_custom_id",
                "custom_id",
            )
        if isinstance(parsed, Problem):
            result.bad_lines += 1
            if len(result.problems) < MAX_PROBLEMS:
                result.problems.append(parsed)
            continue
        seen.add(parsed[0])
        result.models.add(parsed[1]["model"])
    return result


def iter_requests(chunks: Iterable[bytes], endpoint: str) -> Iterator[tuple[int, BatchRequest | Problem]]:
    """The file's requests in order with their index (a line that no longer parses: its
    :class:`Problem`)."""
    for index, (number, raw) in enumerate(split_lines(chunks)):
        parsed = parse_line(number, raw, endpoint)
        if isinstance(parsed, Problem):
            yield index, parsed
        else:
            yield index, BatchRequest(index, number, parsed[0], parsed[1])
