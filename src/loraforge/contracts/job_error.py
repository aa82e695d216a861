"""Why a job failed: OpenAI's ``FineTuningJob.error``.

One shape for every cause (bad files, a base model gone from the catalog, no pool that fits, a
worker that cannot run the plan, the trainer's own error line), written by the one failure path
``jobs.state.fail`` and shown unchanged by the API. Neutral (pure pydantic) because more than the
job domain speaks it: the pre-flight's ``job_error`` and the trainer's error line carry the same
three fields, and the API shows it as ``FineTuningJob.error``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class JobError(BaseModel):
    """``{"code", "message", "param"}``, all three always present (``param`` may be null)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # A machine-readable reason, e.g. ``invalid_training_file``, ``model_not_found``.
    code: str
    # The sentence the user reads; the job's failure event says "The job failed: {message}".
    message: str
    # The request field at fault (``training_file``, ``model``, ``method.type``), None if none.
    param: str | None = None
