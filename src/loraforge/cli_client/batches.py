"""``loraforge batches``: create a batch from a JSONL of chat requests, list, get, cancel, and
download its results (the output file, or the error file)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from loraforge.cli_client.common import api_errors, dump, err, fmt_time, make_client, out

batches_app = typer.Typer(help="Run chat completions in batches (OpenAI's Batch API).", no_args_is_help=True)

FINAL = ("completed", "failed", "expired", "cancelled")


def _counts(batch: Any) -> str:
    counts = batch.request_counts
    return "-" if counts is None else f"{counts.completed}/{counts.total} done, {counts.failed} failed"


@batches_app.command("create")
@api_errors
def create(
    path: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="JSONL of {custom_id, method, url, body}")
    ],
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until the batch ends, showing its progress")
    ] = False,
) -> None:
    """Upload PATH (purpose batch) and start a batch on it; prints the batch id."""
    client = make_client()
    with path.open("rb") as fh:
        uploaded = client.files.create(file=(path.name, fh), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    out.print(batch.id, highlight=False)
    if wait:
        while batch.status not in FINAL:
            time.sleep(1)
            batch = client.batches.retrieve(batch.id)
            err.print(f"{batch.status}: {_counts(batch)}", highlight=False)
        if batch.status != "completed":
            raise typer.Exit(1)


@batches_app.command("list")
@api_errors
def list_batches(limit: Annotated[int, typer.Option(help="How many, newest first")] = 20) -> None:
    """The organization's batches, newest first."""
    table = Table("id", "status", "model", "requests", "created")
    for b in make_client().batches.list(limit=limit).data:
        table.add_row(b.id, b.status, b.model or "-", _counts(b), fmt_time(b.created_at))
    out.print(table)


@batches_app.command("get")
@api_errors
def get(batch_id: str) -> None:
    """The batch object as JSON."""
    out.print_json(dump(make_client().batches.retrieve(batch_id)))


@batches_app.command("cancel")
@api_errors
def cancel(batch_id: str) -> None:
    """Cancel a batch; the results so far are kept in its output file."""
    batch = make_client().batches.cancel(batch_id)
    out.print(f"{batch.id}: {batch.status}", highlight=False)


@batches_app.command("results")
@api_errors
def results(
    batch_id: str,
    errors: Annotated[
        bool, typer.Option("--errors", help="The error file instead of the output file")
    ] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout")
    ] = None,
) -> None:
    """The batch's output file (one JSON answer a line, in input order), or its error file."""
    client = make_client()
    batch = client.batches.retrieve(batch_id)
    file_id = batch.error_file_id if errors else batch.output_file_id
    if file_id is None:
        err.print(f"{batch_id} is {batch.status} and has no {'error' if errors else 'output'} file.")
        raise typer.Exit(1)
    data = client.files.content(file_id).content
    if output is None:
        sys.stdout.buffer.write(data)
    else:
        output.write_bytes(data)
        err.print(f"wrote {output}", highlight=False)
