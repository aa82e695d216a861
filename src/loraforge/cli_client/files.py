"""``loraforge files``: upload (with a progress bar; chunked through ``/v1/uploads`` for large
files), list, download, delete."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from loraforge.cli_client.common import api_errors, err, fmt_bytes, fmt_time, make_client, out, parse_size

if TYPE_CHECKING:
    from openai import OpenAI

files_app = typer.Typer(help="Upload, list, download and delete files.", no_args_is_help=True)

# Above this size `files upload` uses the chunked uploads API (OpenAI's parts are at most 64 MB).
CHUNKED_ABOVE = 64 * 1024 * 1024
DEFAULT_PART = "64MiB"


def transfer_progress() -> Progress:
    """A byte-transfer progress bar on stderr."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


class _ProgressFile(io.BufferedReader):
    """A file whose reads advance a progress bar: the SDK streams it into the multipart body."""

    def __init__(self, path: Path, progress: Progress, task: Any) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._progress, self._task = progress, task

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self._progress.update(self._task, completed=self.tell())
        return data


def _upload_single(client: OpenAI, path: Path, purpose: str, progress: Progress, task: Any) -> Any:
    with _ProgressFile(path, progress, task) as fh:
        return client.files.create(file=(path.name, fh), purpose=purpose)  # type: ignore[arg-type]


def _upload_chunked(
    client: OpenAI, path: Path, purpose: str, part_size: int, progress: Progress, task: Any
) -> Any:
    """OpenAI's multipart upload: create, add parts in order, complete with their ids and the md5."""
    size = path.stat().st_size
    upload = client.uploads.create(
        bytes=size,
        filename=path.name,
        mime_type="application/jsonl",
        purpose=purpose,  # type: ignore[arg-type]
    )
    md5 = hashlib.md5(usedforsecurity=False)
    part_ids: list[str] = []
    with path.open("rb") as fh:
        while chunk := fh.read(part_size):
            md5.update(chunk)
            part_ids.append(client.uploads.parts.create(upload.id, data=chunk).id)
            progress.advance(task, len(chunk))
    done = client.uploads.complete(upload.id, part_ids=part_ids, md5=md5.hexdigest())
    return done.file


def upload_path(
    client: OpenAI,
    path: Path,
    purpose: str = "fine-tune",
    chunked: bool | None = None,
    part_size: int = CHUNKED_ABOVE,
) -> Any:
    """Upload ``path`` with a progress bar; returns the FileObject.

    Args:
        client: the SDK client.
        path: the local file.
        purpose: the file's purpose.
        chunked: force (True) or avoid (False) the uploads API; None picks by size.
        part_size: bytes per part for a chunked upload.
    """
    import openai

    size = path.stat().st_size
    use_chunks = chunked if chunked is not None else size > CHUNKED_ABOVE
    with transfer_progress() as progress:
        task = progress.add_task(f"upload {path.name}", total=size)
        if use_chunks:
            try:
                return _upload_chunked(client, path, purpose, part_size, progress, task)
            except openai.NotFoundError:
                err.print("[yellow]This server has no uploads API; sending the file in one request.[/yellow]")
                progress.reset(task, total=size)
        return _upload_single(client, path, purpose, progress, task)


def wait_processed(client: OpenAI, file: Any, timeout: float = 30.0) -> Any:
    """Wait while the server validates the file (status ``uploaded`` -> ``processed`` | ``error``)."""
    deadline = time.monotonic() + timeout
    while getattr(file, "status", None) == "uploaded" and time.monotonic() < deadline:
        time.sleep(0.5)
        file = client.files.retrieve(file.id)
    return file


@files_app.command("upload")
@api_errors
def upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="File to upload")],
    purpose: Annotated[str, typer.Option(help="fine-tune, batch, user_data, ...")] = "fine-tune",
    chunked: Annotated[
        bool | None,
        typer.Option("--chunked/--single", help="Use the uploads API (default: only above 64 MiB)"),
    ] = None,
    part_size: Annotated[str, typer.Option(help="Part size for chunked uploads")] = DEFAULT_PART,
    wait: Annotated[bool, typer.Option(help="Wait for the server's validation of the file")] = True,
) -> None:
    """Upload FILE; prints the file id (last line of stdout)."""
    client = make_client()
    file = upload_path(client, path, purpose, chunked, parse_size(part_size))
    if wait:
        file = wait_processed(client, file)
    status = getattr(file, "status", None)
    if status == "error":
        err.print(f"[red]The server rejected {path.name}:[/red] {getattr(file, 'status_details', '')}")
        out.print(file.id, highlight=False)
        raise typer.Exit(1)
    err.print(f"uploaded {path.name} ({fmt_bytes(file.bytes)}) as {file.id}, status {status}")
    out.print(file.id, highlight=False)


@files_app.command("list")
@api_errors
def list_files(
    purpose: Annotated[str | None, typer.Option(help="Only files with this purpose")] = None,
    limit: Annotated[int, typer.Option(help="At most this many")] = 100,
) -> None:
    """List your files, newest first."""
    client = make_client()
    page = client.files.list(limit=limit, purpose=purpose) if purpose else client.files.list(limit=limit)
    table = Table("id", "filename", "purpose", "bytes", "created", "status")
    for f in page.data:
        status = getattr(f, "status", None) or "-"
        if status == "error" and getattr(f, "status_details", None):
            status += f": {f.status_details}"
        table.add_row(f.id, f.filename, f.purpose, fmt_bytes(f.bytes), fmt_time(f.created_at), status)
    out.print(table)


@files_app.command("download")
@api_errors
def download(
    file_id: Annotated[str, typer.Argument(help="File id (e.g. a job's result file)")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write it")] = None,
    raw: Annotated[bool, typer.Option(help="Keep a result file base64-encoded, as served")] = False,
) -> None:
    """Download a file's content (e.g. a job's result CSV); prints the path written."""
    client = make_client()
    meta = client.files.retrieve(file_id)
    target = output or Path(meta.filename)
    with client.files.with_streaming_response.content(file_id) as response, target.open("wb") as fh:
        for chunk in response.iter_bytes():
            fh.write(chunk)
    if meta.purpose == "fine-tune-results" and not raw:
        # Result CSVs are base64 on the wire, as OpenAI serves them; write the CSV itself.
        try:
            target.write_bytes(base64.b64decode(b"".join(target.read_bytes().split()), validate=True))
        except (binascii.Error, ValueError):
            pass  # not base64 after all: keep it as served
    out.print(str(target), highlight=False)


@files_app.command("delete")
@api_errors
def delete(file_id: Annotated[str, typer.Argument(help="File id")]) -> None:
    """Delete a file."""
    result = make_client().files.delete(file_id)
    out.print(f"deleted {result.id}" if result.deleted else f"not deleted: {result.id}", highlight=False)
