"""How the API hands work to the workers: the dispatcher protocol and the Celery task names.

The domain services (``jobs/``, ``files/``, ``batches/``) take a :class:`Dispatcher` and call it only after
their transaction committed, so a worker always finds the row it is sent. The production one
(``queue/dispatch.py``) sends these task names through Celery; the API imports the protocol, not
Celery, and tests pass a recording fake.
"""

from __future__ import annotations

from typing import Protocol

# The task names the broker carries: ``queue/tasks.py`` registers them, ``queue/dispatch.py`` sends
# them. Renaming one strands the messages already queued under the old name.
VALIDATE_JOB_TASK = "loraforge.validate_job"
VALIDATE_FILE_TASK = "loraforge.validate_file"
TRAIN_JOB_TASK = "loraforge.train_job"
DELIVER_WEBHOOK_TASK = "loraforge.deliver_webhook"
RUN_BATCH_TASK = "loraforge.run_batch"


class Dispatcher(Protocol):
    """Hands work to the workers (Celery in production), by id."""

    def validate_job(self, job_id: str) -> None:
        """Queue the pre-flight of a ``validating_files`` job (:data:`VALIDATE_JOB_TASK`)."""
        ...

    def train_job(self, job_id: str, pool: str) -> None:
        """Queue a queued job's training on its pool's queue (:data:`TRAIN_JOB_TASK`)."""
        ...

    def validate_file(self, file_id: str) -> None:
        """Queue the check of an ``uploaded`` fine-tune file (:data:`VALIDATE_FILE_TASK`)."""
        ...

    def run_batch(self, batch_id: str, token: int) -> None:
        """Queue a batch's next stretch of requests on the low-priority ``batch`` queue
        (:data:`RUN_BATCH_TASK`); ``token`` is the batch's ``dispatch_token`` it was sent with."""
        ...
