"""A batch's states, as OpenAI names them, and which of them are final."""

from __future__ import annotations

from enum import StrEnum


class BatchStatus(StrEnum):
    """validating -> in_progress -> finalizing -> completed; failed, expired; cancelling -> cancelled."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


FINAL = frozenset({BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})
# The states a worker still has work in (cancelling: writing the partial results).
UNFINISHED = tuple(s.value for s in BatchStatus if s not in FINAL)
# The one endpoint and completion window served.
CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
WINDOW_SECONDS = 24 * 3600
