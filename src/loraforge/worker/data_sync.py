"""A job's tokenized training data between this worker's disk and the object store.

The trainer caches the prepared (tokenized, memory-mapped Arrow) data under the run's
``data`` directory, one folder per cache key (``trainer/dataset.py``), so a run resumed on the same
host does not tokenize again. A run resumed on another host (its first host died, or another
worker took the re-queued job) has an empty disk: :func:`upload_prepared` puts every complete
prepared folder in the store (``data/<job>/<key>``, sealed) once the run has a checkpoint worth
resuming from, and :func:`restore_prepared` brings them back before the trainer starts there.
:func:`drop_prepared` removes them when the job ends, like the local copy.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from loraforge.contracts.train_spec import DATA_PREPARED
from loraforge.db.session import session_scope
from loraforge.jobs.state import add_event
from loraforge.settings import Settings
from loraforge.storage import data_prefix, local_cache, open_store
from loraforge.storage.sealed import is_sealed, put_dir, sealed_children
from loraforge.worker import artefacts

log = logging.getLogger(__name__)


def _prepared_here(settings: Settings, job_id: str) -> list[Path]:
    root = artefacts.data_dir(settings, job_id)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / DATA_PREPARED).is_file())


def upload_prepared(settings: Settings, job_id: str) -> list[str]:
    """Seal every complete prepared-data folder of the job into the store (skipping those already
    there: the data of a key never changes).

    Returns:
        The store keys written.
    """
    store = open_store(settings)
    written = []
    for folder in _prepared_here(settings, job_id):
        key = f"{data_prefix(job_id)}/{folder.name}"
        if is_sealed(store, key):
            continue
        started = time.monotonic()
        put_dir(store, folder, key)
        written.append(key)
        log.info("job %s: stored its prepared data %s in %.1fs", job_id, key, time.monotonic() - started)
    return written


def restore_prepared(settings: Settings, sessions: sessionmaker[Session], job_id: str) -> int:
    """Fetch the job's prepared data from the store into the run's ``data`` directory, for each
    key this disk does not have yet.

    Returns:
        The bytes fetched (0: nothing was missing here, or nothing is stored).

    Raises:
        StorageIntegrityError: a download does not match the store's checksums.
    """
    store = open_store(settings)
    root = artefacts.data_dir(settings, job_id)
    fetched, started = 0, time.monotonic()
    for name in sealed_children(store, data_prefix(job_id)):
        if (root / name / DATA_PREPARED).is_file():
            continue
        fetched += local_cache(settings).copy_directory(f"{data_prefix(job_id)}/{name}", root / name)
    if fetched:
        seconds = time.monotonic() - started
        with session_scope(sessions) as session:
            add_event(
                session,
                job_id,
                f"Fetched the prepared training data from the object store ({fetched / 1e6:.1f} MB in "
                f"{seconds:.1f} s)",
                data={"bytes": fetched, "seconds": seconds},
            )
    return fetched


def drop_prepared(settings: Settings, job_id: str) -> None:
    """Remove the job's prepared data from the store (the job ended: nothing resumes it)."""
    open_store(settings).delete_prefix(data_prefix(job_id))
