"""Hosted fine-tuned models per plan: trial 1, core 10, scale 25, enterprise unlimited
(``loraforge.plans``; an operator may set another number per org).

What counts, one per job: a fine-tuned model until it is deleted; a job from creation (it will
produce a hosted model) until it fails or is cancelled; and a finished job without a fine-tuned
model whose checkpoint models (``…:ckpt-step-N``) are still served, until they are deleted.
Deleting a fine-tuned model deletes its checkpoint models too, and a cancelled job keeps none.

The check runs when a job is created and refuses with a 400 (``code: hosted_model_limit_reached``):
not a 429, which the openai SDK retries. It holds under concurrency: the org's row is locked
(:func:`loraforge.orgs.lock_org`) before counting, so of several simultaneous creations only
those that fit pass, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from loraforge.db.models import FineTunedModel, Job, JobCheckpoint, Organization
from loraforge.errors import InvalidRequestError
from loraforge.jobs.state import TERMINAL
from loraforge.orgs import lock_org
from loraforge.plans import limits_for, tier_limits

CODE = "hosted_model_limit_reached"


def hosted_model_limit(tier: str) -> int | None:
    """The plan's limit (None: unlimited); an unknown tier gets the trial limit."""
    return tier_limits(tier).max_hosted_models


def hosted_model_usage(session: Session, org: Organization) -> int:
    """Fine-tuned models the org hosts, its jobs still on their way to one, and its finished jobs
    whose checkpoint models are served without a fine-tuned model."""
    hosted = session.execute(
        select(func.count()).select_from(FineTunedModel).where(FineTunedModel.org_id == org.id)
    ).scalar_one()
    terminal = [s.value for s in TERMINAL]
    in_flight = session.execute(
        select(func.count()).select_from(Job).where(Job.org_id == org.id, Job.status.not_in(terminal))
    ).scalar_one()
    checkpoints_only = session.execute(
        select(func.count(func.distinct(JobCheckpoint.job_id)))
        .join(Job, Job.id == JobCheckpoint.job_id)
        .where(
            JobCheckpoint.org_id == org.id,
            Job.status.in_(terminal),
            ~select(FineTunedModel.id).where(FineTunedModel.job_id == JobCheckpoint.job_id).exists(),
        )
    ).scalar_one()
    return int(hosted) + int(in_flight) + int(checkpoints_only)


def check_hosted_model_limit(session: Session, org: Organization) -> None:
    """Refuse a new job that would take the org past its hosted-model limit.

    Locks the org's row for the rest of the caller's transaction: commit (or roll back) soon after.

    Raises:
        InvalidRequestError: 400 with ``code == "hosted_model_limit_reached"``.
    """
    limit = limits_for(org).max_hosted_models
    if limit is None:
        return
    lock_org(session, org.id)
    used = hosted_model_usage(session, org)
    if used >= limit:
        raise InvalidRequestError(
            f"Your organization's {org.tier} plan hosts at most {limit} fine-tuned model(s), and "
            f"{used} are hosted or being trained. Delete a fine-tuned model (DELETE /v1/models/{{id}}) "
            "or cancel a job to free a slot, or move to a larger plan.",
            code=CODE,
        )
