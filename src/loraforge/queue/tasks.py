"""Celery tasks: thin, ids in, idempotent. The work is in ``loraforge.jobs.worker``."""

from __future__ import annotations

from functools import lru_cache

from celery import shared_task
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.session import make_engine, make_sessionmaker
from loraforge.jobs import worker
from loraforge.settings import get_settings


@lru_cache
def _sessions() -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(get_settings()))


@shared_task(name="loraforge.validate_job", acks_late=True)
def validate_job_task(job_id: str) -> None:
    """Check the job's files; if they pass, queue the training task."""
    if worker.validate_job(get_settings(), _sessions(), job_id):
        train_job_task.delay(job_id)


@shared_task(name="loraforge.train_job", acks_late=True)
def train_job_task(job_id: str) -> None:
    """Run the trainer subprocess for a queued job and record the outcome."""
    worker.run_training(get_settings(), _sessions(), job_id)
