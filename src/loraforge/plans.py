"""The plans' limits, and an organization's own when the operator set them.

The table is the reference product's published plan table (requests per minute, concurrent
requests, hosted fine-tuned models) plus what a self-hosted multi-tenant install also has to bound:
stored bytes (files + pending uploads; OpenAI caps an organization's files at a size too) and the
number of pending multipart uploads. An organization row may override any of them
(``loraforge orgs set``): NULL there means "the plan's", :data:`UNLIMITED` (-1) means no limit,
and 0 is a real limit of zero (``--rpm 0`` suspends an org's API access).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from loraforge.db.models import Organization

GiB = 1024**3
# Stored in an organization's override columns for "no limit"; None (NULL) means the plan's.
UNLIMITED = -1


@dataclass(frozen=True)
class Limits:
    """One organization's limits; None means unlimited."""

    requests_per_minute: int | None
    max_concurrent_requests: int | None
    max_hosted_models: int | None
    storage_bytes: int | None
    max_pending_uploads: int | None


TIER_LIMITS: dict[str, Limits] = {
    "trial": Limits(30, 20, 1, 10 * GiB, 10),
    "core": Limits(600, 100, 10, 100 * GiB, 100),
    "scale": Limits(1200, 100, 25, 500 * GiB, 100),
    "enterprise": Limits(None, 100, None, None, 1000),
}
TIERS = tuple(TIER_LIMITS)
# The names of the limits, as the organization's override columns and the CLI's options call them.
LIMIT_NAMES = tuple(f.name for f in fields(Limits))


def tier_limits(tier: str) -> Limits:
    """The plan's limits; an unknown tier gets the trial plan's (the smallest)."""
    return TIER_LIMITS.get(tier, TIER_LIMITS["trial"])


def limits_for(org: Organization) -> Limits:
    """``org``'s limits: its plan's, with the overrides the operator set on the org."""
    plan = tier_limits(org.tier)
    values: dict[str, int | None] = {}
    for name in LIMIT_NAMES:
        override = getattr(org, name)
        if override is None:
            values[name] = getattr(plan, name)
        else:
            values[name] = None if override < 0 else int(override)
    return Limits(**values)


# Requests one batch (``/v1/batches``) may hold, per plan; None: no limit.
BATCH_REQUEST_LIMITS: dict[str, int | None] = {
    "trial": 1_000,
    "core": 100_000,
    "scale": 500_000,
    "enterprise": None,
}


def batch_request_limit(org: Organization) -> int | None:
    """The most requests one of ``org``'s batches may hold (its plan's; an unknown tier gets
    the trial plan's)."""
    return BATCH_REQUEST_LIMITS.get(org.tier, BATCH_REQUEST_LIMITS["trial"])


def describe(value: int | None) -> str:
    """``unlimited`` or the number, for messages and the CLI."""
    return "unlimited" if value is None else str(value)
