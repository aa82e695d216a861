"""``loraforge`` command line: run the processes, manage API keys."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from loraforge.cli_client import register as register_client_commands
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

    from loraforge.supervisor import follow_supervisor

    follow_supervisor()
    with _metrics_dir():
        from loraforge.api.app import create_app

        settings = get_settings()
        uvicorn.run(
            create_app(settings),
            host=host or settings.api_host,
            port=port or settings.api_port,
            log_level="info",
        )


@contextmanager
def _metrics_dir() -> Iterator[None]:
    """Give this API process group its own ``PROMETHEUS_MULTIPROC_DIR`` unless the operator set one.

    prometheus-client's multiprocess mode is what makes ``/metrics`` right with several uvicorn
    worker processes (each writes its own files, any of them serves the sum). It must be set
    before ``prometheus_client`` is imported, and must start empty: a fresh temporary directory,
    removed on exit. One the operator sets is theirs to empty between runs.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    folder = tempfile.mkdtemp(prefix="loraforge-api-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _single_process_metrics() -> None:
    """The worker and the engine are one process each: their metrics stay in memory (a per-job
    gauge can then be removed), even if ``PROMETHEUS_MULTIPROC_DIR`` is in the environment."""
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


@app.command()
def worker(
    pools: Annotated[
        str | None,
        typer.Option(help="Comma-separated train pools to serve (default: all, LORAFORGE_TRAIN_POOLS)"),
    ] = None,
    queues: Annotated[
        str | None, typer.Option(help="Comma-separated Celery queues (default: default + train.<pool>)")
    ] = None,
    concurrency: Annotated[int | None, typer.Option(help="Worker threads")] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve /metrics and /healthz here (default LORAFORGE_WORKER_METRICS_PORT; 0: off)"),
    ] = None,
) -> None:
    """Run a Celery worker: validates files, runs trainer subprocesses, registers adapters.

    It trains the jobs planned onto the pools it serves (queue ``train.<pool>`` each).
    """
    from loraforge.db.session import migrate
    from loraforge.planner.gpus import GpuDetectionError
    from loraforge.planner.pools import resolve_pools
    from loraforge.queue.celery_app import create_celery
    from loraforge.queue.routing import worker_queues
    from loraforge.supervisor import follow_supervisor

    follow_supervisor()
    _single_process_metrics()
    if metrics_port is not None:  # the tasks read the settings from the environment
        os.environ["LORAFORGE_WORKER_METRICS_PORT"] = str(metrics_port)
        get_settings.cache_clear()
    settings = get_settings()
    if queues is None:
        served = [p.strip() for p in pools.split(",") if p.strip()] if pools else None
        try:
            # The queues are fixed for the worker's life: a failed GPU detection must not make
            # it a CPU-only worker silently (serve_children_env says why).
            queues = ",".join(worker_queues(resolve_pools(settings, at_start=True), served))
        except (ValueError, GpuDetectionError) as exc:
            err.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from exc
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
    max_loaded_adapters: Annotated[int, typer.Option(help="LRU capacity of hot-loaded adapters")] = 16,
    max_batch_size: Annotated[int, typer.Option(help="Most concurrent requests per generate call")] = 8,
    batch_window_ms: Annotated[float, typer.Option(help="How long a batch waits for company (ms)")] = 5.0,
) -> None:
    """Run an inference engine for one base model (hot-loads LoRA adapters, batches requests).

    Requires ``Authorization: Bearer $LORAFORGE_ENGINE_API_KEY`` on /v1 when that is set.
    """
    from loraforge.serving.app import run_engine
    from loraforge.supervisor import follow_supervisor

    follow_supervisor()
    _single_process_metrics()
    settings = get_settings()
    run_engine(
        settings,
        base or settings.serve_base_model,
        host or settings.engine_host,
        port or settings.engine_port,
        max_loaded_adapters=max_loaded_adapters,
        max_batch_size=max_batch_size,
        batch_window_ms=batch_window_ms,
        api_key=settings.engine_api_key or None,
    )


def serve_children_env(settings: Settings) -> dict[str, dict[str, str]]:
    """The environment of each ``serve`` child (``engine``, ``worker``, ``api``).

    The pools are resolved once, here, and handed to every child as ``LORAFORGE_TRAIN_POOLS``:
    were the API and the worker to detect them each on its own, a detection that failed or
    differed in one of them would plan jobs onto a queue the worker does not consume. Detected
    pools leave the engine its GPU (``planner.pools.serve_layout``).

    Detection that *fails* (``nvidia-smi`` there but timing out or erroring, as opposed to absent:
    no GPU) is retried a few times and then raised, and ``serve`` exits with the reason. Why not
    carry on CPU-only: the pools are fixed for the children's life, so every GPU model would be
    refused at creation and every GPU job already queued would wait for a pool that never
    comes, with nothing telling the operator why. An exit is loud, a supervisor's restart retries
    the detection, and an operator who wants no GPU sets ``LORAFORGE_TRAIN_POOLS`` (never
    detected). Marking pools "unknown" instead would need every planner caller to handle a third
    state, for a condition (a wedged driver) that needs the operator anyway.

    Args:
        settings: this process's settings.

    Returns:
        Child name -> its full environment.

    Raises:
        GpuDetectionError: detection kept failing (see above).
    """
    from loraforge.catalog import load_catalog
    from loraforge.planner.pools import serve_layout

    layout = serve_layout(settings, load_catalog(settings.models_config).get(settings.serve_base_model))
    pools = json.dumps([pool.model_dump(mode="json") for pool in layout.pools])
    common = {**os.environ, "LORAFORGE_TRAIN_POOLS": pools}
    return {"engine": {**common, **layout.engine_env}, "worker": common, "api": common}


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="API bind address (default LORAFORGE_API_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="API port (default LORAFORGE_API_PORT)")] = None,
) -> None:
    """Run API + worker + engine as supervised child processes (the embedded default: no servers).

    A child that exits is restarted with back-off; one that crashes 5 times in 60 s stops
    everything. Each child's output goes to the console and to ``$LORAFORGE_HOME/logs/<name>.log``.
    """
    from loraforge.db.session import migrate
    from loraforge.planner.gpus import GpuDetectionError
    from loraforge.supervisor import ChildSpec, Supervisor

    settings = get_settings()
    if host is not None or port is not None:
        # The children read their settings from the environment, like this process.
        os.environ.update(
            {
                "LORAFORGE_API_HOST": host or settings.api_host,
                "LORAFORGE_API_PORT": str(port or settings.api_port),
            }
        )
        get_settings.cache_clear()
        settings = get_settings()
    migrate(settings)
    try:
        envs = serve_children_env(settings)
    except GpuDetectionError as exc:
        err.print(
            f"[red]{exc}. nvidia-smi is installed but does not answer, so the GPU pools are "
            "unknown; not starting CPU-only. Fix the driver (or its persistence daemon) and start "
            "again, or set LORAFORGE_TRAIN_POOLS to the pools to serve.[/red]"
        )
        raise typer.Exit(2) from exc
    specs = [
        ChildSpec(name, [sys.executable, "-m", "loraforge", name], envs[name])
        for name in ("engine", "worker", "api")
    ]
    supervisor = Supervisor(specs, logs_dir=settings.logs_dir)
    signal.signal(signal.SIGINT, lambda *_: supervisor.request_stop())
    signal.signal(signal.SIGTERM, lambda *_: supervisor.request_stop())
    err.print(serve_banner(settings, envs["api"]["LORAFORGE_TRAIN_POOLS"]), highlight=False, soft_wrap=True)
    raise typer.Exit(supervisor.run())


def serve_banner(settings: Settings, pools: str) -> str:
    """Where ``serve``'s processes listen (full URLs), where the home and logs are."""
    api = f"http://{settings.api_host}:{settings.api_port}"
    return (
        f"[bold]loraforge[/bold] API on {api}/v1 (health {api}/healthz, {api}/readyz, metrics "
        f"{api}/metrics), engine for {settings.serve_base_model} on "
        f"http://{settings.engine_host}:{settings.engine_port}, home {settings.home}, logs in "
        f"{settings.logs_dir}, train pools {pools}"
    )


@app.command()
def validate(
    file: Annotated[Path, typer.Argument(help="Training file (JSONL)")],
    model: Annotated[str, typer.Option(help="Base model id, e.g. loraforge/tiny-llama")],
    method: Annotated[str, typer.Option(help="supervised | dpo")] = "supervised",
    validation_file: Annotated[Path | None, typer.Option(help="Validation file (JSONL)")] = None,
    n_epochs: Annotated[int | None, typer.Option(help="As the job's hyperparameter (default auto)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="As the job's hyperparameter (default auto)")] = None,
    max_seq_length: Annotated[int | None, typer.Option(help="Cut examples here (default: model's)")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the dry-run JSON")] = False,
) -> None:
    """Validate a training file locally and count its tokens: what a job (or a dry run) reports."""
    from loraforge.preflight.console import run_validate

    hyper: dict[str, int | str | None] = {"n_epochs": n_epochs or "auto", "batch_size": batch_size or "auto"}
    hyper["max_seq_length"] = max_seq_length
    code = run_validate(
        get_settings(),
        file,
        model,
        method=method,
        validation_file=validation_file,
        hyperparameters=hyper,
        as_json=json_output,
        out=Console(),
        err=err,
    )
    raise typer.Exit(code)


@keys_app.command("create")
def keys_create(
    org: Annotated[str, typer.Option(help="Organization name (created if new)")],
    tier: Annotated[
        str | None,
        typer.Option(
            help="Plan: trial | core | scale | enterprise (default for a new org: enterprise, no limit)"
        ),
    ] = None,
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


# files / jobs / models / chat: the HTTP client commands (the openai SDK against /v1).
register_client_commands(app)


def main() -> None:
    app()
