"""Preference (DPO) JSONL -> prompt + chosen/rejected completions -> tokenized pairs.

OpenAI's DPO line is ``{"input": {"messages", "tools"?, "parallel_tool_calls"?},
"preferred_output": [assistant message], "non_preferred_output": [assistant message]}``. Each
side becomes one conversation, the input messages followed by that output, templated and
tokenized like a supervised example (:func:`loraforge.trainer.data.tokenize_example`) with only
the output's tokens labelled: assistant turns of the input are context (weight 0). The two
sequences of a pair share the prompt's tokens; :mod:`loraforge.trainer.dpo` runs them in the same
micro-batch.

Pre-flight (``preflight/preference.py``) checks files in depth with line and path; this module
re-checks only what the trainer relies on, so a file that changed behind the API's back still
fails as ``invalid_training_file`` with its line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loraforge.catalog.tool_calls import template_tool_calls
from loraforge.trainer.data import (
    MIN_TRAINING_EXAMPLES,
    TokenizedExample,
    TrainingDataError,
    read_jsonl_examples,
    tokenize_example,
)

Split = Literal["train", "valid"]
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True)
class PreferencePair:
    """One preference example as model inputs: ``index`` is its row in the split's reference table."""

    split: Split
    index: int
    chosen: TokenizedExample
    rejected: TokenizedExample

    @property
    def n_label_tokens(self) -> int:
        """Completion tokens of both sides (the tokens the DPO loss reads)."""
        return self.chosen.n_label_tokens + self.rejected.n_label_tokens

    @property
    def n_tokens(self) -> int:
        """Tokens of both sequences (what a micro-batch holds for this pair)."""
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "\n".join(p["text"] for p in content)
    raise ValueError(f"{where}: content must be a string or a list of text parts")


def _message(msg: Any, where: str) -> dict[str, Any]:
    if not isinstance(msg, dict) or msg.get("role") not in _ROLES:
        raise ValueError(f"{where} must be a message with a role in {sorted(_ROLES)}")
    calls = msg.get("tool_calls") if msg["role"] == "assistant" else None
    content = msg.get("content")
    out: dict[str, Any] = {
        "role": msg["role"],
        "content": "" if calls and content is None else _text(content, where),
    }
    if calls:
        try:
            out["tool_calls"] = template_tool_calls(calls)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{where}.tool_calls: each call needs a function name and JSON arguments"
            ) from exc
    if msg["role"] == "tool" and isinstance(msg.get("tool_call_id"), str):
        out["tool_call_id"] = msg["tool_call_id"]
    if msg["role"] == "assistant":
        out["weight"] = 0  # the prompt's assistant turns are context, not trained
    return out


def _output(obj: dict[str, Any], key: str) -> dict[str, Any]:
    output = obj.get(key)
    if not (isinstance(output, list) and len(output) == 1 and isinstance(output[0], dict)):
        raise ValueError(f"{key} must be a list with exactly one assistant message")
    if output[0].get("role") != "assistant" or output[0].get("content") is None:
        raise ValueError(f"{key}[0] must be an assistant message with content")
    return {"role": "assistant", "content": _text(output[0]["content"], f"{key}[0]")}


def _validate_line(obj: Any) -> dict[str, Any]:
    """One line normalised: ``{"messages", "tools", "chosen", "rejected"}`` or ValueError."""
    if not isinstance(obj, dict) or not isinstance(obj.get("input"), dict):
        raise ValueError('each line must be an object with an "input" object (a DPO preference example)')
    messages = obj["input"].get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError('"input.messages" must be a non-empty list')
    tools = obj["input"].get("tools")
    return {
        "messages": [_message(m, f"input.messages[{i}]") for i, m in enumerate(messages)],
        "tools": tools if isinstance(tools, list) and tools else None,
        "chosen": _output(obj, "preferred_output"),
        "rejected": _output(obj, "non_preferred_output"),
    }


def read_preference_jsonl(
    path: str | Path, *, param: str = "training_file", min_examples: int = MIN_TRAINING_EXAMPLES
) -> list[dict[str, Any]]:
    """Read and validate a preference JSONL file (blank lines skipped).

    Args:
        path: local path of the file.
        param: the request field reported in errors (``training_file`` / ``validation_file``).
        min_examples: fewest examples accepted.

    Returns:
        One ``{"messages", "tools", "chosen", "rejected"}`` record per line.

    Raises:
        TrainingDataError: ``invalid_training_file`` (names the line) or ``invalid_n_examples``.
    """
    return read_jsonl_examples(path, _validate_line, param=param, min_examples=min_examples)


def tokenize_pair(
    tokenizer: Any,
    record: dict[str, Any],
    max_seq_length: int | None,
    *,
    split: Split = "train",
    index: int = 0,
) -> PreferencePair:
    """Both sides of one record, templated and tokenized, the output's tokens labelled.

    Args:
        tokenizer: a Hugging Face tokenizer with the catalog chat template.
        record: one record of :func:`read_preference_jsonl`.
        max_seq_length: keep at most this many tokens per side (None: no limit).
        split: which file the record came from.
        index: its position in that file.

    Returns:
        The pair.
    """
    sides = [
        tokenize_example(
            tokenizer,
            {"messages": [*record["messages"], record[side]], "tools": record["tools"]},
            max_seq_length,
        )
        for side in ("chosen", "rejected")
    ]
    return PreferencePair(split=split, index=index, chosen=sides[0], rejected=sides[1])


def tokenize_pairs(
    tokenizer: Any, records: list[dict[str, Any]], max_seq_length: int | None, split: Split
) -> list[PreferencePair]:
    """:func:`tokenize_pair` over a whole file, in file order.

    Raises:
        TrainingDataError: a record the chat template cannot render (names its line).
    """
    pairs = []
    for i, record in enumerate(records):
        try:
            pairs.append(tokenize_pair(tokenizer, record, max_seq_length, split=split, index=i))
        except ValueError as exc:
            param = "training_file" if split == "train" else "validation_file"
            raise TrainingDataError("invalid_training_file", f"example {i + 1}: {exc}", param) from exc
    return pairs
