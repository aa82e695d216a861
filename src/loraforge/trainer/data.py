"""Chat JSONL -> validated messages -> tokenized examples with assistant-only labels -> batches.

Reading and validation are pure Python; tokenization needs only the tokenizer; :func:`collate`
imports torch lazily, so the API can reuse :func:`read_chat_jsonl` without loading torch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from loraforge.contracts.trainer_events import ErrorEvent
from loraforge.preflight.chat import check_chat_line
from loraforge.preflight.fastcount import FastCounter, fast_counter_for
from loraforge.preflight.template import ChatTemplate, compile_template
from loraforge.preflight.tokens import VERIFY_EVERY, VERIFY_FIRST, merge_runs, token_ranges

log = logging.getLogger(__name__)

MIN_TRAINING_EXAMPLES = 10
IGNORE_INDEX = -100


class TrainingDataError(ValueError):
    """A training or validation file the trainer refuses, with an OpenAI-style error code.

    Attributes:
        code: ``invalid_training_file`` or ``invalid_n_examples``.
        message: human-readable reason (names the offending line where there is one).
        param: the request field at fault (``training_file`` or ``validation_file``).
    """

    def __init__(self, code: str, message: str, param: str | None = "training_file") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    def to_event(self) -> ErrorEvent:
        """The ``error`` event the CLI prints for this error (its last line, exit code 2)."""
        return ErrorEvent(code=self.code, message=self.message, param=self.param)


@dataclass(frozen=True)
class TokenizedExample:
    """One conversation as model inputs; ``labels`` is -100 outside trained assistant tokens."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_label_tokens(self) -> int:
        """Number of tokens the loss is computed on."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _validate_example(obj: Any) -> dict[str, Any]:
    """One JSONL record normalised to ``{"messages": [...], "tools": [...] | None}``, or ValueError.

    A valid example is what the pre-flight accepts (:func:`loraforge.preflight.chat.check_chat_line`,
    the one definition both use); the error names the first defect's JSON path. Messages are
    ``{"role", "content": str, "weight"?, "tool_calls"?, "tool_call_id"?}``: content flattened,
    tool-call arguments parsed, as the chat template renders them.
    """
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    if not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise ValueError('"messages" must be a non-empty list')
    errors: list[str] = []

    def add(code: str, message: str, path: str) -> None:
        errors.append(f"{path}: {message}" if path else message)

    example = check_chat_line(obj, add, lambda code, message, path: None)
    if example is None or errors:
        raise ValueError(errors[0] if errors else "invalid example")
    return {"messages": example.messages, "tools": example.tools or None}


def _validate_messages(obj: Any) -> list[dict[str, Any]]:
    """The normalised messages of one record (see :func:`_validate_example`)."""
    messages: list[dict[str, Any]] = _validate_example(obj)["messages"]
    return messages


def read_chat_jsonl(
    path: str | Path, *, param: str = "training_file", min_examples: int = MIN_TRAINING_EXAMPLES
) -> list[dict[str, Any]]:
    """Read and validate a chat JSONL file (one ``{"messages": [...]}`` per line; blank lines skipped).

    Args:
        path: local path of the file.
        param: the request field reported in errors (``training_file`` / ``validation_file``).
        min_examples: fewest examples accepted.

    Returns:
        One ``{"messages", "tools"}`` record per example: ``content`` flattened to a string,
        ``weight`` kept (0 or 1) where given, tool calls and tool definitions kept.

    Raises:
        TrainingDataError: ``invalid_training_file`` for an unreadable file or a bad line (the
            message names the line), ``invalid_n_examples`` for too few examples.
    """
    return read_jsonl_examples(path, _validate_example, param=param, min_examples=min_examples)


def read_jsonl_examples(
    path: str | Path,
    validate: Callable[[Any], dict[str, Any]],
    *,
    param: str = "training_file",
    min_examples: int = MIN_TRAINING_EXAMPLES,
) -> list[dict[str, Any]]:
    """Read a JSONL file whole, one ``validate(json.loads(line))`` record per non-blank line (the
    reading shared by chat files and DPO's preference files).

    Raises:
        TrainingDataError: ``invalid_training_file`` for an unreadable file or a line ``validate``
            refuses with a ``ValueError`` (the message names the line), ``invalid_n_examples`` for
            fewer than ``min_examples``.
    """
    label = "Training file" if param == "training_file" else "Validation file"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingDataError("invalid_training_file", f"{label} could not be read: {exc}", param) from exc
    examples = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            examples.append(validate(json.loads(line)))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise TrainingDataError(
                "invalid_training_file", f"{label} has an invalid example on line {lineno}: {exc}", param
            ) from exc
    if len(examples) < min_examples:
        raise TrainingDataError(
            "invalid_n_examples",
            f"{label} has {len(examples)} example(s), but must have at least {min_examples} examples",
            param,
        )
    return examples


def chat_template_for(tokenizer: Any) -> ChatTemplate:
    """The tokenizer's chat template compiled as the pre-flight compiles it (Jinja, no transformers).

    Args:
        tokenizer: a Hugging Face tokenizer with the catalog chat template.

    Returns:
        The compiled template, with the special-token variables ``apply_chat_template`` passes.
    """
    special = tuple(sorted((k, v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)))
    return compile_template(tokenizer.chat_template, special)


def _backend(tokenizer: Any) -> Any:
    """The ``tokenizers`` object of a fast tokenizer (the one that encodes)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("the trainer needs a fast (tokenizers-backed) tokenizer")
    return backend


class _Encoder:
    """Rendered chats -> (ids, assistant token runs): the pre-flight's pre-token cache where the
    tokenizer allows it (:meth:`FastCounter.encode`), checked against the full tokenizer on the
    first examples and then every Nth, and given up for good on any difference."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.fast: FastCounter | None = fast_counter_for(backend)
        self.seen = 0

    def encode(
        self, texts: list[str], spans: list[list[tuple[int, int]]]
    ) -> list[tuple[list[int], list[list[int]]]]:
        if self.fast is None:
            encodings = self.backend.encode_batch(texts, add_special_tokens=False) if texts else []
            return [(list(e.ids), token_ranges(e, s)) for e, s in zip(encodings, spans, strict=True)]
        out = []
        for text, text_spans in zip(texts, spans, strict=True):
            ids, ranges = self.fast.encode(text, text_spans)
            self.seen += 1
            if self.seen <= VERIFY_FIRST or self.seen % VERIFY_EVERY == 0:
                exact = self.backend.encode(text, add_special_tokens=False)
                truth = (list(exact.ids), merge_runs(token_ranges(exact, text_spans)))
                if (ids, merge_runs(ranges)) != truth:
                    log.warning("pre-token ids differ from the tokenizer's; using the tokenizer from now on")
                    self.fast = None
                    return out + self.encode(texts[len(out) :], spans[len(out) :])
            out.append((ids, ranges))
        return out


# One encoder per tokenizer object (kept alive here, so its id is never reused).
_ENCODERS: dict[int, tuple[Any, _Encoder]] = {}


def _encoder(tokenizer: Any) -> _Encoder:
    backend = _backend(tokenizer)
    found = _ENCODERS.get(id(backend))
    if found is None:
        if len(_ENCODERS) >= 8:
            _ENCODERS.clear()
        found = _ENCODERS[id(backend)] = (backend, _Encoder(backend))
    return found[1]


def tokenize_batch(
    tokenizer: Any,
    examples: list[dict[str, Any]] | list[list[dict[str, Any]]],
    max_seq_length: int | None = None,
    template: ChatTemplate | None = None,
) -> list[TokenizedExample]:
    """Template and tokenize conversations; label only the assistant turns that are trained.

    The rendered tokens are defined once, with the pre-flight: the chat template rendered by
    :class:`~loraforge.preflight.template.ChatTemplate`, whose ``{% generation %}`` spans are the
    assistant content (or its tool calls) plus its end-of-turn token; the text encoded by the fast
    tokenizer (no special tokens added, as ``apply_chat_template`` encodes; through the pre-flight's
    pre-token cache where the tokenizer allows, checked against the full encoding); the spans
    mapped to tokens by overlap (:func:`~loraforge.preflight.tokens.token_ranges`, what
    ``return_assistant_tokens_mask`` does). The k-th run of marked tokens is the k-th assistant
    message; a message with ``"weight": 0`` is not labelled. Sequences longer than
    ``max_seq_length`` lose their end.

    Args:
        tokenizer: a Hugging Face fast tokenizer with the catalog chat template.
        examples: records from :func:`read_chat_jsonl` (or just their messages).
        max_seq_length: keep at most this many tokens (None: no limit).
        template: the compiled chat template (default: :func:`chat_template_for` the tokenizer).

    Returns:
        The examples' ``input_ids`` and ``labels`` (-100 where no loss is taken), in order.

    Raises:
        ValueError: the template refuses an example, its assistant spans do not line up with the
            assistant messages, or the example has tools but the template declares no tool-call
            format.
    """
    template = template or chat_template_for(tokenizer)
    texts, all_spans, all_weights = [], [], []
    for example in examples:
        messages, tools = (
            (example, None) if isinstance(example, list) else (example["messages"], example["tools"])
        )
        if (tools or any("tool_calls" in m for m in messages)) and template.tool_format is None:
            raise ValueError("the chat template declares no tool-call format: it cannot render tools")
        chat = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
        try:
            text, spans = template.render(chat, tools)
        except jinja2.TemplateError as exc:
            raise ValueError(f"the base model's chat template refused it: {exc}") from exc
        texts.append(text)
        all_spans.append(spans)
        all_weights.append([m.get("weight", 1) for m in messages if m["role"] == "assistant"])
    out = []
    encoded = _encoder(tokenizer).encode(texts, all_spans)
    for (ids, ranges), weights in zip(encoded, all_weights, strict=True):
        runs = merge_runs(ranges)
        if len(runs) != len(weights):
            raise ValueError(
                f"chat template marked {len(runs)} assistant span(s) for {len(weights)} assistant "
                "message(s); it must wrap each assistant turn in {% generation %}"
            )
        labels = [IGNORE_INDEX] * len(ids)
        for (first, last), weight in zip(runs, weights, strict=True):
            if weight:
                labels[first : last + 1] = ids[first : last + 1]
        if max_seq_length is not None:
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        out.append(TokenizedExample(input_ids=ids, labels=labels))
    return out


def tokenize_example(
    tokenizer: Any, example: dict[str, Any] | list[dict[str, Any]], max_seq_length: int | None = None
) -> TokenizedExample:
    """:func:`tokenize_batch` of one conversation (a record or just its messages).

    Args:
        tokenizer: a Hugging Face fast tokenizer with the catalog chat template.
        example: one record from :func:`read_chat_jsonl` (or just its messages).
        max_seq_length: keep at most this many tokens (None: no limit).

    Returns:
        The example's ``input_ids`` and ``labels`` (-100 where no loss is taken).

    Raises:
        ValueError: as :func:`tokenize_batch`.
    """
    return tokenize_batch(tokenizer, [example], max_seq_length)[0]  # type: ignore[list-item]


def tokenize_dataset(
    tokenizer: Any,
    examples: list[dict[str, Any]] | list[list[dict[str, Any]]],
    max_seq_length: int | None = None,
) -> list[TokenizedExample]:
    """:func:`tokenize_batch` over a whole list held in memory (small files, tests; the trainer
    prepares files with :mod:`loraforge.trainer.dataset`).

    Args:
        tokenizer: a Hugging Face fast tokenizer with the catalog chat template.
        examples: the output of :func:`read_chat_jsonl`.
        max_seq_length: keep at most this many tokens per example.

    Returns:
        The tokenized examples, in file order.
    """
    return tokenize_batch(tokenizer, examples, max_seq_length)


def collate(examples: list[TokenizedExample], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a batch into ``input_ids``, ``attention_mask`` and ``labels`` tensors.

    Args:
        examples: the batch.
        pad_token_id: id written into padding positions (their labels are -100).

    Returns:
        A dict of ``torch.long`` tensors of shape ``[batch, longest]``.
    """
    import torch

    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
