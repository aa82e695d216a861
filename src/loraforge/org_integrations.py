"""An organization's integration credentials (today: its Weights & Biases API key).

Set through ``POST /v1/organization/integrations/wandb`` or ``loraforge orgs wandb``; stored
encrypted (:mod:`loraforge.crypto`); shown only as a hint (the last four characters); decrypted
only by the worker that opens a W&B run for one of the org's jobs. Never in a job, an event or a
log line.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from loraforge import crypto
from loraforge.db.models import OrgIntegration
from loraforge.ids import now
from loraforge.settings import Settings

WANDB = "wandb"


@dataclass(frozen=True)
class WandbCredentials:
    """What a worker needs to open a W&B run for the org."""

    api_key: str
    entity: str | None


def get_integration(session: Session, org_id: str, kind: str = WANDB) -> OrgIntegration | None:
    """The org's stored integration of type ``kind`` (None: not set)."""
    return session.execute(
        select(OrgIntegration).where(OrgIntegration.org_id == org_id, OrgIntegration.type == kind)
    ).scalar_one_or_none()


def set_wandb(
    session: Session, settings: Settings, org_id: str, api_key: str, entity: str | None = None
) -> OrgIntegration:
    """Store (or replace) the org's W&B key, encrypted, and its default entity."""
    row = get_integration(session, org_id)
    if row is None:
        row = OrgIntegration(org_id=org_id, type=WANDB)
        session.add(row)
    row.api_key_encrypted = crypto.encrypt(settings, api_key)
    row.api_key_hint = crypto.hint(api_key)
    row.entity = entity
    row.updated_at = now()
    session.flush()
    return row


def delete_wandb(session: Session, org_id: str) -> bool:
    """Forget the org's W&B key; True if there was one."""
    done = session.execute(
        delete(OrgIntegration).where(OrgIntegration.org_id == org_id, OrgIntegration.type == WANDB)
    )
    return bool(getattr(done, "rowcount", 0))


def wandb_credentials(session: Session, settings: Settings, org_id: str) -> WandbCredentials | None:
    """The org's W&B key in clear, for the worker (None: not set).

    Raises:
        crypto.SecretUnreadableError: the key cannot be decrypted here (another secret key).
    """
    row = get_integration(session, org_id)
    if row is None:
        return None
    return WandbCredentials(api_key=crypto.decrypt(settings, row.api_key_encrypted), entity=row.entity)
