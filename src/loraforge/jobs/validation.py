"""The worker's first look at a training file before a job is queued (no torch).

Basic checks only: each line a JSON object with a non-empty ``messages`` list holding an
assistant message, and at least ``MIN_EXAMPLES`` examples. Reads the file once, line by line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MIN_EXAMPLES = 10


@dataclass
class FileProblem:
    code: str
    message: str
    param: str


def check_training_file(path: Path, param: str = "training_file") -> FileProblem | None:
    """Return the first problem that makes ``path`` untrainable, or None."""
    n_examples = 0
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                example = json.loads(raw)
            except (UnicodeDecodeError, ValueError):
                return FileProblem("invalid_training_file", f"Line {line_no} is not valid JSON.", param)
            messages = example.get("messages") if isinstance(example, dict) else None
            if not isinstance(messages, list) or not messages:
                return FileProblem(
                    "invalid_training_file", f"Line {line_no}: missing 'messages' list.", param
                )
            if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
                return FileProblem(
                    "invalid_training_file", f"Line {line_no}: no assistant message to train on.", param
                )
            n_examples += 1
    if n_examples < MIN_EXAMPLES:
        return FileProblem(
            "invalid_n_examples",
            f"Training file has {n_examples} example(s), but must have at least {MIN_EXAMPLES} examples",
            param,
        )
    return None
