"""Pre-flight glue between the database and ``loraforge.preflight``: validate an uploaded file
(``uploaded`` -> ``processed`` | ``error``), validate a job's files against its base model before it
is queued, and answer a dry run. Never imports torch: tokens are counted with ``tokenizers``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.catalog import BaseModelEntry, load_catalog
from loraforge.contracts.job_error import JobError
from loraforge.db.models import FileRecord, Job
from loraforge.db.session import session_scope
from loraforge.ids import now
from loraforge.jobs.state import JobStatus, add_event, fail, transition
from loraforge.preflight import JobCheck, Throughput, check_job, default_throughput, validate_file
from loraforge.preflight.estimate import startup_seconds
from loraforge.settings import Settings
from loraforge.storage import open_store
from loraforge.storage.blobs import BlobStore

log = logging.getLogger(__name__)

# Finished jobs of the same base model that calibrate the duration estimate.
THROUGHPUT_SAMPLE = 20
# Errors written into one job event (all of them, up to the report's cap, are in its data).
EVENT_ERRORS = 10


def _lines(blobs: BlobStore, key: str) -> Callable[[], Iterator[bytes]]:
    def read() -> Iterator[bytes]:
        with blobs.open(key) as fh:
            yield from fh

    return read


def validate_file_record(settings: Settings, sessions: sessionmaker[Session], file_id: str) -> None:
    """Validate an uploaded fine-tune file's structure and record the outcome on the file.

    Idempotent: only a file still ``uploaded`` is read and updated.
    """
    blobs = open_store(settings)
    with session_scope(sessions) as session:
        record = session.execute(select(FileRecord).where(FileRecord.id == file_id)).scalar_one_or_none()
        if record is None or record.status != "uploaded":
            return
        key = record.storage_key
    try:
        report = validate_file(_lines(blobs, key)())
    except FileNotFoundError:
        return  # deleted while we were reading
    status = "processed" if report.ok else "error"
    with session_scope(sessions) as session:
        session.execute(
            update(FileRecord)
            .where(FileRecord.id == file_id, FileRecord.status == "uploaded")
            .values(status=status, status_details=report.details())
        )
    log.info("file %s: %s (%s)", file_id, status, report.summary())


def measured_throughput(session: Session, entry: BaseModelEntry) -> Throughput:
    """Tokens per second of this deployment's recent successful jobs on ``entry`` (or the default).

    Uses the tokens each job's pre-flight said it would process and its running time minus the
    strategy's startup allowance.
    """
    rows = session.execute(
        select(Job.preflight, Job.started_at, Job.finished_at)
        .where(Job.model == entry.id, Job.status == JobStatus.SUCCEEDED.value, Job.preflight.is_not(None))
        .order_by(Job.seq.desc())
        .limit(THROUGHPUT_SAMPLE)
    ).all()
    tokens = seconds = 0.0
    for preflight, started, finished in rows:
        processed = ((preflight or {}).get("estimate") or {}).get("processed_tokens")
        if processed and started and finished and finished > started:
            tokens += processed
            seconds += max(1.0, finished - started - startup_seconds(entry))
    if tokens and seconds:
        return Throughput(tokens / seconds, "measured")
    return default_throughput(entry)


def run_check(
    settings: Settings,
    blobs: BlobStore,
    entry: BaseModelEntry,
    *,
    method: str,
    hyperparameters: dict[str, Any],
    training: FileRecord,
    validation: FileRecord | None,
    throughput: Throughput,
) -> JobCheck:
    """:func:`loraforge.preflight.check_job` on stored files."""
    return check_job(
        entry,
        settings.models_dir,
        method=method,
        hyperparameters=hyperparameters,
        training=_lines(blobs, training.storage_key),
        validation=_lines(blobs, validation.storage_key) if validation else None,
        training_file_id=training.id,
        validation_file_id=validation.id if validation else None,
        throughput=throughput,
        paths=(_local_path(blobs, training), _local_path(blobs, validation)),
    )


def _local_path(blobs: BlobStore, record: FileRecord | None) -> Path | None:
    """The file on this machine's disk, if the blob store is local (big files are then checked
    with one process per core)."""
    if record is None or not blobs.is_local:
        return None
    path = Path(blobs.local_path(record.storage_key))
    return path if path.is_file() else None


def compact(check: JobCheck) -> dict[str, Any]:
    """What a job keeps of its pre-flight (counts and estimate, not the issue lists)."""

    def brief(report: Any) -> dict[str, Any] | None:
        if report is None:
            return None
        full = report.to_dict()
        return {
            k: full[k]
            for k in ("format", "bytes", "n_lines", "n_examples", "n_errors", "n_warnings", "tokens")
        }

    return {
        "training_file": brief(check.training),
        "validation_file": brief(check.validation),
        "estimate": check.estimate,
    }


def _estimate_message(estimate: dict[str, Any], tokens: dict[str, Any] | None) -> str:
    e = estimate
    text = (
        f"Pre-flight: {e['n_examples']} examples; {e['n_epochs']} epochs of {e['steps_per_epoch']} "
        f"steps (batch {e['batch_size']}), {e['total_steps']} steps"
    )
    if tokens and e.get("tokens_per_epoch") is not None:
        text += (
            f"; {e['tokens_per_epoch']} tokens per epoch, {e['trained_tokens_per_epoch']} trained; "
            f"longest example {tokens['longest_example_tokens']} tokens "
            f"(line {tokens['longest_example_line']}); {e['estimated_trained_tokens']} trained tokens "
            f"in all; about {e['estimated_duration_seconds']} s ({e['throughput_source']} throughput)"
        )
    return text


def _record_issues(session: Session, job_id: str, check: JobCheck) -> None:
    for param, report in (("training_file", check.training), ("validation_file", check.validation)):
        if report is None:
            continue
        for kind, issues in (("error", report.errors), ("warn", report.warnings)):
            if not issues.total:
                continue
            shown = "; ".join(str(i) for i in issues.items[:EVENT_ERRORS])
            more = issues.total - min(EVENT_ERRORS, len(issues.items))
            add_event(
                session,
                job_id,
                f"{param}: {issues.total} {'error' if kind == 'error' else 'warning'}(s): {shown}"
                + (f" (and {more} more)" if more > 0 else ""),
                level=kind,
                data={param: [i.to_dict() for i in issues.items]},
            )


def validate_job_files(settings: Settings, sessions: sessionmaker[Session], job_id: str) -> bool:
    """``validating_files`` -> ``queued`` (True) or ``failed`` with the files' problem (False).

    The files are read outside any transaction (a large file takes seconds); the outcome is
    written with the state machine's conditional update, so a job cancelled meanwhile stays so.
    """
    blobs = open_store(settings)
    catalog = load_catalog(settings.models_config)
    with session_scope(sessions) as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        if job.status != JobStatus.VALIDATING_FILES:
            return False
        entry = catalog.get(job.model)
        training = session.execute(select(FileRecord).where(FileRecord.id == job.training_file)).scalar_one()
        validation = (
            session.execute(select(FileRecord).where(FileRecord.id == job.validation_file)).scalar_one()
            if job.validation_file
            else None
        )
        method = str((job.method or {}).get("type") or "supervised")
        hyper = dict(job.hyperparameters or {})
        throughput = measured_throughput(session, entry) if entry else None
    if entry is None or throughput is None:
        error = JobError(
            code="model_not_found", message=f"Base model {job.model} is not in the catalog.", param="model"
        )
        with session_scope(sessions) as session:
            fail(session, job_id, error)
        return False
    check = run_check(
        settings,
        blobs,
        entry,
        method=method,
        hyperparameters=hyper,
        training=training,
        validation=validation,
        throughput=throughput,
    )
    with session_scope(sessions) as session:
        _record_issues(session, job_id, check)
        # Only from ``validating_files``: a second check of the same job (a worker that started
        # meanwhile re-sends validations at start-up) must not re-queue a job already running.
        still_validating = {"status": JobStatus.VALIDATING_FILES.value}
        if check.error is not None:
            if not fail(
                session,
                job_id,
                JobError.model_validate(check.error),
                expect=still_validating,
                preflight=compact(check),
            ):
                session.rollback()
            return False
        if check.estimate is not None:
            add_event(
                session,
                job_id,
                _estimate_message(
                    check.estimate, check.training.tokens.to_dict() if check.training.tokens else None
                ),
                data=compact(check),
            )
        if transition(
            session,
            job_id,
            JobStatus.QUEUED,
            "Files validated, moving job to queued state",
            expect=still_validating,
            preflight=compact(check),
        ):
            return True
        # Cancelled while its files were being checked, or checked and moved on by another
        # worker: write nothing (the estimate event above included).
        session.rollback()
        return False


def dry_run(
    session: Session,
    settings: Settings,
    blobs: BlobStore,
    entry: BaseModelEntry,
    params: Any,
    hyperparameters: dict[str, Any],
    training: FileRecord,
    validation: FileRecord | None,
) -> dict[str, Any]:
    """The answer to ``POST /v1/fine_tuning/jobs`` with ``"dry_run": true``.

    The same pre-flight a worker runs before queueing the job (:func:`validate_job_files`), so
    ``error`` is exactly what the real job would fail with, and ``estimate`` what it would do.
    """
    method = params.method.type if params.method is not None else "supervised"
    check = run_check(
        settings,
        blobs,
        entry,
        method=method,
        hyperparameters=hyperparameters,
        training=training,
        validation=validation,
        throughput=measured_throughput(session, entry),
    )
    return {**check.to_dict(training.id, validation.id if validation else None), "created_at": now()}
