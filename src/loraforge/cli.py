"""``loraforge`` command line: run the processes, manage API keys."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Annotated

import typer
from rich.console import Console

from loraforge.settings import Settings, get_settings

app = typer.Typer(help="loraforge: self-hosted, OpenAI-compatible LoRA fine-tuning.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
err = Console(stderr=True)


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (default LORAFORGE_API_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default LORAFORGE_API_PORT)")] = None,
) -> None:
    """Run the API server (OpenAI REST under /v1)."""
    import uvicorn

    from loraforge.api.app import create_app

    settings = get_settings()
    uvicorn.run(
        create_app(settings), host=host or settings.api_host, port=port or settings.api_port, log_level="info"
    )


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated Celery queues")] = "default,train",
    concurrency: Annotated[int | None, typer.Option(help="Worker threads")] = None,
) -> None:
    """Run a Celery worker: validates files, runs trainer subprocesses, registers adapters."""
    from loraforge.db.session import migrate
    from loraforge.queue.celery_app import create_celery

    settings = get_settings()
    migrate(settings)
    celery = create_celery(settings)
    import loraforge.queue.tasks  # noqa: F401 - registers the tasks on the app

    celery.worker_main(
        [
            "worker",
            "-Q",
            queues,
            "--pool",
            "threads",
            "-c",
            str(concurrency or settings.worker_concurrency),
            "-n",
            f"loraforge-{os.getpid()}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ]
    )


@app.command()
def engine(
    base: Annotated[
        str | None, typer.Option(help="Base model id to serve (default LORAFORGE_SERVE_BASE_MODEL)")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default LORAFORGE_ENGINE_PORT)")] = None,
) -> None:
    """Run an inference engine for one base model (hot-loads LoRA adapters)."""
    from loraforge.serving.app import run_engine

    settings = get_settings()
    run_engine(
        settings,
        base or settings.serve_base_model,
        host or settings.engine_host,
        port or settings.engine_port,
    )


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "loraforge", *args])


@app.command()
def serve() -> None:
    """Run API + worker + engine as child processes (the embedded default: no servers needed)."""
    from loraforge.db.session import migrate

    settings = get_settings()
    migrate(settings)
    children = {
        "engine": _spawn(["engine"]),
        "worker": _spawn(["worker"]),
        "api": _spawn(["api"]),
    }
    err.print(
        f"[bold]loraforge[/bold] API on http://{settings.api_host}:{settings.api_port}/v1, engine for "
        f"{settings.serve_base_model} on :{settings.engine_port}, home {settings.home}"
    )
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    while not stopping:
        for name, proc in children.items():
            if proc.poll() is not None:
                err.print(f"[red]{name} exited with code {proc.returncode}; stopping[/red]")
                exit_code, stopping = 1, True
        time.sleep(0.5)
    for proc in children.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 15
    for proc in children.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    raise typer.Exit(exit_code)


@keys_app.command("create")
def keys_create(
    org: Annotated[str, typer.Option(help="Organization name (created if new)")],
    tier: Annotated[str | None, typer.Option(help="Plan: trial | core | scale | enterprise")] = None,
) -> None:
    """Create an API key for ORG; the key is the last line of the output."""
    from loraforge.db.session import make_engine, make_sessionmaker, migrate, session_scope
    from loraforge.orgs import TIERS, create_api_key, get_or_create_org

    if tier is not None and tier not in TIERS:
        err.print(f"[red]--tier must be one of {', '.join(TIERS)}[/red]")
        raise typer.Exit(2)
    settings: Settings = get_settings()
    migrate(settings)
    engine_ = make_engine(settings)
    with session_scope(make_sessionmaker(engine_)) as session:
        organization = get_or_create_org(session, org, tier)
        key = create_api_key(session, organization)
        typer.echo(f"organization: {organization.name} ({organization.id}, tier {organization.tier})")
    engine_.dispose()
    typer.echo(key)


def main() -> None:
    app()
