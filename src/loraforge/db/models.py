"""ORM models. Every table has an integer ``seq`` (insertion order, the pagination cursor) and a
public string ``id``. Every tenant-owned row carries ``org_id``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Organization(Base):
    __tablename__ = "organizations"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    tier: Mapped[str] = mapped_column(String(32), default="trial")
    created_at: Mapped[int] = mapped_column(Integer)
    # The operator's overrides of the plan's limits (``loraforge orgs set``; ``loraforge.plans``):
    # NULL means the plan's, -1 unlimited.
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_concurrent_requests: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_hosted_models: Mapped[int | None] = mapped_column(Integer, nullable=True)
    storage_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_pending_uploads: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ApiKey(Base):
    __tablename__ = "api_keys"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    # sha256 of the key; the key itself is shown once and never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(Integer)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class FileRecord(Base):
    __tablename__ = "files"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32), index=True)
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    status: Mapped[str] = mapped_column(String(16), default="uploaded")
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    storage_key: Mapped[str] = mapped_column(String(512))


class Job(Base):
    __tablename__ = "fine_tuning_jobs"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    model: Mapped[str] = mapped_column(String(256))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(32), index=True)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Requested values ("auto" allowed) until the trainer reports the resolved ones.
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(Integer)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    estimated_finish: Mapped[int | None] = mapped_column(Integer, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Lease: which worker runs it, and when it last said so.
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    heartbeat_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Continued fine-tuning: the fine-tuned model or checkpoint the job starts from (the `model`
    # the user sent); `model` is then that model's base.
    parent_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    # The fine_tuned_model name, chosen when the job first runs so checkpoints can be named
    # `{name}:ckpt-step-N` before the job succeeds.
    reserved_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    # Set by POST .../pause on a running job; the worker saves a checkpoint and marks it paused.
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    # When the job last entered `queued` (a reaper re-dispatches jobs whose message was lost).
    queued_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Pre-flight of the job's files against its base model: token counts and the run estimate
    # (``loraforge.preflight``), written when the job leaves ``validating_files``.
    preflight: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The memory plan chosen at creation (``loraforge.jobs.placement``): pool, strategy, GPUs,
    # token budget, checkpointing, estimated peak per component. None: created before plans.
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # OpenAI's ``integrations`` as sent (``[{"type": "wandb", "wandb": {...}}]``); None: none.
    integrations: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)


class OrgIntegration(Base):
    """An organization's credentials for an outside service (``type``: ``wandb``), set through
    ``/v1/organization/integrations/{type}`` or ``loraforge orgs wandb``. The key is stored
    encrypted (``loraforge.crypto``) and only its last characters are ever shown."""

    __tablename__ = "org_integrations"
    __table_args__ = (UniqueConstraint("org_id", "type", name="uq_org_integration_type"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    api_key_encrypted: Mapped[str] = mapped_column(Text)
    api_key_hint: Mapped[str] = mapped_column(String(16))
    # The W&B entity (team or user) runs go to when the job's integration names none.
    entity: Mapped[str | None] = mapped_column(String(128), nullable=True)
    updated_at: Mapped[int] = mapped_column(Integer)


class JobEvent(Base):
    __tablename__ = "fine_tuning_job_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"), index=True)
    created_at: Mapped[int] = mapped_column(Integer)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class FineTunedModel(Base):
    __tablename__ = "fine_tuned_models"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(512), unique=True, index=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    base_model: Mapped[str] = mapped_column(String(256))
    adapter_path: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[int] = mapped_column(Integer)


class IdempotencyKey(Base):
    """A create request made with an ``Idempotency-Key`` and the response it got (24 h replay)."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("org_id", "key", "method", "path", name="uq_idempotency_scope"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    key: Mapped[str] = mapped_column(String(255))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    # sha256 of the request's meaning (JSON canonicalised, multipart by field), not its bytes:
    # a retried multipart request has a new boundary.
    request_hash: Mapped[str] = mapped_column(String(64))
    # NULL while the first request is still running (a concurrent duplicate gets a 409).
    response_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response_body: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer, index=True)


class WebhookEndpoint(Base):
    """A URL an organization registered to receive signed event deliveries."""

    __tablename__ = "webhook_endpoints"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(256))
    url: Mapped[str] = mapped_column(String(2048))
    event_types: Mapped[list[Any]] = mapped_column(JSON)
    signing_secret: Mapped[str] = mapped_column(String(128))
    # After rotate_secret(keep_old_secret_active_for_24_hours=True) deliveries carry both signatures.
    previous_signing_secret: Mapped[str | None] = mapped_column(String(128), nullable=True)
    previous_secret_expires_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[int] = mapped_column(Integer)
    # Soft delete: the delivery history stays readable and pending deliveries see the endpoint is gone.
    deleted_at: Mapped[int | None] = mapped_column(Integer, nullable=True)


class WebhookDelivery(Base):
    """The outbox: one event for one endpoint, written in the transaction that caused the event.

    ``id`` is the ``webhook-id`` header, the same on every attempt; ``payload`` is the exact body.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    event_id: Mapped[str] = mapped_column(String(64), index=True)
    event_type: Mapped[str] = mapped_column(String(64))
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id"), index=True)
    payload: Mapped[str] = mapped_column(Text)
    # pending -> queued (task sent) -> delivering (attempt running) -> succeeded | pending | failed;
    # cancelled when the endpoint is deleted.
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    # While queued or delivering: when the claim lapses and the sweeper may dispatch it again.
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer)
    delivered_at: Mapped[int | None] = mapped_column(Integer, nullable=True)


class WebhookDeliveryAttempt(Base):
    """One HTTP attempt of a delivery: what the receiver answered, or why it could not."""

    __tablename__ = "webhook_delivery_attempts"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    duration_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The first bytes of the receiver's answer, for debugging a failing endpoint.
    response_excerpt: Mapped[str | None] = mapped_column(Text, nullable=True)


class JobCheckpoint(Base):
    """An epoch-end checkpoint of a job: a servable adapter directory, named
    ``{fine_tuned_model}:ckpt-step-{N}`` (OpenAI's ``fine_tuning.job.checkpoint``)."""

    __tablename__ = "fine_tuning_job_checkpoints"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(600), unique=True, index=True)
    base_model: Mapped[str] = mapped_column(String(256))
    adapter_path: Mapped[str] = mapped_column(String(1024))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(Integer)


class Upload(Base):
    """A multipart upload (``/v1/uploads``): parts arrive separately and become one File on complete."""

    __tablename__ = "uploads"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    mime_type: Mapped[str] = mapped_column(String(128))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(Integer)
    # The upload itself expires an hour after creation; ``file_expires_after`` is for the File.
    expires_at: Mapped[int] = mapped_column(Integer, index=True)
    file_expires_after: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # pending -> completed | cancelled | expired
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class UploadPart(Base):
    """One stored chunk of an upload (its bytes live in the blob store under ``storage_key``)."""

    __tablename__ = "upload_parts"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id"), index=True)
    created_at: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(512))


class WorkerHeartbeat(Base):
    """A live worker process and the train pools it serves (``loraforge.ops.presence``).

    Each worker process renews its row every ``heartbeat_seconds``; ``/readyz`` counts the fresh
    rows per pool. A row is removed when its worker stops cleanly, and ages out otherwise.
    """

    __tablename__ = "worker_heartbeats"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # ``host:pid``, the holder name of the job leases it takes.
    worker_id: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    hostname: Mapped[str] = mapped_column(String(255))
    # Names of the train pools whose queues it consumes.
    pools: Mapped[list[Any]] = mapped_column(JSON)
    started_at: Mapped[int] = mapped_column(Integer)
    beat_at: Mapped[int] = mapped_column(Integer, index=True)


class Batch(Base):
    """A batch of chat completions run asynchronously over an uploaded JSONL (``/v1/batches``).

    validating -> in_progress -> finalizing -> completed; or failed, expired, cancelling ->
    cancelled. The worker running it holds a lease (``worker_id``, ``heartbeat_at``) and each
    task it is sent carries ``dispatch_token``: a task whose token is no longer the row's (the
    reaper sent a newer one) stops, so one batch never runs twice at once.
    """

    __tablename__ = "batches"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(512))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    # OpenAI's ``errors.data`` (failed batches): ``[{code, message, param, line}]``.
    errors: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    output_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # ``output_expires_after[seconds]``: the output and error files expire that long after
    # they are written.
    output_expires_after: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer)
    in_progress_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expires_at: Mapped[int] = mapped_column(Integer)
    finalizing_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completed_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    failed_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expired_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cancelling_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cancelled_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    heartbeat_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    dispatch_token: Mapped[int] = mapped_column(Integer, default=1)


class BatchResult(Base):
    """The answer to one line of a running batch, written as soon as it is known (so a restarted
    worker never runs a finished line again); turned into the output and error files, then
    removed, when the batch ends."""

    __tablename__ = "batch_results"
    __table_args__ = (UniqueConstraint("batch_id", "line", name="uq_batch_results_line"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"), index=True)
    # 0-based index of the request among the file's non-blank lines.
    line: Mapped[int] = mapped_column(Integer)
    # The whole output line (``{id, custom_id, response, error}``) as JSON text.
    record: Mapped[str] = mapped_column(Text)
    # Whether it goes to the output file (a 2xx answer) or the error file.
    ok: Mapped[bool] = mapped_column(Boolean)
