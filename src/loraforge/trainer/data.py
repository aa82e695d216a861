"""Chat JSONL -> validated messages -> tokenized examples with assistant-only labels -> batches.

Reading and validation are pure Python; tokenization needs only the tokenizer; :func:`collate`
imports torch lazily, so the API can reuse :func:`read_chat_jsonl` without loading torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.catalog.tool_calls import template_tool_calls, tool_format
from loraforge.contracts.trainer_events import ErrorEvent

MIN_TRAINING_EXAMPLES = 10
IGNORE_INDEX = -100
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


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


def _flatten_content(content: Any, where: str) -> str:
    """A message's content as one string: a string, or the texts of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise ValueError(f"{where}: only text content parts are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"{where}: content must be a string or a list of text parts")


def _validate_messages(obj: Any) -> list[dict[str, Any]]:
    """Normalise one JSONL record to ``[{"role", "content": str, "weight"?}]`` or raise ValueError.

    An assistant message's ``tool_calls`` are kept with their arguments parsed (its content may
    then be null), and a tool message's ``tool_call_id``: the chat template renders them.
    """
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{where} must be an object")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: role must be one of {sorted(ROLES)}, got {role!r}")
        calls = msg.get("tool_calls") if role == "assistant" else None
        content = msg.get("content")
        norm: dict[str, Any] = {
            "role": role,
            "content": "" if calls and content is None else _flatten_content(content, where),
        }
        if calls:
            norm["tool_calls"] = _tool_calls(calls, where)
        if role == "tool" and isinstance(msg.get("tool_call_id"), str):
            norm["tool_call_id"] = msg["tool_call_id"]
        if "weight" in msg:
            if role != "assistant":
                raise ValueError(f"{where}: weight is only allowed on assistant messages")
            if msg["weight"] not in (0, 1) or isinstance(msg["weight"], bool):
                raise ValueError(f"{where}: weight must be 0 or 1")
            norm["weight"] = int(msg["weight"])
        out.append(norm)
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("each example must contain at least one assistant message")
    return out


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    try:
        return template_tool_calls(calls)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{where}.tool_calls: each call needs a function name and arguments holding a JSON object"
        ) from exc


def _validate_example(obj: Any) -> dict[str, Any]:
    """One JSONL record normalised: ``{"messages": [...], "tools": [...] | None}``."""
    messages = _validate_messages(obj)
    tools = obj.get("tools")
    return {"messages": messages, "tools": tools if isinstance(tools, list) and tools else None}


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
            examples.append(_validate_example(json.loads(line)))
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


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """``[start, end)`` spans of consecutive 1s in ``mask``."""
    spans, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            spans.append((start, i))
            start = None
    return spans


def tokenize_example(
    tokenizer: Any, example: dict[str, Any] | list[dict[str, Any]], max_seq_length: int | None = None
) -> TokenizedExample:
    """Template and tokenize one conversation; label only the assistant turns that are trained.

    The chat template wraps each assistant turn in ``{% generation %}``, so
    ``return_assistant_tokens_mask`` marks exactly the assistant content (or its tool calls) plus
    its end-of-turn token, never tool definitions, tool results or prompts. The k-th contiguous
    run of 1s is the k-th assistant message; a message with ``"weight": 0`` has its run cleared.
    Sequences longer than ``max_seq_length`` lose their end.

    Args:
        tokenizer: a Hugging Face tokenizer with the catalog chat template.
        example: one record from :func:`read_chat_jsonl` (or just its messages).
        max_seq_length: keep at most this many tokens (None: no limit).

    Returns:
        The example's ``input_ids`` and ``labels`` (-100 where no loss is taken).

    Raises:
        ValueError: the template's assistant mask does not line up with the assistant messages, or
            the example has tools but the template declares no tool-call format.
    """
    messages, tools = (
        (example, None) if isinstance(example, list) else (example["messages"], example["tools"])
    )
    if (tools or any("tool_calls" in m for m in messages)) and tool_format(tokenizer.chat_template) is None:
        raise ValueError("the chat template declares no tool-call format: it cannot render tools")
    chat = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    enc = tokenizer.apply_chat_template(
        chat, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    if ids and isinstance(ids[0], list):  # some tokenizers return a batch of one
        ids, mask = ids[0], mask[0]
    weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
    spans = _runs(mask)
    if len(spans) != len(weights):
        raise ValueError(
            f"chat template marked {len(spans)} assistant span(s) for {len(weights)} assistant "
            "message(s); it must wrap each assistant turn in {% generation %}"
        )
    for (start, end), weight in zip(spans, weights, strict=True):
        if weight == 0:
            mask[start:end] = [0] * (end - start)
    labels = [tok if bit else IGNORE_INDEX for tok, bit in zip(ids, mask, strict=True)]
    if max_seq_length is not None:
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    return TokenizedExample(input_ids=ids, labels=labels)


def tokenize_dataset(
    tokenizer: Any,
    examples: list[dict[str, Any]] | list[list[dict[str, Any]]],
    max_seq_length: int | None = None,
) -> list[TokenizedExample]:
    """:func:`tokenize_example` over a whole file.

    Args:
        tokenizer: a Hugging Face tokenizer with the catalog chat template.
        examples: the output of :func:`read_chat_jsonl`.
        max_seq_length: keep at most this many tokens per example.

    Returns:
        The tokenized examples, in file order.
    """
    return [tokenize_example(tokenizer, example, max_seq_length) for example in examples]


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
