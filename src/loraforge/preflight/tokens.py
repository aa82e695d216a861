"""Count tokens the way the trainer will see them: the base model's chat template rendered with
Jinja, the rendered text encoded by the ``tokenizers`` library, assistant (generation) spans mapped
to tokens by overlap exactly as ``apply_chat_template(..., return_assistant_tokens_mask=True)``
does, weight-0 turns cleared, and each example cut at ``max_seq_length`` as ``trainer/data.py``
cuts it. No torch, no transformers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jinja2

from loraforge.preflight.fastcount import FastCounter
from loraforge.preflight.report import TokenStats
from loraforge.preflight.template import ChatTemplate

# Examples rendered and encoded together: big enough for encode_batch to use every core, small
# enough that memory stays flat.
BATCH = 256
# The fast path is checked against the full tokenizer on the first examples and then every Nth.
VERIFY_FIRST = 32
VERIFY_EVERY = 997
log = logging.getLogger(__name__)

# add(code, message, line, path)
Sink = Callable[[str, str, int, str], None]


@dataclass(frozen=True)
class ExampleTokens:
    """One example's counts: ``length`` before truncation; ``total``/``trained`` after it."""

    length: int
    total: int
    trained: int
    trained_before_cut: int
    assistant_runs: int


def _token_ranges_by_offsets(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[list[int]]:
    """Token indices overlapping each span (transformers' single-pass mask), as [first, last] pairs."""
    ranges: dict[int, list[int]] = {}
    span_idx = 0
    for token, (start, end) in enumerate(offsets):
        while span_idx < len(spans) and start >= spans[span_idx][1]:
            span_idx += 1
        if span_idx == len(spans):
            break
        if end > spans[span_idx][0]:
            pair = ranges.setdefault(span_idx, [token, token])
            pair[1] = token
    return [ranges[k] for k in sorted(ranges)]


def token_ranges(encoding: Any, spans: list[tuple[int, int]]) -> list[list[int]]:
    """Like :func:`_token_ranges_by_offsets`, touching only the tokens at span edges (fast path)."""
    n = len(encoding)
    out: list[list[int]] = []
    for start, end in spans:
        if end <= start:
            continue
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None or last is None:  # a character no token covers (normalizers): slow path
            return _token_ranges_by_offsets(encoding.offsets, spans)
        # Byte-level BPE may split one character over several tokens: widen to all that overlap.
        while first > 0 and encoding.token_to_chars(first - 1)[1] > start:
            first -= 1
        while last + 1 < n and encoding.token_to_chars(last + 1)[0] < end:
            last += 1
        out.append([first, last])
    return out


def merge_runs(ranges: list[list[int]]) -> list[list[int]]:
    """Merge touching token ranges: the trainer sees runs of consecutive masked tokens."""
    runs: list[list[int]] = []
    for first, last in ranges:
        if runs and first <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], last)
        else:
            runs.append([first, last])
    return runs


class TokenCounter:
    """Accumulates :class:`TokenStats` over examples, in batches; reports per-example problems."""

    def __init__(
        self,
        tokenizer: Any,
        template: ChatTemplate,
        max_seq_length: int,
        sink: Sink,
        fast: FastCounter | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.fast = fast
        self._seen = 0
        self.template = template
        self.max_seq_length = max_seq_length
        self.stats = TokenStats(max_seq_length=max_seq_length)
        self._sink = sink
        self._pending: list[tuple[int, list[dict[str, Any]], list[dict[str, Any]] | None]] = []

    def add(
        self, line: int, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> None:
        """Queue one normalised conversation (from line ``line``) and its tools for counting."""
        self._pending.append((line, messages, tools))
        if len(self._pending) >= BATCH:
            self.flush()

    def count(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> ExampleTokens | None:
        """Count one conversation right away (None if the template refuses it)."""
        rendered = self._render(0, messages, tools)
        if rendered is None:
            return None
        if self.fast is not None:
            return self._fast_measure(rendered[0], rendered[1], messages)
        encoding = self.tokenizer.encode(rendered[0], add_special_tokens=False)
        return self._measure(encoding, rendered[1], messages)

    def _render(
        self, line: int, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> tuple[str, list[tuple[int, int]]] | None:
        # What the trainer hands apply_chat_template (trainer/data.py): everything but the weight.
        chat = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
        try:
            return self.template.render(chat, tools)
        except jinja2.TemplateError as exc:
            self._sink(
                "template_error", f"the base model's chat template refused it: {exc}", line, "messages"
            )
            return None

    def _measure(
        self, encoding: Any, spans: list[tuple[int, int]], messages: list[dict[str, Any]]
    ) -> ExampleTokens:
        return self._tally(len(encoding), token_ranges(encoding, spans), messages)

    def _tally(self, length: int, ranges: list[list[int]], messages: list[dict[str, Any]]) -> ExampleTokens:
        runs = merge_runs(ranges)
        weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
        cut = self.max_seq_length
        trained = before = 0
        if len(runs) == len(weights):
            for (first, last), weight in zip(runs, weights, strict=True):
                if weight:
                    before += last - first + 1
                    trained += max(0, min(last + 1, cut) - first)
        return ExampleTokens(length, min(length, cut), trained, before, len(runs))

    def _fast_measure(
        self, text: str, spans: list[tuple[int, int]], messages: list[dict[str, Any]]
    ) -> ExampleTokens | None:
        """Count with the pre-token cache; on sampled examples also with the full tokenizer, and
        give up the fast path for good if they ever differ."""
        assert self.fast is not None
        length, ranges = self.fast.measure(text, spans)
        self._seen += 1
        if self._seen <= VERIFY_FIRST or self._seen % VERIFY_EVERY == 0:
            exact = self.tokenizer.encode(text, add_special_tokens=False)
            if len(exact) != length or merge_runs(token_ranges(exact, spans)) != merge_runs(ranges):
                log.warning("fast token count differs from the tokenizer's; using the tokenizer from now on")
                self.fast = None
                return self._measure(exact, spans, messages)
        return self._tally(length, ranges, messages)

    def flush(self) -> None:
        """Count every queued example."""
        batch, self._pending = self._pending, []
        rendered = [(line, messages, self._render(line, messages, tools)) for line, messages, tools in batch]
        ok = [(line, messages, r) for line, messages, r in rendered if r is not None]
        if self.fast is not None:
            rest = []
            for line, messages, (text, spans) in ok:
                counted = self._fast_measure(text, spans, messages) if self.fast is not None else None
                if counted is None:
                    rest.append((line, messages, (text, spans)))
                else:
                    self._record(line, messages, counted)
            ok = rest
        if not ok:
            return
        encodings = self.tokenizer.encode_batch([r[0] for _, _, r in ok], add_special_tokens=False)
        for (line, messages, (_, spans)), encoding in zip(ok, encodings, strict=True):
            self._record(line, messages, self._measure(encoding, spans, messages))

    def _record(self, line: int, messages: list[dict[str, Any]], ex: ExampleTokens) -> None:
        n_assistant = sum(1 for m in messages if m["role"] == "assistant")
        if ex.assistant_runs != n_assistant:
            self._sink(
                "template_mismatch",
                f"the chat template marked {ex.assistant_runs} assistant span(s) for {n_assistant} "
                "assistant message(s); it must wrap each assistant turn in {% generation %}",
                line,
                "messages",
            )
            return
        stats = self.stats
        stats.total_tokens += ex.total
        stats.trained_tokens += ex.trained
        if ex.length > stats.longest_example_tokens:
            stats.longest_example_tokens, stats.longest_example_line = ex.length, line
        if ex.length > self.max_seq_length:
            stats.truncated_examples += 1
            if ex.trained_before_cut and not ex.trained:
                self._sink(
                    "example_too_long",
                    f"is {ex.length} tokens after the chat template; cut to the {self.max_seq_length}-token "
                    "limit it keeps no assistant token to train on",
                    line,
                    "",
                )
            else:
                self._sink(
                    "example_truncated",
                    f"is {ex.length} tokens after the chat template; only the first {self.max_seq_length} "
                    "are trained (the end is cut)",
                    line,
                    "",
                )
