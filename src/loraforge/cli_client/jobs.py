"""``loraforge jobs``: create (optionally uploading the files and watching the run), list, get,
cancel, pause, resume, events, checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from loraforge.cli_client.common import api_errors, dump, err, fmt_time, make_client, out
from loraforge.cli_client.files import upload_path, wait_processed
from loraforge.cli_client.watch import STATUS_STYLE, new_events, sparkline, watch_job

if TYPE_CHECKING:
    from openai import OpenAI

jobs_app = typer.Typer(help="Create, follow and manage fine-tuning jobs.", no_args_is_help=True)

JobArg = Annotated[str, typer.Argument(help="Job id (ftjob-...)")]


def _file_id(client: OpenAI, value: str | None) -> str | None:
    """A file id as given, or the id of a local file uploaded now."""
    if value is None or not Path(value).is_file():
        return value
    file = wait_processed(client, upload_path(client, Path(value)))
    if getattr(file, "status", None) == "error":
        err.print(f"[red]The server rejected {value}:[/red] {getattr(file, 'status_details', '')}")
        raise typer.Exit(1)
    err.print(f"uploaded {value} as {file.id}")
    return str(file.id)


def _status(status: str) -> Text:
    return Text(status, STATUS_STYLE.get(status, "yellow"))


def _follow(client: OpenAI, job_id: str, show_metrics: bool = False) -> None:
    """Watch until the job ends; exit 0 when it succeeded (printing its model), 1 otherwise."""
    try:
        job = watch_job(client, job_id, show_metrics=show_metrics)
    except KeyboardInterrupt:
        status = client.fine_tuning.jobs.retrieve(job_id).status
        err.print(
            f"\nStopped watching; {job_id} is {status} and carries on. "
            f"Follow it again with `loraforge jobs events {job_id} --watch`."
        )
        raise typer.Exit(130) from None
    if job.status != "succeeded":
        message = job.error.message if job.error and job.error.message else ""
        err.print(Text.assemble("job ", _status(job.status), f": {message}" if message else ""))
        raise typer.Exit(1)
    err.print(Text.assemble("job ", _status("succeeded"), f": {job.fine_tuned_model}"))
    out.print(job.fine_tuned_model, highlight=False)


@jobs_app.command("create")
@api_errors
def create(
    model: Annotated[str, typer.Option(help="Base model to fine-tune (see `loraforge models list`)")],
    file: Annotated[
        str, typer.Option("--file", help="Training file: an id, or a local JSONL path to upload")
    ],
    validation_file: Annotated[
        str | None, typer.Option(help="Validation file: an id or a local path")
    ] = None,
    suffix: Annotated[str | None, typer.Option(help="Nickname, part of the fine-tuned model name")] = None,
    epochs: Annotated[int | None, typer.Option(help="n_epochs (default auto)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="batch_size (default auto)")] = None,
    lr_multiplier: Annotated[
        float | None, typer.Option(help="learning_rate_multiplier (default auto)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for a reproducible run")] = None,
    method: Annotated[
        str, typer.Option(help="supervised (chat file) | dpo (preference file: preferred/non-preferred)")
    ] = "supervised",
    beta: Annotated[
        float | None, typer.Option(help="DPO's beta, in (0, 2] (default auto: 0.1); --method dpo only")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Validate and estimate only; no job is queued")] = False,
    watch: Annotated[bool, typer.Option(help="Follow the run live (Ctrl-C stops watching only)")] = False,
) -> None:
    """Create a LoRA fine-tuning job (supervised or DPO); prints the job id (and, with --watch, the
    model). A DPO job can start from a fine-tuned model (--model ft:...), as Together recommends."""
    if method not in ("supervised", "dpo"):
        err.print("[red]--method must be supervised or dpo[/red]")
        raise typer.Exit(2)
    if beta is not None and method != "dpo":
        err.print("[red]--beta is DPO's: add --method dpo[/red]")
        raise typer.Exit(2)
    client = make_client()
    hyperparameters: dict[str, Any] = {
        k: v
        for k, v in (
            ("n_epochs", epochs),
            ("batch_size", batch_size),
            ("learning_rate_multiplier", lr_multiplier),
        )
        if v is not None
    }
    if beta is not None:
        hyperparameters["beta"] = beta
    params: dict[str, Any] = {
        "model": model,
        "training_file": _file_id(client, file),
        "method": {"type": method, method: {"hyperparameters": hyperparameters}},
    }
    if validation_file:
        params["validation_file"] = _file_id(client, validation_file)
    if suffix:
        params["suffix"] = suffix
    if seed is not None:
        params["seed"] = seed
    if dry_run:
        out.print_json(dump(client.fine_tuning.jobs.create(**params, extra_body={"dry_run": True})))
        return
    job = client.fine_tuning.jobs.create(**params)
    err.print(Text.assemble("created ", (job.id, "bold"), " ", _status(job.status)))
    out.print(job.id, highlight=False)
    if watch:
        _follow(client, job.id)


@jobs_app.command("list")
@api_errors
def list_jobs(limit: Annotated[int, typer.Option(help="At most this many")] = 20) -> None:
    """List your jobs, newest first."""
    page = make_client().fine_tuning.jobs.list(limit=limit)
    table = Table("id", "base model", "method", "created", "status", "fine-tuned model")
    for job in page.data:
        method = job.method.type if job.method else "supervised"
        table.add_row(
            job.id,
            job.model,
            method,
            fmt_time(job.created_at),
            _status(job.status),
            job.fine_tuned_model or "-",
        )
    out.print(table)


@jobs_app.command("get")
@api_errors
def get(
    job_id: JobArg, as_json: Annotated[bool, typer.Option("--json", help="Print the raw object")] = False
) -> None:
    """Show one job, with its latest metrics."""
    client = make_client()
    job = client.fine_tuning.jobs.retrieve(job_id)
    if as_json:
        out.print_json(dump(job))
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    hp = job.hyperparameters
    rows: list[tuple[str, Any]] = [
        ("id", job.id),
        ("status", _status(job.status)),
        ("base model", job.model),
        ("fine-tuned model", job.fine_tuned_model or "-"),
        ("training file", job.training_file),
        ("validation file", job.validation_file or "-"),
        (
            "hyperparameters",
            f"epochs={hp.n_epochs} batch_size={hp.batch_size} lr_multiplier={hp.learning_rate_multiplier}"
            + (f" beta={_beta(job)}" if job.method and job.method.type == "dpo" else ""),
        ),
        ("method", job.method.type if job.method else "supervised"),
        ("created", fmt_time(job.created_at)),
        ("finished", fmt_time(job.finished_at)),
        ("trained tokens", str(job.trained_tokens or "-")),
        ("result files", ", ".join(job.result_files or []) or "-"),
    ]
    if job.error and job.error.message:
        rows.append(("error", Text(f"{job.error.code}: {job.error.message}", "red")))
    events = new_events(client, job_id, set())
    metrics = [e.data for e in events if e.type == "metrics" and e.data]
    if metrics:
        last = metrics[-1]
        losses = [m["train_loss"] for m in metrics if m.get("train_loss") is not None]
        rows.append(("step", f"{last.get('step')}/{last.get('total_steps')}"))
        rows.append(("train loss", f"{last.get('train_loss', float('nan')):.4f}  {sparkline(losses)}"))
        if last.get("valid_loss") is not None:
            rows.append(("valid loss", f"{last['valid_loss']:.4f}"))
        if last.get("train_rewards_accuracy") is not None:  # a DPO job: train loss is the DPO loss
            rows.append(
                (
                    "rewards",
                    f"chosen {last['train_rewards_chosen']:.3f}  "
                    f"rejected {last['train_rewards_rejected']:.3f}  "
                    f"accuracy {last['train_rewards_accuracy']:.2f}  "
                    f"margin {last['train_rewards_margin']:.3f}",
                )
            )
    for key, value in rows:
        grid.add_row(key, value)
    out.print(grid)


def _beta(job: Any) -> Any:
    dpo = job.method.dpo if job.method else None
    return dpo.hyperparameters.beta if dpo and dpo.hyperparameters else "auto"


def _act(verb: str, job_id: str) -> None:
    jobs = make_client().fine_tuning.jobs
    job = getattr(jobs, verb)(job_id)
    out.print(Text.assemble(job.id, " ", _status(job.status)))


@jobs_app.command("cancel")
@api_errors
def cancel(job_id: JobArg) -> None:
    """Cancel a job that has not finished."""
    _act("cancel", job_id)


@jobs_app.command("pause")
@api_errors
def pause(job_id: JobArg) -> None:
    """Pause a running job (it keeps its checkpoint)."""
    _act("pause", job_id)


@jobs_app.command("resume")
@api_errors
def resume(job_id: JobArg) -> None:
    """Resume a paused job."""
    _act("resume", job_id)


@jobs_app.command("events")
@api_errors
def events(
    job_id: JobArg,
    limit: Annotated[int, typer.Option(help="How many of the latest events")] = 50,
    watch: Annotated[bool, typer.Option(help="Keep following until the job ends")] = False,
) -> None:
    """A job's events, oldest first; --watch follows new ones (with the live progress)."""
    client = make_client()
    if watch:
        _follow(client, job_id, show_metrics=True)
        return
    page = client.fine_tuning.jobs.list_events(job_id, limit=limit)
    for event in reversed(page.data):
        style = {"warn": "yellow", "error": "red"}.get(event.level, "")
        out.print(
            Text.assemble((fmt_time(event.created_at), "dim"), "  ", (event.message, style)), soft_wrap=True
        )


@jobs_app.command("checkpoints")
@api_errors
def checkpoints(job_id: JobArg) -> None:
    """A job's checkpoints (each usable as a model in chat)."""
    page = make_client().fine_tuning.jobs.checkpoints.list(job_id, limit=100)
    table = Table("step", "model", "train loss", "valid loss", "created")
    for c in page.data:
        m = c.metrics
        table.add_row(
            str(c.step_number),
            c.fine_tuned_model_checkpoint,
            f"{m.train_loss:.4f}" if m and m.train_loss is not None else "-",
            f"{m.valid_loss:.4f}" if m and m.valid_loss is not None else "-",
            fmt_time(c.created_at),
        )
    out.print(table)
