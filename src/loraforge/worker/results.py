"""The job's result file: its metrics as CSV, stored as a File with purpose ``fine-tune-results``.

Like OpenAI's, the file's content is the CSV **base64-encoded**, so code written against OpenAI
(``base64.b64decode(client.files.content(id).read())``) works unchanged. Columns follow OpenAI's
guide (``step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy``) plus the
end-of-run ``full_valid_*``; a metric not measured at a step is an empty cell. A DPO job's file
(``train_loss``/``valid_loss`` are its DPO loss) adds TRL's reward columns: ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins`` and their ``valid_`` twins.
"""

from __future__ import annotations

import base64
import csv
import io
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from loraforge.db.models import FileRecord, Job, JobEvent
from loraforge.ids import new_id, now
from loraforge.storage.blobs import BlobStore

RESULTS_PURPOSE = "fine-tune-results"
RESULTS_FILENAME = "step_metrics.csv"
# CSV column -> metrics event key.
COLUMNS = {
    "step": "step",
    "train_loss": "train_loss",
    "train_accuracy": "train_mean_token_accuracy",
    "valid_loss": "valid_loss",
    "valid_mean_token_accuracy": "valid_mean_token_accuracy",
    "full_valid_loss": "full_valid_loss",
    "full_valid_mean_token_accuracy": "full_valid_mean_token_accuracy",
}
# Added when the job is a DPO job (its metrics events carry them).
DPO_COLUMNS = {
    f"{prefix}rewards/{column}": f"{prefix or 'train_'}rewards_{key}"
    for prefix in ("", "valid_")
    for column, key in (
        ("chosen", "chosen"),
        ("rejected", "rejected"),
        ("accuracies", "accuracy"),
        ("margins", "margin"),
    )
}


def metrics_by_step(session: Session, job_id: str) -> list[dict[str, Any]]:
    """The job's metrics events' data, one per step in step order (a re-run step: the newest)."""
    rows = session.execute(
        select(JobEvent.data)
        .where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
        .order_by(JobEvent.seq)
    ).scalars()
    by_step: dict[int, dict[str, Any]] = {}
    for data in rows:
        if data and "step" in data:
            by_step[int(data["step"])] = data
    return [by_step[step] for step in sorted(by_step)]


def metrics_csv(rows: list[dict[str, Any]]) -> str:
    """Render metrics rows as the results CSV (plain text, header first).

    Args:
        rows: metrics dicts, as from :func:`metrics_by_step`.

    Returns:
        The CSV text.
    """
    columns = dict(COLUMNS)
    if any("train_rewards_accuracy" in row for row in rows):
        columns.update(DPO_COLUMNS)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells = []
        for key in columns.values():
            value = row.get(key)
            cells.append("" if value is None else (str(value) if key == "step" else f"{float(value):.6g}"))
        writer.writerow(cells)
    return out.getvalue()


def store_results(session: Session, blobs: BlobStore, job: Job) -> FileRecord:
    """Write the job's results file (base64 of the CSV) and its File row.

    Args:
        session: the open session (the row is flushed, not committed).
        blobs: the blob store.
        job: the finished job.

    Returns:
        The File row; its blob is removed again if the caller rolls back and calls
        :func:`discard_results`.
    """
    content = base64.b64encode(metrics_csv(metrics_by_step(session, job.id)).encode())
    file_id = new_id("file-")
    key = f"files/{job.org_id}/{file_id}"
    size = blobs.write_stream(key, iter([content]))
    record = FileRecord(
        id=file_id,
        org_id=job.org_id,
        filename=RESULTS_FILENAME,
        purpose=RESULTS_PURPOSE,
        bytes=size,
        created_at=now(),
        status="processed",
        storage_key=key,
    )
    session.add(record)
    session.flush()
    return record


def discard_results(blobs: BlobStore, record: FileRecord) -> None:
    """Remove the blob of a results file whose row was rolled back."""
    blobs.delete(record.storage_key)
