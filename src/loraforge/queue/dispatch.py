"""How the API hands work to the workers: by task name, so the API imports no task code."""

from __future__ import annotations

from celery import Celery

from loraforge.contracts.dispatch import (
    RUN_BATCH_TASK,
    TRAIN_JOB_TASK,
    VALIDATE_FILE_TASK,
    VALIDATE_JOB_TASK,
)
from loraforge.queue.celery_app import create_celery
from loraforge.queue.routing import BATCH_QUEUE, train_queue
from loraforge.settings import Settings


class CeleryDispatcher:
    """The :class:`~loraforge.contracts.dispatch.Dispatcher` of a real deployment."""

    def __init__(self, settings: Settings) -> None:
        self._app: Celery = create_celery(settings)

    def validate_job(self, job_id: str) -> None:
        self._app.send_task(VALIDATE_JOB_TASK, args=[job_id])

    def validate_file(self, file_id: str) -> None:
        """Queue the pre-flight validation of an uploaded fine-tune file."""
        self._app.send_task(VALIDATE_FILE_TASK, args=[file_id])

    def train_job(self, job_id: str, pool: str) -> None:
        """Queue the training task of a queued job for its pool's workers."""
        self._app.send_task(TRAIN_JOB_TASK, args=[job_id], queue=train_queue(pool))

    def run_batch(self, batch_id: str, token: int) -> None:
        """Queue a batch's next stretch of requests on the low-priority ``batch`` queue."""
        self._app.send_task(RUN_BATCH_TASK, args=[batch_id, token], queue=BATCH_QUEUE)
