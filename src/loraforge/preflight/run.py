"""The entry points: validate a file on its own (at upload) or for a base model and method (at job
creation, in a dry run, from the CLI) — one code path, so they all report the same thing."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.catalog.catalog import BaseModelEntry
from loraforge.preflight.estimate import Throughput, default_throughput, estimate_job
from loraforge.preflight.parallel import validate_path, workers_for
from loraforge.preflight.report import FileReport
from loraforge.preflight.template import compile_template
from loraforge.preflight.tokenizer_source import (
    TokenizerUnavailable,
    fast_counter,
    load_tokenizer_json,
    locate_tokenizer,
)
from loraforge.preflight.tokens import TokenCounter
from loraforge.preflight.validate import WARNING_CODES, validate_lines

# OpenAI: "at least 10 examples" for training. The trainer takes a validation file with 1.
MIN_TRAINING_EXAMPLES = 10
MIN_VALIDATION_EXAMPLES = 1
METHOD_FORMATS = {"supervised": "chat", "dpo": "preference"}
OPENAI_FORMAT_NAMES = {
    "chat": "fine-tune-chat",
    "preference": "preference",
    "prompt_completion": "prompt-completion",
}

Progress = Callable[[int], None]


def validate_file(lines: Iterable[bytes], progress: Progress | None = None) -> FileReport:
    """Structure only (no base model): what runs after an upload.

    Args:
        lines: the file's raw lines (iterate a binary file object).
        progress: called with the bytes read so far.

    Returns:
        The report.
    """
    return validate_lines(lines, progress=progress)


def make_counter(
    entry: BaseModelEntry, models_dir: Path, report: FileReport, max_seq_length: int | None = None
) -> TokenCounter | None:
    """A token counter for ``entry`` that reports into ``report``; None (and the reason recorded in
    ``report.tokens_unavailable``) if its tokenizer is not available offline.

    Examples are cut at ``min(max_seq_length or entry.max_seq_length, entry.context_length)``, as
    the trainer cuts them.
    """
    try:
        source = locate_tokenizer(entry, models_dir)
    except TokenizerUnavailable as exc:
        report.tokens_unavailable = str(exc)
        report.warn("tokens_not_counted", f"tokens were not counted: {exc}")
        return None
    template = compile_template(entry.chat_template_text, source.special_tokens)

    def sink(code: str, message: str, line: int, path: str) -> None:
        (report.warn if code in WARNING_CODES else report.error)(code, message, line, path)

    limit = min(max_seq_length or entry.max_seq_length, entry.context_length)
    return TokenCounter(
        load_tokenizer_json(source.tokenizer_json), template, limit, sink, fast_counter(source.tokenizer_json)
    )


def validate_for_model(
    lines: Iterable[bytes],
    entry: BaseModelEntry,
    models_dir: Path,
    *,
    param: str = "training_file",
    method: str = "supervised",
    file_id: str | None = None,
    max_seq_length: int | None = None,
    progress: Progress | None = None,
    path: Path | None = None,
) -> FileReport:
    """Structure, then tokens with ``entry``'s tokenizer and chat template, then the job-level rules:
    enough examples, a format that matches ``method``, something to train on.

    Args:
        lines: the file's raw lines.
        entry: the job's base model.
        models_dir: where builtin models live (for their tokenizer).
        param: ``training_file`` or ``validation_file`` (minimum example counts differ).
        method: the job's ``method.type``.
        file_id: named in the format-mismatch message, as OpenAI does.
        max_seq_length: the job's ``max_seq_length`` (None: the catalog's).
        progress: called with the bytes read so far.
        path: the same file on local disk, if it is: a large one is then checked by one process
            per core (``preflight/parallel.py``) and ``lines`` is not read.

    Returns:
        The report; file-level problems have ``line`` None.
    """
    report = FileReport()
    workers = workers_for(path.stat().st_size) if path is not None else 1
    if (
        path is None
        or workers < 2
        or not validate_path(
            path,
            report,
            workers=workers,
            entry=entry,
            models_dir=models_dir,
            max_seq_length=max_seq_length,
            for_training=True,
            progress=progress,
        )
    ):
        counter = make_counter(entry, models_dir, report, max_seq_length)
        validate_lines(lines, counter=counter, report=report, progress=progress, for_training=True)
    expected = METHOD_FORMATS.get(method, "chat")
    if report.format is not None and report.format != expected and report.format in METHOD_FORMATS.values():
        name, fmt = file_id or "the file", OPENAI_FORMAT_NAMES[report.format]
        report.error(
            "wrong_method",
            f"Invalid file format. Input file {name} is in the {fmt} format, but the specified "
            f"fine-tuning job is not using '{_method_for(report.format)}' as the training method "
            f"(provided method={method}).",
        )
    minimum = MIN_TRAINING_EXAMPLES if param == "training_file" else MIN_VALIDATION_EXAMPLES
    if report.n_examples < minimum and report.format in (None, expected):
        label = "Training" if param == "training_file" else "Validation"
        report.error(
            "too_few_examples",
            f"{label} file has {report.n_examples} example(s), but must have at least {minimum} examples",
        )
    tokens = report.tokens
    if tokens is not None and report.format == "chat" and report.n_examples and not tokens.trained_tokens:
        if not any(i.code in ("no_trained_tokens", "example_too_long") for i in report.errors.items):
            report.error("no_trained_tokens", "no assistant token is left to train on")
    return report


def _method_for(fmt: str) -> str:
    return next(method for method, f in METHOD_FORMATS.items() if f == fmt)


def job_error(report: FileReport, param: str, method: str) -> dict[str, Any] | None:
    """The ``job.error`` a real job fails with for ``report`` (None: the file is fine).

    Args:
        report: from :func:`validate_for_model`.
        param: ``training_file`` or ``validation_file``.
        method: the job's ``method.type``.

    Returns:
        ``{"code", "message", "param"}`` or None.
    """
    label = "training" if param == "training_file" else "validation"
    codes = {issue.code for issue in report.errors.items}
    if "wrong_method" in codes:
        first = next(i for i in report.errors.items if i.code == "wrong_method")
        return {
            "code": "invalid_training_file",
            "message": f"The job failed due to an invalid {label} file. {first.message}",
            "param": param,
        }
    if codes == {"too_few_examples"}:
        return {"code": "invalid_n_examples", "message": report.errors.items[0].message, "param": param}
    if report.errors.total:
        listed = "; ".join(str(i) for i in report.errors.items[:5])
        more = report.errors.total - min(5, len(report.errors.items))
        return {
            "code": "invalid_training_file",
            "message": f"The job failed due to an invalid {label} file: {report.errors.total} error(s) in "
            f"{report.n_lines} line(s). {listed}" + (f" (and {more} more)" if more > 0 else ""),
            "param": param,
        }
    return None


@dataclass
class JobCheck:
    """Everything a job learns before it is queued: both files' reports, the error, the estimate."""

    model: str
    method: str
    training: FileReport
    validation: FileReport | None
    error: dict[str, Any] | None
    estimate: dict[str, Any] | None
    requested: dict[str, Any]  # the job's hyperparameters as asked ("auto" allowed)

    def to_dict(self, training_id: str | None = None, validation_id: str | None = None) -> dict[str, Any]:
        """The dry-run answer (also ``loraforge validate --json``).

        Shaped like the job it would create, so the SDK parses it as a ``FineTuningJob`` without
        complaint: ``training_file``/``validation_file`` are ids, ``method`` an object; the reports
        are in ``training_file_report``/``validation_file_report``.
        """
        estimate = self.estimate or {}
        return {
            "object": "fine_tuning.job.dry_run",
            "model": self.model,
            "method": {"type": self.method},
            "training_file": training_id,
            "validation_file": validation_id,
            "valid": self.error is None,
            "error": self.error,
            "hyperparameters": {
                k: estimate.get(k, self.requested.get(k) or "auto")
                for k in ("n_epochs", "batch_size", "learning_rate_multiplier")
            },
            "estimate": self.estimate,
            "training_file_report": self.training.to_dict(),
            "validation_file_report": self.validation.to_dict() if self.validation else None,
        }


def check_job(
    entry: BaseModelEntry,
    models_dir: Path,
    *,
    method: str,
    hyperparameters: dict[str, Any],
    training: Callable[[], Iterable[bytes]],
    validation: Callable[[], Iterable[bytes]] | None = None,
    training_file_id: str | None = None,
    validation_file_id: str | None = None,
    throughput: Throughput | None = None,
    progress: Progress | None = None,
    paths: tuple[Path | None, Path | None] = (None, None),
) -> JobCheck:
    """Validate a job's files against its base model and method, and estimate the run.

    Args:
        entry: the base model.
        models_dir: where builtin models live.
        method: ``method.type``.
        hyperparameters: the requested values (``"auto"`` allowed).
        training: opens the training file's lines.
        validation: opens the validation file's lines, if there is one.
        training_file_id: named in messages.
        validation_file_id: named in messages.
        throughput: measured tokens/s (default: the catalog strategy's).
        progress: called with bytes read (per file).
        paths: the training and validation files on local disk, where they are (large ones are
            then checked by one process per core).

    Returns:
        The :class:`JobCheck`; ``error`` is what the job fails with (None: it may be queued).
    """
    max_len = hyperparameters.get("max_seq_length")
    train = validate_for_model(
        training(),
        entry,
        models_dir,
        method=method,
        file_id=training_file_id,
        max_seq_length=max_len,
        progress=progress,
        path=paths[0],
    )
    valid = None
    if validation is not None:
        valid = validate_for_model(
            validation(),
            entry,
            models_dir,
            param="validation_file",
            method=method,
            file_id=validation_file_id,
            max_seq_length=max_len,
            progress=progress,
            path=paths[1],
        )
    error = job_error(train, "training_file", method)
    if error is None and valid is not None:
        error = job_error(valid, "validation_file", method)
    estimate = None
    if train.format == "chat" and train.ok:
        estimate = estimate_job(
            entry,
            hyperparameters,
            train.n_examples,
            train.tokens.to_dict() if train.tokens else None,
            valid.tokens.to_dict() if valid and valid.tokens else None,
            throughput or default_throughput(entry),
        )
    return JobCheck(entry.id, method, train, valid, error, estimate, dict(hyperparameters))
