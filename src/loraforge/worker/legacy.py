"""Adapters from before the object store: rows that hold a host path instead of a store key.

Such a row (a fine-tuned model or a checkpoint) names a directory on the machine that trained it.
A worker on that machine uploads the directory into the store, sealed, at its start, and points
the row at the key; engines, which accept only store keys, can then load it. On the embedded
default the store is a folder on the same disk and the files are hard-linked, not copied. A row
whose directory is not on this machine is left for the worker of the machine that has it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loraforge.adapters.format import InvalidAdapterError, validate_adapter_dir
from loraforge.db.models import FineTunedModel, JobCheckpoint
from loraforge.db.session import session_scope
from loraforge.settings import Settings
from loraforge.storage import adapter_key, checkpoint_key, is_legacy_path, open_store
from loraforge.storage.sealed import put_dir

log = logging.getLogger(__name__)


def _upload(settings: Settings, path: Path, key: str) -> bool:
    try:
        validate_adapter_dir(path)
    except InvalidAdapterError:
        return False
    put_dir(open_store(settings), path, key)
    return True


def adopt_legacy_adapters(settings: Settings, sessions: sessionmaker[Session]) -> list[str]:
    """Upload the adapters of rows that still hold a path on this machine; point them at keys.

    Idempotent: rows already holding a key are not read.

    Args:
        settings: this worker's settings (the store).
        sessions: the database.

    Returns:
        The names of the models (fine-tuned and checkpoint) whose rows now hold a key.
    """
    adopted: list[str] = []
    with session_scope(sessions) as session:
        models = session.execute(
            select(FineTunedModel).where(FineTunedModel.adapter_path.like("/%"))
        ).scalars()
        for model in models:
            path = Path(model.adapter_path)
            if is_legacy_path(model.adapter_path) and path.is_dir():
                key = adapter_key(model.job_id)
                if _upload(settings, path, key):
                    model.adapter_path = key
                    adopted.append(model.id)
        checkpoints = session.execute(
            select(JobCheckpoint).where(JobCheckpoint.adapter_path.like("/%"))
        ).scalars()
        for row in checkpoints:
            path = Path(row.adapter_path)
            if is_legacy_path(row.adapter_path) and path.is_dir():
                key = checkpoint_key(row.job_id, path.name)
                if _upload(settings, path, key):
                    row.adapter_path = key
                    adopted.append(row.fine_tuned_model_checkpoint)
    if adopted:
        log.info("moved %d adapter(s) from this disk into the blob store: %s", len(adopted), adopted)
    return adopted


__all__ = ["adopt_legacy_adapters"]
