"""``loraforge validate FILE --model MODEL``: the pre-flight a job gets, run locally.

Prints the same report as a dry run (``--json``: the same JSON), with a progress bar for large
files. Exit code 0 when a job would be queued, 1 when it would fail, 2 for a usage error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from loraforge.catalog import load_catalog
from loraforge.preflight.report import FileReport
from loraforge.preflight.run import check_job
from loraforge.settings import Settings

# Files at least this big get a progress bar (on a terminal).
PROGRESS_MIN_BYTES = 8 * 1024 * 1024


def _reader(path: Path) -> Callable[[], Iterator[bytes]]:
    def read() -> Iterator[bytes]:
        with path.open("rb") as fh:
            yield from fh

    return read


def run_validate(
    settings: Settings,
    file: Path,
    model: str,
    *,
    method: str,
    validation_file: Path | None,
    hyperparameters: dict[str, Any],
    as_json: bool,
    out: Console,
    err: Console,
) -> int:
    """Validate ``file`` (and ``validation_file``) for a job on ``model``; print; return the exit code."""
    entry = load_catalog(settings.models_config).get(model)
    if entry is None:
        err.print(f"[red]unknown base model {model!r}: see configs/models.yaml[/red]")
        return 2
    for path in (file, validation_file):
        if path is not None and not path.is_file():
            err.print(f"[red]no such file: {path}[/red]")
            return 2
    total = file.stat().st_size + (validation_file.stat().st_size if validation_file else 0)
    show = not as_json and err.is_terminal and total >= PROGRESS_MIN_BYTES
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    task = bar.add_task("validating", total=total)
    done = [0, 0]  # bytes of files already finished, bytes of the current one

    def progress(n_bytes: int) -> None:
        if n_bytes < done[1]:  # the next file started
            done[0] += done[1]
        done[1] = n_bytes
        bar.update(task, completed=done[0] + n_bytes)

    with bar if show else nullcontext():
        check = check_job(
            entry,
            settings.models_dir,
            method=method,
            hyperparameters=hyperparameters,
            training=_reader(file),
            validation=_reader(validation_file) if validation_file else None,
            training_file_id=str(file),
            validation_file_id=str(validation_file) if validation_file else None,
            progress=progress if show else None,
            paths=(file, validation_file),
        )
    body = check.to_dict(str(file), str(validation_file) if validation_file else None)
    if as_json:
        out.print_json(json.dumps(body))
    else:
        _print_human(out, check.model, body, check.training, check.validation)
    return 0 if check.error is None else 1


def _print_report(out: Console, title: str, report: FileReport) -> None:
    out.print(f"[bold]{title}[/bold]: {report.summary()}", highlight=False)
    for issue in report.errors.items:
        out.print(f"  [red]error[/red] {issue} [dim]({issue.code})[/dim]", highlight=False)
    for issue in report.warnings.items[:20]:
        out.print(f"  [yellow]warning[/yellow] {issue} [dim]({issue.code})[/dim]", highlight=False)
    if report.warnings.total > 20:
        out.print(f"  … and {report.warnings.total - 20} more warnings (--json lists up to 100)")
    if report.tokens is not None:
        t = report.tokens
        out.print(
            f"  tokens: {t.total_tokens} in all, {t.trained_tokens} trained (assistant, weight 1); longest "
            f"example {t.longest_example_tokens} tokens (line {t.longest_example_line}); "
            f"{t.truncated_examples} cut at {t.max_seq_length}",
            highlight=False,
        )
    elif report.tokens_unavailable:
        out.print(f"  tokens: not counted ({report.tokens_unavailable})")


def _print_human(
    out: Console, model: str, body: dict[str, Any], training: FileReport, validation: FileReport | None
) -> None:
    _print_report(out, "training file", training)
    if validation is not None:
        _print_report(out, "validation file", validation)
    estimate = body.get("estimate")
    if estimate:
        e = estimate
        out.print(
            f"[bold]estimate[/bold] on {model}: {e['n_epochs']} epochs × {e['steps_per_epoch']} steps "
            f"(batch {e['batch_size']}) = {e['total_steps']} steps; {e['estimated_trained_tokens']} trained "
            f"tokens; about {e['estimated_duration_seconds']} s at {e['throughput_tokens_per_second']} "
            f"tokens/s ({e['throughput_source']})",
            highlight=False,
        )
    error = body.get("error")
    if error:
        out.print(
            f"[red bold]a job would fail[/red bold]: {error['code']} ({error['param']}): {error['message']}",
            highlight=False,
        )
    else:
        out.print("[green bold]a job would be queued[/green bold]")
