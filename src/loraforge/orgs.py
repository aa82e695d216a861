"""Organizations and their API keys (stored as sha256 hashes, shown once)."""

from __future__ import annotations

import hashlib

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from loraforge.db.models import ApiKey, Organization
from loraforge.ids import new_id, now, random_token
from loraforge.plans import TIERS

# An organization created without a plan (``loraforge keys create --org X``) is the operator's own
# on a self-hosted install: no hosted-model limit. Plans with limits are chosen explicitly
# (``--tier trial|core|scale``; see ``loraforge.plans``).
DEFAULT_TIER = "enterprise"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_org(session: Session, name: str, tier: str | None = None) -> Organization:
    """The organization called ``name``; created with ``tier`` (default :data:`DEFAULT_TIER`) if new."""
    if tier is not None and tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}")
    org = session.execute(select(Organization).where(Organization.name == name)).scalar_one_or_none()
    if org is None:
        org = Organization(id=new_id("org-"), name=name, tier=tier or DEFAULT_TIER, created_at=now())
        session.add(org)
        session.flush()
    elif tier is not None:
        org.tier = tier
    return org


def create_api_key(session: Session, org: Organization) -> str:
    """Create a key bound to ``org`` and return it in clear (the only time it is visible)."""
    key = "sk-lf-" + random_token(40)
    session.add(
        ApiKey(id=new_id("key_"), org_id=org.id, key_hash=hash_key(key), prefix=key[:10], created_at=now())
    )
    session.flush()
    return key


def authenticate(session: Session, key: str) -> Organization | None:
    """The organization ``key`` belongs to, or None for an unknown or revoked key."""
    row = session.execute(
        select(Organization)
        .join(ApiKey, ApiKey.org_id == Organization.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked.is_(False))
    ).scalar_one_or_none()
    return row


def lock_org(session: Session, org_id: str) -> None:
    """Serialise the org's check-then-write sections (hosted-model and storage limits) until the
    session's transaction ends.

    One portable statement, a no-op UPDATE of the org's row: on PostgreSQL it takes the row's
    lock (a second transaction waits here, then its next statement sees what the first
    committed: READ COMMITTED takes a snapshot per statement); on SQLite it starts the write
    transaction, which holds the database's one write lock (another writer waits for it through
    the busy timeout). A plain count-then-insert lets two concurrent requests both pass.
    Call it before the counts it protects.
    """
    session.execute(
        update(Organization)
        .where(Organization.id == org_id)
        .values(tier=Organization.tier)
        .execution_options(synchronize_session=False)
    )
