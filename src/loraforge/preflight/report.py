"""What validation found: issues (errors and warnings) naming line, JSON path and code, plus counts.

Every issue prints as ``line 17: messages[2].role 'bot' is not one of system, developer, user,
assistant, tool``. Errors and warnings are each kept up to :data:`MAX_ISSUES`; the totals are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_ISSUES = 100


@dataclass(frozen=True)
class Issue:
    """One problem: ``line`` is 1-based (None for the whole file), ``path`` a JSON path in the line."""

    code: str
    message: str
    line: int | None = None
    path: str = ""

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.path} {self.message}" if self.path else f"{where}{self.message}"

    def to_dict(self) -> dict[str, Any]:
        """``{"line", "path", "code", "message"}`` (``path`` null for the whole line or file)."""
        return {"line": self.line, "path": self.path or None, "code": self.code, "message": self.message}


def _key(issue: Issue) -> int:
    return 0 if issue.line is None else issue.line


@dataclass
class IssueList:
    """Keeps the :data:`MAX_ISSUES` issues of the earliest lines (file-level ones first) and counts
    them all. Issues may arrive out of line order (token counts come in batches)."""

    _kept: list[tuple[int, int, Issue]] = field(default_factory=list)
    _latest: int = -1  # index in ``_kept`` of the entry that goes first when an earlier one comes
    total: int = 0

    def add(self, issue: Issue) -> None:
        """Count ``issue``; keep it if it is among the earliest :data:`MAX_ISSUES`."""
        self.total += 1
        entry = (_key(issue), self.total, issue)
        if len(self._kept) < MAX_ISSUES:
            self._kept.append(entry)
            if self._latest < 0 or entry[:2] > self._kept[self._latest][:2]:
                self._latest = len(self._kept) - 1
        elif entry[:2] < self._kept[self._latest][:2]:  # rare: issues mostly arrive in line order
            self._kept[self._latest] = entry
            self._latest = max(range(len(self._kept)), key=lambda i: self._kept[i][:2])

    @property
    def items(self) -> list[Issue]:
        """The kept issues, by line (file-level first), then in the order they were found."""
        return [issue for _, _, issue in sorted(self._kept, key=lambda e: e[:2])]


@dataclass
class TokenStats:
    """Token accounting with the base model's tokenizer and chat template (after truncation)."""

    total_tokens: int = 0
    # Tokens the loss is taken on (assistant turns with weight 1), summed over examples.
    trained_tokens: int = 0
    longest_example_tokens: int = 0
    longest_example_line: int | None = None
    truncated_examples: int = 0
    max_seq_length: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "total_tokens": self.total_tokens,
            "trained_tokens": self.trained_tokens,
            "longest_example_tokens": self.longest_example_tokens,
            "longest_example_line": self.longest_example_line,
            "truncated_examples": self.truncated_examples,
            "max_seq_length": self.max_seq_length,
        }


@dataclass
class FileReport:
    """The result of validating one file."""

    format: str | None = None  # "chat" | "preference" | "prompt_completion" | None (nothing valid)
    n_bytes: int = 0
    n_lines: int = 0
    n_examples: int = 0  # valid examples
    errors: IssueList = field(default_factory=IssueList)
    warnings: IssueList = field(default_factory=IssueList)
    tokens: TokenStats | None = None
    # Why tokens were not counted (tokenizer not available), if they were asked for.
    tokens_unavailable: str | None = None

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return self.errors.total == 0

    def error(self, code: str, message: str, line: int | None = None, path: str = "") -> None:
        """Record an error at ``line`` / ``path``."""
        self.errors.add(Issue(code, message, line, path))

    def warn(self, code: str, message: str, line: int | None = None, path: str = "") -> None:
        """Record a warning at ``line`` / ``path``."""
        self.warnings.add(Issue(code, message, line, path))

    def summary(self) -> str:
        """One line: format, examples, errors and warnings."""
        fmt = {"chat": "chat", "preference": "preference (DPO)", "prompt_completion": "prompt/completion"}
        text = (
            f"{self.n_examples} valid example(s) in {self.n_lines} line(s)"
            f"{', format ' + fmt[self.format] if self.format else ''}; "
            f"{self.errors.total} error(s), {self.warnings.total} warning(s)"
        )
        if self.errors.total > len(self.errors.items):
            text += f" (first {len(self.errors.items)} errors listed)"
        return text

    def details(self, max_errors: int = MAX_ISSUES) -> str:
        """The summary, then one line per listed error (for ``File.status_details``)."""
        lines = [self.summary(), *(f"{issue} ({issue.code})" for issue in self.errors.items[:max_errors])]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the dry run's ``training_file_report``)."""
        return {
            "format": self.format,
            "bytes": self.n_bytes,
            "n_lines": self.n_lines,
            "n_examples": self.n_examples,
            "valid": self.ok,
            "n_errors": self.errors.total,
            "errors": [i.to_dict() for i in self.errors.items],
            "n_warnings": self.warnings.total,
            "warnings": [i.to_dict() for i in self.warnings.items],
            "tokens": self.tokens.to_dict() if self.tokens else None,
            "tokens_unavailable": self.tokens_unavailable,
        }
