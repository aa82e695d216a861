"""Webhooks: endpoints an organization registers, an outbox of events written in the same
transaction as the job state change, and signed delivery with retries (Standard Webhooks, as the
``openai`` SDK's ``webhooks.unwrap`` verifies them).

No Celery and no FastAPI here: ``queue/tasks.py`` wraps :func:`delivery.deliver` in a task and
``api/routes/webhook_endpoints.py`` wraps :mod:`endpoints`.
"""

from __future__ import annotations

# The events this service emits; OpenAI's other types (batch.*, response.*, ...) have no source here.
JOB_EVENT_TYPES = ("fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled")

__all__ = ["JOB_EVENT_TYPES"]
