"""Service settings, read from the environment (``LORAFORGE_*``) once per process.

Nothing here runs at import time: build a ``Settings`` with :func:`get_settings` (cached) or
directly in tests.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
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
    # Where everything durable lives (files, upload parts, checkpoints, adapters, result files,
    # exports): empty means the folder ``home/blobs``; ``s3://bucket/prefix`` an S3-compatible
    # object store, reached with the standard AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    # AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION. Every machine of a deployment sets the same.
    storage_url: str = ""
    # Redis/SQS brokers hand an unacknowledged task to another worker after this long; a training
    # task stays unacknowledged for the whole run, and the job's lease in the database keeps the
    # copy from starting a second trainer (``worker/training.py``).
    broker_visibility_timeout_seconds: float = 3600.0
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
    # Batches (``/v1/batches``) run in stretches of about this many seconds, each ending by sending
    # the next one to the ``batch`` queue, so a batch never holds a worker thread for long.
    batch_chunk_seconds: float = Field(default=10.0, gt=0)
    # Pause: how long a worker waits for the trainer's pause checkpoint before stopping it anyway.
    pause_timeout_seconds: float = 120.0
    # Evaluate on the validation sample every N steps besides each epoch end (0: epoch ends only).
    eval_every_steps: int = 50

    # Idempotency-Key: how long a key replays its first response (OpenAI/Stripe: 24 h), and after
    # how long a first request that never finished (process died) stops blocking its key.
    idempotency_ttl_seconds: int = 24 * 3600
    idempotency_lock_seconds: int = 600

    # API processes ``loraforge api`` (and ``serve``) runs; more than one needs the limits'
    # counters in Redis (``rate_limit_storage_url``), where every process sees them.
    api_workers: int = Field(default=1, ge=1)
    # The plans' requests/minute and concurrent-request limits, and the failed-authentication
    # limit per client address (``loraforge.plans``, ``api/ratelimit.py``).
    rate_limits: bool = True
    # Where the counters live: empty means Redis when the broker is Redis (shared by every API
    # process), else this process's memory; or a ``limits`` storage URL (``redis://host:6379/0``,
    # ``memory://``).
    rate_limit_storage_url: str = ""
    # The window requests/minute are counted over. 60 counts a minute; a shorter window enforces
    # the same rate in slices (``rpm * window / 60`` per window, OpenAI's "quantized" limits),
    # which spreads a burst out and shortens the Retry-After a client waits.
    rate_limit_window_seconds: int = Field(default=60, ge=1, le=3600)
    # Requests with an unknown API key from one client address, per minute, before that address
    # gets 429s for every request with a key (0: no limit).
    auth_failures_per_minute: int = Field(default=30, ge=0)
    # How long an API process reuses a key's lookup (organization and limits) before reading it
    # again: a revoked key or a changed limit takes effect within this many seconds (0: every time).
    auth_cache_seconds: float = Field(default=5.0, ge=0)
    # A request's concurrency slot in Redis expires after this long even if its process died
    # holding it (longer than the longest request: a chat stream).
    concurrency_slot_seconds: float = Field(default=900.0, gt=0)
    # Workers expire pending uploads and files past their ``expires_after`` this often (seconds).
    storage_sweep_seconds: float = Field(default=60.0, gt=0)
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

    # Encrypts the organizations' integration keys (W&B) at rest: any passphrase. Empty: a random
    # key kept in ``home/secret.key`` (made on first use). Set it, the same everywhere, when the API
    # and the workers run on machines with different homes.
    secret_key: SecretStr = SecretStr("")
    # W&B runs of jobs with a ``wandb`` integration: the server (empty: wandb's default, or
    # WANDB_BASE_URL) and how long ``wandb.init`` may try before the job gets its warning event.
    wandb_base_url: str = ""
    wandb_init_timeout_seconds: float = 60.0

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
        """The blob store's folder in the embedded default (unused with an object store)."""
        return self.home / "blobs"

    @property
    def blob_store_url(self) -> str:
        """``storage_url``, or the local folder of the embedded default."""
        return self.storage_url or str(self.blobs_dir)

    @property
    def cache_dir(self) -> Path:
        """Local copies of store contents (training files, adapters); may be deleted any time."""
        return self.home / "cache"

    @property
    def adapters_dir(self) -> Path:
        """Where trainers on this machine write final adapters before they go to the store."""
        return self.home / "adapters"

    @property
    def runs_dir(self) -> Path:
        """Runs on this machine: spec, trainer log, local checkpoints (mirrored to the store)."""
        return self.home / "runs"

    @property
    def wandb_dir(self) -> Path:
        """W&B's local files of the runs of jobs with a ``wandb`` integration (``wandb/`` under it;
        offline runs stay there for ``wandb sync``)."""
        return self.home / "wandb"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def logs_dir(self) -> Path:
        """``loraforge serve``'s per-child log files (``api.log``, ``worker.log``, ``engine.log``)."""
        return self.home / "logs"

    @property
    def exports_dir(self) -> Path:
        """Local copies of model exports (merged weights), one folder per fine-tuning job."""
        return self.home / "exports"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
