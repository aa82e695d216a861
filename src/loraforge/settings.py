"""Service settings, read from the environment (``LORAFORGE_*``) once per process.

Nothing here runs at import time: build a ``Settings`` with :func:`get_settings` (cached) or
directly in tests.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class TrainPool(BaseModel):
    """A group of identical accelerators that training workers serve (one Celery queue).

    A pool is what a job is planned onto: ``count`` devices of ``memory_gib`` each. Jobs planned
    onto it are queued on ``train.<name>``; ``loraforge worker --pools <name>`` consumes them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Letters, digits, "-" and "_": it becomes part of a queue name (and, with the filesystem
    # broker, of message file names).
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
    device: Literal["cuda", "cpu"]
    # Devices per worker machine (an FSDP job can use up to this many).
    count: int = Field(default=1, ge=1)
    # Memory of one device (GiB): a GPU's memory.total as nvidia-smi reports it, or a CPU
    # worker's RAM.
    memory_gib: float = Field(gt=0)
    # A cuda pool's GPUs on each of its worker machines, as a trainer's CUDA_VISIBLE_DEVICES names
    # them (indices in nvidia-smi order, or UUIDs): the devices a worker leases to one trainer at a
    # time. None: the first ``count`` GPUs the worker sees (its CUDA_VISIBLE_DEVICES, else 0..).
    devices: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _devices_match(self) -> TrainPool:
        if self.devices is not None and (self.device != "cuda" or len(self.devices) != self.count):
            raise ValueError(f"pool {self.name}: `devices` lists the `count` GPUs of a cuda pool")
        return self

    def describe(self) -> str:
        """E.g. ``gpu (8× cuda 80 GiB)``."""
        return f"{self.name} ({self.count}× {self.device} {self.memory_gib:g} GiB)"


class Settings(BaseSettings):
    """Everything the API, the worker and the engine need to find each other."""

    model_config = SettingsConfigDict(env_prefix="LORAFORGE_", env_file=".env", extra="ignore")

    # Root of the embedded default: SQLite file, broker folders, blobs, built models.
    home: Path = Path("./.loraforge")
    # Empty means the embedded SQLite file under ``home``; ``postgresql://...`` switches to PostgreSQL.
    database_url: str = ""
    # Empty means kombu's filesystem transport under ``home`` (no server); ``redis://...`` for Redis.
    broker_url: str = ""
    # Where the model catalog lives; empty means the ``configs/models.yaml`` shipped with the package.
    models_config: Path | None = None

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    engine_host: str = "127.0.0.1"
    engine_port: int = 8100
    # Base model -> engine URLs that serve it, e.g. ``{"loraforge/tiny-llama": ["http://127.0.0.1:8100"]}``.
    # Empty means: the one local engine (``engine_host:engine_port``) serves ``serve_base_model``
    # (``loraforge.engines.EngineFleet.from_settings`` reads this).
    engines: dict[str, list[str]] = Field(default_factory=dict)
    # Bearer key the engines require on /v1 (``loraforge engine``, or a vLLM ``--api-key``); the
    # worker and the API send it. Empty: no key.
    engine_api_key: str = ""
    # The base model ``loraforge serve`` starts an engine for.
    serve_base_model: str = "loraforge/tiny-llama"

    # Largest file accepted by ``POST /v1/files`` (bytes).
    max_upload_bytes: int = 100 * 1024 * 1024
    # Largest request body of every other request, to the API and to the engine (bytes; uploads
    # have their own limits). 8 MiB holds a 128k-token chat prompt several times over.
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Serve Swagger UI at /docs and ReDoc at /redoc. Off by default: both pages load their
    # scripts from a CDN (an outside dependency and a weaker Content-Security-Policy);
    # /openapi.json is always served.
    api_docs: bool = False
    # Worker: how often the running trainer's cancel flag is checked (seconds).
    cancel_poll_seconds: float = 0.5
    # Broker polling for the filesystem transport (seconds).
    broker_poll_seconds: float = 0.1
    worker_concurrency: int = 2
    # Python used to run the trainer subprocess; empty means the worker's own interpreter.
    trainer_python: str = ""
    # Threads for CPU training/inference; 0 leaves torch's default.
    torch_threads: int = 0
    # Worker pools jobs are planned onto and queued for (``train.<name>``): "auto" (unset)
    # detects this machine's GPUs with nvidia-smi plus a cpu pool of its RAM
    # (``loraforge.planner.pools``); or a JSON list of {name, device: cuda|cpu, count,
    # memory_gib}. Scale-out deployments set the same list for the API and every worker.
    train_pools: Annotated[list[TrainPool] | None, NoDecode] = None
    # A cuda job whose GPUs another trainer on this host holds stays queued and its train task is
    # sent again after this many seconds (``worker/admission.py``).
    gpu_wait_seconds: float = 10.0

    # Crash recovery. A worker renews the lease of each job it runs every ``heartbeat_seconds``;
    # a reaper (in every worker, every ``reaper_interval_seconds``) re-queues a running job whose
    # lease is older than ``lease_timeout_seconds`` and re-dispatches a queued job nobody picked
    # up for ``requeue_after_seconds`` (its message may have died with a worker).
    heartbeat_seconds: float = 5.0
    lease_timeout_seconds: float = 60.0
    reaper_interval_seconds: float = 10.0
    requeue_after_seconds: float = 300.0
    # After the reaper sends a job's task (re-queue, re-send, start-up), it checks this long later
    # that a worker took it, and sends it again if not (the wait doubling up to
    # ``requeue_after_seconds``): a lost message costs seconds, not the 300 s window.
    requeue_check_seconds: float = 15.0
    # Each worker process serves ``/metrics`` and ``/healthz`` on this port (0: off) and address
    # (``loraforge.ops.metrics``); several workers on one host need a port each.
    worker_metrics_port: int = 0
    worker_metrics_host: str = "127.0.0.1"
    # Pause: how long a worker waits for the trainer's pause checkpoint before stopping it anyway.
    pause_timeout_seconds: float = 120.0
    # Evaluate on the validation sample every N steps besides each epoch end (0: epoch ends only).
    eval_every_steps: int = 50

    # Idempotency-Key: how long a key replays its first response (OpenAI/Stripe: 24 h), and after
    # how long a first request that never finished (process died) stops blocking its key.
    idempotency_ttl_seconds: int = 24 * 3600
    idempotency_lock_seconds: int = 600
    # Webhooks: retry n waits base * 2**(n-1) seconds, capped; ~47 h of retries with the defaults.
    webhook_retry_base_seconds: float = 5.0
    webhook_retry_max_seconds: float = 6 * 3600
    webhook_max_attempts: int = 20
    # One delivery attempt's HTTP timeout, and how often a worker looks for due deliveries.
    webhook_timeout_seconds: float = 10.0
    webhook_poll_seconds: float = 0.5
    # A dispatched delivery whose task has not started after this long is dispatched again.
    webhook_requeue_seconds: float = 300.0
    # Webhook URLs must resolve to public addresses (no loopback, private, link-local, CGNAT,
    # metadata...). Hosts (names or IPs) and CIDRs listed here are allowed anyway: receivers on
    # an internal network, or 127.0.0.1 in tests. JSON list or comma-separated.
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # ``POST /v1/webhook_endpoints/{id}/test``: how long the API waits for the receiver.
    webhook_test_timeout_seconds: float = 5.0

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _parse_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            return (
                json.loads(text)
                if text.startswith("[")
                else [h.strip() for h in text.split(",") if h.strip()]
            )
        return value

    @field_validator("train_pools", mode="before")
    @classmethod
    def _parse_pools(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
            return None
        return json.loads(value) if isinstance(value, str) else value

    @field_validator("train_pools")
    @classmethod
    def _unique_pools(cls, value: list[TrainPool] | None) -> list[TrainPool] | None:
        names = [pool.name for pool in value or []]
        if len(set(names)) != len(names):
            raise ValueError(f"train pool names must be unique, got {names}")
        return value

    @property
    def sqlalchemy_url(self) -> str:
        url = self.database_url or f"sqlite:///{self.home / 'loraforge.sqlite'}"
        # ``postgresql://`` means psycopg 3 here, the driver we install.
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        return url

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def blobs_dir(self) -> Path:
        return self.home / "blobs"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def logs_dir(self) -> Path:
        """``loraforge serve``'s per-child log files (``api.log``, ``worker.log``, ``engine.log``)."""
        return self.home / "logs"

    @property
    def exports_dir(self) -> Path:
        """Cached model exports (merged weights), one folder per fine-tuning job."""
        return self.home / "exports"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
