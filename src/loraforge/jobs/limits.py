"""Hosted fine-tuned models per plan: trial 1, core 10, scale 25, enterprise unlimited.

A job counts against the limit from creation (it will produce a hosted model) until it fails or
is cancelled; a fine-tuned model counts until it is deleted. The check runs when a job is created
and refuses with a 400 (``code: hosted_model_limit_reached``): not a 429, which the openai SDK
retries. Two jobs created at the very same moment can both pass (no lock across the count).
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from loraforge.db.models import FineTunedModel, Job, Organization
from loraforge.errors import InvalidRequestError
from loraforge.jobs.state import TERMINAL

# None: unlimited.
HOSTED_MODEL_LIMITS: dict[str, int | None] = {"trial": 1, "core": 10, "scale": 25, "enterprise": None}
CODE = "hosted_model_limit_reached"


def hosted_model_limit(tier: str) -> int | None:
    """The plan's limit (None: unlimited); an unknown tier gets the trial limit."""
    return HOSTED_MODEL_LIMITS.get(tier, HOSTED_MODEL_LIMITS["trial"])


def hosted_model_usage(session: Session, org: Organization) -> int:
    """Fine-tuned models the org hosts plus its jobs still on their way to one."""
    hosted = session.execute(
        select(func.count()).select_from(FineTunedModel).where(FineTunedModel.org_id == org.id)
    ).scalar_one()
    in_flight = session.execute(
        select(func.count())
        .select_from(Job)
        .where(Job.org_id == org.id, Job.status.not_in([s.value for s in TERMINAL]))
    ).scalar_one()
    return int(hosted) + int(in_flight)


def check_hosted_model_limit(session: Session, org: Organization) -> None:
    """Refuse a new job that would take the org past its plan's hosted-model limit.

    Raises:
        InvalidRequestError: 400 with ``code == "hosted_model_limit_reached"``.
    """
    limit = hosted_model_limit(org.tier)
    if limit is None:
        return
    used = hosted_model_usage(session, org)
    if used >= limit:
        raise InvalidRequestError(
            f"Your organization's {org.tier} plan hosts at most {limit} fine-tuned model(s), and "
            f"{used} are hosted or being trained. Delete a fine-tuned model (DELETE /v1/models/{{id}}) "
            "or cancel a job to free a slot, or move to a larger plan.",
            code=CODE,
        )
