"""``loraforge models``: list, delete, export (download the adapter, or the merged model, as a tar)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.table import Table

from loraforge.cli_client.common import api_errors, err, fmt_time, make_client, out
from loraforge.cli_client.files import transfer_progress

models_app = typer.Typer(help="List, delete and export models.", no_args_is_help=True)


@models_app.command("list")
@api_errors
def list_models() -> None:
    """Base models (and what this installation can do with them) and your fine-tuned models."""
    table = Table("id", "kind", "base / owner", "created")
    for m in make_client().models.list().data:
        extra = m.model_extra or {}
        tags = extra.get("tags") or []
        base = "base" in tags or "fine-tunable" in tags
        here = [t for t in ("fine-tunable", "servable") if t in tags]
        table.add_row(
            m.id,
            f"base ({', '.join(here) or 'not here'})" if base else "fine-tuned",
            (m.owned_by if base else extra.get("parent")) or "-",
            fmt_time(m.created),
        )
    out.print(table)


@models_app.command("delete")
@api_errors
def delete(model: Annotated[str, typer.Argument(help="Fine-tuned model id (ft:...)")]) -> None:
    """Delete a fine-tuned model (its adapter is unloaded from the engines)."""
    result = make_client().models.delete(model)
    out.print(f"deleted {result.id}" if result.deleted else f"not deleted: {result.id}", highlight=False)


@models_app.command("export")
@api_errors
def export(
    model: Annotated[str, typer.Argument(help="Fine-tuned model (or checkpoint) id")],
    fmt: Annotated[
        str, typer.Option("--format", help="peft (adapter), merged (full weights) or gguf (llama.cpp/Ollama)")
    ] = "peft",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write the .tar")] = None,
) -> None:
    """Download MODEL as a tar with a progress bar; prints the path written."""
    if fmt not in ("peft", "merged", "gguf"):
        raise typer.BadParameter("--format must be peft, merged or gguf")
    client = make_client()
    target = output or Path(re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("_") + f"-{fmt}.tar")
    import openai

    # Not an SDK resource: the SDK's generic GET, asked to stream the body ("raw response: stream").
    try:
        # The raw-response header makes the SDK hand back its (unread) response, not bytes.
        response: Any = client.get(
            f"/models/{quote(model, safe='/:')}/export",
            cast_to=bytes,
            options={"params": {"format": fmt}, "headers": {"x-stainless-raw-response": "stream"}},
        )
    except openai.NotFoundError as exc:
        # Without an export route, the model route answers for "MODEL/export".
        if f"{model}/export" in str(exc.message):
            err.print("[red]This server has no export endpoint.[/red]")
            raise typer.Exit(1) from None
        raise
    total = int(response.headers.get("content-length") or 0) or None
    written = 0
    try:
        with transfer_progress() as progress, target.open("wb") as fh:
            task = progress.add_task(f"export {fmt}", total=total)
            for chunk in response.iter_bytes():
                fh.write(chunk)
                written += len(chunk)
                progress.update(task, completed=written)
    finally:
        response.close()
    err.print(f"wrote {target} ({written} bytes)")
    out.print(str(target), highlight=False)
