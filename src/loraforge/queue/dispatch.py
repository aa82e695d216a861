"""How the API hands work to the workers: by task name, so the API imports no task code."""

from __future__ import annotations

from celery import Celery

from loraforge.queue.celery_app import create_celery
from loraforge.settings import Settings


class CeleryDispatcher:
    def __init__(self, settings: Settings) -> None:
        self._app: Celery = create_celery(settings)

    def validate_job(self, job_id: str) -> None:
        self._app.send_task("loraforge.validate_job", args=[job_id])
