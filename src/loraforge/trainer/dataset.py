"""Chat JSONL -> tokenized Arrow on disk, cached with the run: constant memory at any file size.

:func:`prepare` turns a training (or validation) file into memory-mapped Arrow files of
``input_ids``, ``labels``, ``length`` and ``n_labels`` columns, one row per example in file order:

1. the JSONL's non-blank lines go to an Arrow file (``line``, ``raw``), read in blocks;
2. ``datasets.Dataset.map(batched=True, num_proc=...)`` validates and tokenizes them with
   :func:`loraforge.trainer.data._validate_example` and
   :func:`~loraforge.trainer.data.tokenize_batch` (the definitions the pre-flight shares), in
   contiguous parts so that progress can be reported between parts;
3. the parts and a ``prepared.json`` (written last: a directory without it is incomplete) go
   under ``cache_root/<key>``, where the key is a hash of the file's sha256, the tokenizer, the
   chat template, ``max_seq_length`` and the method: a resumed, paused or retried run (and every
   FSDP rank) opens the same directory instead of tokenizing again.

The trainer reads rows through :class:`ArrowExamples`, a sequence over the memory-mapped table, so
its resident memory does not grow with the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from loraforge.contracts.train_spec import DATA_PREPARED
from loraforge.preflight.validate import parse_line
from loraforge.trainer.data import (
    IGNORE_INDEX,
    TokenizedExample,
    TrainingDataError,
    _validate_example,
    chat_template_for,
    tokenize_batch,
)

logger = logging.getLogger(__name__)

# Bump when the prepared layout or the tokenization changes: old caches are then not reused.
CACHE_VERSION = 1
PREPARED = DATA_PREPARED
# Rows per map() batch, and the rows per part (progress is reported after each part).
MAP_BATCH = 500
PART_ROWS = 20_000
# Below this many rows one process tokenizes (starting workers costs more than it saves).
PARALLEL_MIN_ROWS = 4_000
_READ_BLOCK = 8 << 20

# progress(done_fraction, elapsed_seconds, estimated_seconds_left)
Progress = Callable[[float, float, float], None]

_FEATURES = datasets.Features(
    {
        "line": datasets.Value("int64"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "n_labels": datasets.Value("int32"),
        # "" for a good example; else "invalid: ..." (the file) or "template: ..." (the template).
        "error": datasets.Value("string"),
    }
)


# What the trainer reads of a prepared file.
_COLUMNS = ["input_ids", "labels", "length", "n_labels"]


class ArrowExamples(Sequence[TokenizedExample]):
    """Tokenized examples read from a memory-mapped Arrow table, in file order."""

    def __init__(self, table: datasets.Dataset) -> None:
        self._table = table

    @classmethod
    def empty(cls) -> ArrowExamples:
        """No examples (a run without a validation file)."""
        columns = {k: v for k, v in _FEATURES.items() if k in _COLUMNS}
        return cls(datasets.Dataset.from_dict({k: [] for k in _COLUMNS}, features=datasets.Features(columns)))

    def __len__(self) -> int:
        return self._table.num_rows

    @overload
    def __getitem__(self, index: int) -> TokenizedExample: ...

    @overload
    def __getitem__(self, index: slice) -> list[TokenizedExample]: ...

    def __getitem__(self, index: int | slice) -> TokenizedExample | list[TokenizedExample]:
        if isinstance(index, slice):
            return self.take(range(len(self))[index])
        row = self._table[index]
        return TokenizedExample(input_ids=row["input_ids"], labels=row["labels"])

    def __iter__(self) -> Iterator[TokenizedExample]:
        for start in range(0, len(self), 1000):
            yield from self.take(range(start, min(start + 1000, len(self))))

    def take(self, indices: Sequence[int]) -> list[TokenizedExample]:
        """The examples at ``indices``, read together (one Arrow gather).

        Args:
            indices: row numbers.

        Returns:
            The examples, in the order of ``indices``.
        """
        if not len(indices):
            return []
        rows = self._table[list(indices)]
        return [
            TokenizedExample(input_ids=ids, labels=labels)
            for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True)
        ]

    def lengths(self) -> list[int]:
        """Every example's token count (the ``length`` column)."""
        return [int(n) for n in self._table.data.column("length").to_numpy()]

    def n_label_tokens(self) -> int:
        """Tokens the loss is computed on, over all examples (the ``n_labels`` column)."""
        return int(pc.sum(self._table.data.column("n_labels")).as_py() or 0)


@dataclass(frozen=True)
class Prepared:
    """A prepared file: its examples and where they live."""

    examples: ArrowExamples
    path: Path
    # Whether the directory was already there (a cache hit): nothing was tokenized.
    cached: bool
    seconds: float


def file_sha256(path: Path, memo_dir: Path | None = None) -> str:
    """The file's sha256, remembered in ``memo_dir`` by (path, size, mtime) so a resume skips it.

    Args:
        path: the file.
        memo_dir: where to remember it (None: always hash).

    Returns:
        The hex digest.
    """
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = memo_dir / ("sha256-" + hashlib.sha256(ident.encode()).hexdigest()[:24]) if memo_dir else None
    if memo is not None and memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_READ_BLOCK):
            digest.update(block)
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest.hexdigest())
    return digest.hexdigest()


def cache_key(file_sha: str, tokenizer: Any, max_seq_length: int | None, method: str) -> str:
    """The prepared directory's name: (file, tokenizer, chat template, max_seq_length, method).

    Args:
        file_sha: the file's sha256.
        tokenizer: the Hugging Face fast tokenizer.
        max_seq_length: the cut applied to every example.
        method: the fine-tuning method (``supervised``).

    Returns:
        A hex key.
    """
    tok = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    template = hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()
    special = json.dumps(
        sorted((k, v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str))
    )
    parts = [
        f"v{CACHE_VERSION}",
        file_sha,
        # The tokenizer by its content, not its ``name_or_path``: that is a folder of this host,
        # and a run resumed on another host must find the data prepared on the first.
        tok,
        template,
        special,
        str(max_seq_length),
        method,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _write_lines(source: Path, target: Path, progress: Callable[[int], None]) -> int:
    """The file's non-blank lines as an Arrow stream file (``line``, ``raw`` bytes); returns rows."""
    schema = pa.schema([("line", pa.int64()), ("raw", pa.large_binary())])
    rows, lineno = 0, 0
    with source.open("rb") as fh, pa.OSFile(str(target), "wb") as sink:
        with pa.ipc.new_stream(sink, schema) as writer:
            tail = b""
            while True:
                block = fh.read(_READ_BLOCK)
                if not block and not tail:
                    break
                chunk = tail + block
                pieces = chunk.split(b"\n")
                tail = pieces.pop() if block else b""
                lines, texts = [], []
                for raw in pieces:
                    lineno += 1
                    if raw.strip():
                        lines.append(lineno)
                        texts.append(raw)
                if texts:
                    columns = [pa.array(lines, pa.int64()), pa.array(texts, pa.large_binary())]
                    writer.write_batch(pa.record_batch(columns, schema))
                    rows += len(texts)
                progress(fh.tell())
                if not block:
                    break
    return rows


def _tokenize_rows(
    batch: dict[str, list[Any]], tokenizer: Any, max_seq_length: int | None
) -> dict[str, list[Any]]:
    """map() body: validate and tokenize a batch of lines (errors go in the ``error`` column)."""
    template = chat_template_for(tokenizer)
    out: dict[str, list[Any]] = {k: [] for k in _FEATURES}
    for line, raw in zip(batch["line"], batch["raw"], strict=True):
        ids: list[int] = []
        labels: list[int] = []
        try:
            obj, issue = parse_line(raw)  # the pre-flight's reading of a line: UTF-8, then JSON
            if issue is not None:
                raise ValueError(issue[1])
            record = _validate_example(obj)
        except ValueError as exc:
            error = f"invalid: {exc}"
        else:
            try:
                tokenized = tokenize_batch(tokenizer, [record], max_seq_length, template)[0]
                ids, labels, error = tokenized.input_ids, tokenized.labels, ""
            except ValueError as exc:
                error = f"template: {exc}"
        out["line"].append(line)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["n_labels"].append(sum(1 for label in labels if label != IGNORE_INDEX))
        out["error"].append(error)
    return out


def _first_error(table: datasets.Dataset) -> tuple[int, str] | None:
    """The first row (in file order) that failed, as (line, error); validation errors first."""
    errors = table.data.column("error")
    for kind in ("invalid: ", "template: "):
        hits = pc.starts_with(errors, kind)
        if pc.any(hits).as_py():
            index = pc.index(hits, True).as_py()
            return int(table.data.column("line")[index].as_py()), str(errors[index].as_py())
    return None


def _check(table: datasets.Dataset, label: str, param: str, min_examples: int) -> None:
    """Raise what :func:`~loraforge.trainer.data.read_chat_jsonl` raises for the same file."""
    found = _first_error(table)
    if found is not None:
        line, error = found
        kind, _, message = error.partition(": ")
        if kind == "template":
            raise ValueError(f"{label} line {line}: {message}")
        raise TrainingDataError(
            "invalid_training_file", f"{label} has an invalid example on line {line}: {message}", param
        )
    if table.num_rows < min_examples:
        raise TrainingDataError(
            "invalid_n_examples",
            f"{label} has {table.num_rows} example(s), but must have at least {min_examples} examples",
            param,
        )


def _open(folder: Path) -> datasets.Dataset:
    meta = json.loads((folder / PREPARED).read_text())
    parts = [datasets.Dataset.from_file(str(folder / name)) for name in meta["parts"]]
    table = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return table.select_columns(_COLUMNS)


def prepare(
    path: str | Path,
    tokenizer: Any,
    max_seq_length: int | None,
    cache_root: Path,
    *,
    method: str = "supervised",
    param: str = "training_file",
    min_examples: int = 10,
    num_proc: int | None = None,
    progress: Progress | None = None,
    wait_only: bool = False,
) -> Prepared:
    """Validate and tokenize a chat JSONL file into ``cache_root``, or open it if already there.

    Args:
        path: the JSONL file.
        tokenizer: the Hugging Face fast tokenizer with the catalog chat template.
        max_seq_length: keep at most this many tokens per example.
        cache_root: where prepared files live (the run's ``data`` directory).
        method: the fine-tuning method (part of the cache key).
        param: the request field reported in errors.
        min_examples: fewest examples accepted.
        num_proc: tokenizing processes (None: the CPUs this process may use).
        progress: called as the file is prepared (fraction done, seconds so far, seconds left).
        wait_only: wait for another process to prepare it (FSDP ranks other than 0).

    Returns:
        The prepared examples.

    Raises:
        TrainingDataError: as :func:`~loraforge.trainer.data.read_chat_jsonl` (the same line named).
        ValueError: the chat template cannot render an example.
    """
    started = time.monotonic()
    datasets.disable_progress_bars()  # progress goes out as trainer events, not tqdm on stderr
    source = Path(path)
    label = "Training file" if param == "training_file" else "Validation file"
    try:
        sha = file_sha256(source, cache_root / "checksums")
    except OSError as exc:
        raise TrainingDataError("invalid_training_file", f"{label} could not be read: {exc}", param) from exc
    folder = cache_root / cache_key(sha, tokenizer, max_seq_length, method)
    while wait_only and not (folder / PREPARED).is_file():
        time.sleep(0.5)  # rank 0 fails the whole launch if the file is bad
    if (folder / PREPARED).is_file():
        table = _open(folder)
        _check_counts(folder, label, param, min_examples)
        return Prepared(ArrowExamples(table), folder, True, time.monotonic() - started)
    work = cache_root / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        table = _build(source, work, tokenizer, max_seq_length, label, param, num_proc, progress, started)
        _check(table, label, param, min_examples)
        meta = {"rows": table.num_rows, "parts": sorted(p.name for p in work.glob("part-*.arrow"))}
        (work / PREPARED).write_text(json.dumps(meta))
        shutil.rmtree(folder, ignore_errors=True)
        work.rename(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = _open(folder)
    seconds = time.monotonic() - started
    logger.info("prepared %s: %d examples in %.1f s -> %s", source.name, table.num_rows, seconds, folder)
    return Prepared(ArrowExamples(table), folder, False, seconds)


def _check_counts(folder: Path, label: str, param: str, min_examples: int) -> None:
    rows = json.loads((folder / PREPARED).read_text())["rows"]
    if rows < min_examples:  # only a directory prepared with a lower minimum (validation vs training)
        raise TrainingDataError(
            "invalid_n_examples",
            f"{label} has {rows} example(s), but must have at least {min_examples} examples",
            param,
        )


def _build(
    source: Path,
    work: Path,
    tokenizer: Any,
    max_seq_length: int | None,
    label: str,
    param: str,
    num_proc: int | None,
    progress: Progress | None,
    started: float,
) -> datasets.Dataset:
    """Lines -> Arrow -> tokenized parts in ``work``; the parts concatenated (lines kept for errors)."""
    size = max(source.stat().st_size, 1)
    # Reading the lines is a small share of the work; tokenizing the rest (measured: ~5% / 95%).
    read_share = 0.05

    def report(fraction: float) -> None:
        if progress is not None and fraction > 0:
            elapsed = time.monotonic() - started
            progress(fraction, elapsed, elapsed * (1 - fraction) / fraction)

    lines_file = work / "lines.arrow"
    try:
        rows = _write_lines(source, lines_file, lambda done: report(read_share * done / size))
    except OSError as exc:
        raise TrainingDataError("invalid_training_file", f"{label} could not be read: {exc}", param) from exc
    lines = datasets.Dataset.from_file(str(lines_file))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    procs = max(1, min(num_proc or cpus, rows // (PARALLEL_MIN_ROWS // 2) or 1))
    parts = []
    n_parts = max(1, -(-rows // PART_ROWS))
    for k in range(n_parts):
        piece = lines.select(range(k * PART_ROWS, min((k + 1) * PART_ROWS, rows)))
        mapped = piece.map(
            _tokenize_rows,
            batched=True,
            batch_size=MAP_BATCH,
            num_proc=procs if len(piece) >= PARALLEL_MIN_ROWS else None,
            fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length},
            remove_columns=["raw"],
            features=_FEATURES,
            cache_file_name=str(work / f"part-{k:05d}.arrow"),
            new_fingerprint=f"{work.name}-{k}",
            desc=None,
        )
        parts.append(mapped)
        report(read_share + (1 - read_share) * (k + 1) / n_parts)
    lines_file.unlink(missing_ok=True)
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
