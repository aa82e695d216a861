"""Celery tasks: thin, ids in, idempotent. The work is in ``loraforge.worker.training``."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import shared_task
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from sqlalchemy.orm import Session, sessionmaker

from loraforge.contracts.dispatch import (
    DELIVER_WEBHOOK_TASK,
    RUN_BATCH_TASK,
    TRAIN_JOB_TASK,
    VALIDATE_FILE_TASK,
    VALIDATE_JOB_TASK,
)
from loraforge.db.session import make_engine, make_sessionmaker
from loraforge.files.sweeper import StorageSweeper
from loraforge.jobs import file_checks, placement
from loraforge.ops.metrics import serve_worker_metrics, worker_metrics
from loraforge.ops.presence import PresenceBeat
from loraforge.queue.routing import BATCH_QUEUE, TRAIN_QUEUE_PREFIX, train_queue
from loraforge.settings import get_settings
from loraforge.webhooks import delivery
from loraforge.webhooks.sweeper import Sweeper
from loraforge.worker import batches, training
from loraforge.worker.batch_reaper import BatchReaper
from loraforge.worker.reaper import Reaper


@lru_cache
def _sessions() -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(get_settings()))


@shared_task(name=VALIDATE_JOB_TASK, acks_late=True)
def validate_job_task(job_id: str) -> None:
    """Check the job's files; if they pass, queue the training task."""
    if training.validate_job(get_settings(), _sessions(), job_id):
        queue_training(job_id)


def queue_training(job_id: str, wait_token: int | None = None, countdown: float | None = None) -> None:
    """Send the job's training task to the queue of the pool its memory plan chose.

    A job without a usable plan (none, a pool that is gone or changed) is planned again first;
    one that then fits no configured pool stays queued and nothing is sent (``jobs/placement.py``).
    ``wait_token`` and ``countdown``: the re-send of a job waiting for GPUs (``worker/admission.py``).
    """
    pool = placement.pool_of(get_settings(), _sessions(), job_id)
    if pool is not None:
        train_job_task.apply_async(args=[job_id, wait_token], queue=train_queue(pool), countdown=countdown)


@shared_task(name=VALIDATE_FILE_TASK, acks_late=True)
def validate_file_task(file_id: str) -> None:
    """Pre-flight an uploaded fine-tune file: ``uploaded`` -> ``processed`` | ``error``."""
    file_checks.validate_file_record(get_settings(), _sessions(), file_id)


@shared_task(name=TRAIN_JOB_TASK, acks_late=True)
def train_job_task(job_id: str, wait_token: int | None = None) -> None:
    """Run the trainer subprocess for a queued job and record the outcome.

    If its GPUs are busy, the task is sent again after ``gpu_wait_seconds`` (the job stays queued).
    """
    settings = get_settings()
    token = training.run_training(settings, _sessions(), job_id, wait_token, requeue=queue_training)
    if token is not None:
        queue_training(job_id, token, countdown=settings.gpu_wait_seconds)


@shared_task(name=DELIVER_WEBHOOK_TASK, acks_late=True)
def deliver_webhook_task(delivery_id: str) -> None:
    """One signed attempt of a webhook delivery; a failure schedules the next one in the database."""
    status = delivery.deliver(get_settings(), _sessions(), delivery_id)
    if status in ("pending", "failed"):  # this attempt failed ("failed": no retry is left)
        worker_metrics().webhook_failed(final=status == "failed")


@shared_task(name=RUN_BATCH_TASK, acks_late=True)
def run_batch_task(batch_id: str, token: int) -> None:
    """Run a stretch of a batch's requests, then send the task of the next stretch
    (``worker/batches.py``: a batch holds a worker thread only briefly at a time)."""
    following = batches.run_batch(get_settings(), _sessions(), batch_id, token)
    if following is not None:
        send_batch(batch_id, following.token, following.countdown)


def send_batch(batch_id: str, token: int, countdown: float = 0.0) -> None:
    """Send a batch's task to the low-priority ``batch`` queue."""
    run_batch_task.apply_async(args=[batch_id, token], queue=BATCH_QUEUE, countdown=countdown or None)


@worker_ready.connect
def _start_batch_reaper(**_: object) -> None:
    """Each worker process sends again the batches whose worker stopped (``worker/batch_reaper.py``)."""
    BatchReaper(get_settings(), _sessions(), send=send_batch).start()


@worker_ready.connect
def _start_webhook_sweeper(**_: object) -> None:
    """Each worker process hands due webhook deliveries to ``deliver_webhook_task`` (see
    ``loraforge.webhooks.sweeper`` for why a poller)."""
    Sweeper(get_settings(), _sessions(), send=deliver_webhook_task.delay).start()


@worker_ready.connect
def _start_storage_sweeper(**_: object) -> None:
    """Each worker process expires abandoned uploads and expired files (``loraforge.files.sweeper``)."""
    StorageSweeper(get_settings(), _sessions()).start()


@worker_ready.connect
def _start_reaper(**_: object) -> None:
    """Each worker process reconciles jobs once at start, then re-queues stale ones periodically
    (``loraforge.worker.reaper``: a SIGKILLed worker's tasks are never redelivered by Celery)."""
    Reaper(get_settings(), _sessions(), train=queue_training, validate=validate_job_task.delay).start()


@worker_shutting_down.connect
def _hand_jobs_back(**_: object) -> None:
    """SIGTERM (``serve`` stopping, a deploy): running trainers stop and their jobs are queued again
    at once, to resume from their checkpoints (``worker.training.begin_shutdown``)."""
    training.begin_shutdown()


@lru_cache
def _presence() -> PresenceBeat:
    return PresenceBeat(get_settings(), _sessions(), training.worker_id())


@worker_ready.connect
def _announce(sender: Any = None, **_: object) -> None:
    """Each worker process beats a presence row naming the pools it serves (``/readyz`` counts
    them, ``loraforge.ops.presence``) and, when ``worker_metrics_port`` is set, serves metrics."""
    # ``sender`` is the worker's consumer; ``consume_from`` holds the queues it was started with (-Q).
    consumed = list(sender.app.amqp.queues.consume_from or {}) if sender is not None else []
    prefix = f"{TRAIN_QUEUE_PREFIX}."
    _presence().start([name.removeprefix(prefix) for name in consumed if name.startswith(prefix)])
    serve_worker_metrics(get_settings(), worker_metrics())


@worker_shutdown.connect
def _withdraw(**_: object) -> None:
    """A clean stop removes the presence row at once (a killed worker's ages out)."""
    _presence().stop()
