"""Validate a large local file with one process per core.

The file is cut into byte ranges at line starts; each range is checked (and its tokens counted) by
its own ``python -m loraforge.preflight.scan_process`` process, and the reports are merged in file order:
issue line numbers shifted by the lines before their range, the earliest ``MAX_ISSUES`` kept,
totals summed. The file's format is taken from its first recognisable line beforehand, so every
range judges "mixed formats" the same way. Each process holds one batch of its range, never the
file: memory stays flat, CPU use scales with the cores.

Plain subprocesses, not ``multiprocessing``: the caller may be a threaded Celery worker or the API
server, whose ``__main__`` (``python -m loraforge ...``) must not be re-imported by a child.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from loraforge.catalog.catalog import BaseModelEntry
from loraforge.preflight.report import FileReport, Issue, IssueList, TokenStats
from loraforge.preflight.validate import ScanState, finish_report, line_format, parse_line, scan_lines

# Smaller files are not worth the processes' start-up (about a second each).
PARALLEL_MIN_BYTES = 24 * 1024 * 1024
MAX_WORKERS = 4
# Lines read looking for the file's format before giving up on splitting it.
FORMAT_SCAN_LINES = 10_000

_ONCE = frozenset({"tokens_not_counted"})


def workers_for(size: int) -> int:
    """How many processes to check a file of ``size`` bytes with (1: in this process)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if size < PARALLEL_MIN_BYTES else max(1, min(cores, MAX_WORKERS))


def _file_format(path: Path) -> tuple[str, int] | None:
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no > FORMAT_SCAN_LINES:
                return None
            obj, problem = parse_line(raw)
            if problem is None and isinstance(obj, dict) and (fmt := line_format(obj)) is not None:
                return fmt, line_no
    return None


def _ranges(path: Path, n: int) -> list[tuple[int, int]]:
    """``n`` byte ranges covering the file, each starting at a line start."""
    size = path.stat().st_size
    cuts = [0]
    with path.open("rb") as fh:
        for k in range(1, n):
            fh.seek(max(cuts[-1], k * size // n - 1))
            fh.readline()  # to the start of the next line
            cuts.append(min(fh.tell(), size))
    cuts.append(size)
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _read_range(path: Path, start: int, end: int) -> Iterator[bytes]:
    with path.open("rb") as fh:
        fh.seek(start)
        pos = start
        for raw in fh:
            if pos >= end:
                return
            pos += len(raw)
            yield raw


def scan_range(task: dict[str, Any], report_progress: Callable[[int], None]) -> tuple[FileReport, ScanState]:
    """Check one byte range (what a worker process does)."""
    from loraforge.preflight.run import make_counter

    report = FileReport()
    entry = task["entry"]
    counter = make_counter(entry, task["models_dir"], report, task["max_seq_length"]) if entry else None
    state = scan_lines(
        _read_range(task["path"], task["start"], task["end"]),
        report,
        counter=counter,
        progress=report_progress,
        for_training=task["for_training"],
        file_format=task["file_format"],
    )
    report_progress(report.n_bytes)
    return report, state


class _Worker:
    """One ``python -m loraforge.preflight.scan_process`` process and the bytes it says it has read."""

    def __init__(self, task: dict[str, Any], result: Path) -> None:
        self.result = result
        self.read = 0
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}  # the processes are the parallelism
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraforge.preflight.scan_process", str(result)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(pickle.dumps(task))
        self.proc.stdin.close()
        self._reader = threading.Thread(target=self._follow, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _follow(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            if line.startswith(b"read "):
                self.read = int(line.split()[1])

    def finish(self) -> tuple[FileReport, ScanState]:
        code = self.proc.wait()
        self._reader.join()
        if code != 0:
            raise RuntimeError(f"pre-flight worker exited with code {code}")
        with self.result.open("rb") as fh:
            out: tuple[FileReport, ScanState] = pickle.load(fh)
        return out


def _shift(issue: Issue, offset: int) -> Issue:
    return issue if issue.line is None else replace(issue, line=issue.line + offset)


def _merge_issues(into: IssueList, part: IssueList, offset: int, skip: set[str]) -> None:
    for issue in part.items:
        if issue.code in skip:
            continue
        into.add(_shift(issue, offset))
    into.total += part.total - len(part.items)


def _merge_tokens(into: TokenStats | None, part: TokenStats | None, offset: int) -> TokenStats | None:
    if part is None:
        return into
    if into is None:
        into = TokenStats(max_seq_length=part.max_seq_length)
    into.total_tokens += part.total_tokens
    into.trained_tokens += part.trained_tokens
    into.truncated_examples += part.truncated_examples
    if part.longest_example_tokens > into.longest_example_tokens and part.longest_example_line is not None:
        into.longest_example_tokens = part.longest_example_tokens
        into.longest_example_line = part.longest_example_line + offset
    return into


def validate_path(
    path: Path,
    report: FileReport,
    *,
    workers: int,
    entry: BaseModelEntry | None = None,
    models_dir: Path | None = None,
    max_seq_length: int | None = None,
    for_training: bool = False,
    progress: Callable[[int], None] | None = None,
) -> bool:
    """Check ``path`` into ``report`` with ``workers`` processes, as :func:`scan_lines` +
    :func:`finish_report` would in one; tokens counted with ``entry``'s tokenizer if given.

    Returns:
        False (nothing done) if the file's format cannot be told from its first lines; the caller
        then checks it in one process.
    """
    file_format = _file_format(path)
    if file_format is None:
        return False
    with tempfile.TemporaryDirectory(prefix="lf-preflight-") as tmp:
        procs = [
            _Worker(
                {
                    "path": path,
                    "start": start,
                    "end": end,
                    "entry": entry,
                    "models_dir": models_dir or Path("."),
                    "max_seq_length": max_seq_length,
                    "for_training": for_training,
                    "file_format": file_format,
                },
                Path(tmp) / f"range-{k}.pickle",
            )
            for k, (start, end) in enumerate(_ranges(path, workers))
        ]
        try:
            while any(w.proc.poll() is None for w in procs):
                if progress is not None:
                    progress(sum(w.read for w in procs))
                time.sleep(0.3)
            results = [w.finish() for w in procs]
        finally:
            for w in procs:
                if w.proc.poll() is None:
                    w.proc.kill()
    if progress is not None:
        progress(sum(part.n_bytes for part, _ in results))
    offset, merged = 0, ScanState()
    report.format = file_format[0]
    for part, state in results:
        # A per-file warning once, not once per range.
        skip = {i.code for i in report.warnings.items if i.code in _ONCE}
        _merge_issues(report.errors, part.errors, offset, set())
        _merge_issues(report.warnings, part.warnings, offset, skip)
        report.tokens = _merge_tokens(report.tokens, part.tokens, offset)
        report.n_examples += part.n_examples
        report.n_lines += part.n_lines
        report.n_bytes += part.n_bytes
        report.tokens_unavailable = report.tokens_unavailable or part.tokens_unavailable
        merged.chat_trained = merged.chat_trained or state.chat_trained
        if merged.tools_line is None and state.tools_line is not None:
            merged.tools_line = state.tools_line + offset
        offset += part.n_lines
    finish_report(report, merged)
    return True
