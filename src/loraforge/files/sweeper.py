"""The storage sweeper: a small thread in each worker process that expires pending uploads past
their hour (their parts deleted) and files past their ``expires_after`` (rows and bytes).

Why in the worker and on a timer: an abandoned upload or an expired file must go whether or not
anyone touches it again, and the API may run several processes or none at all for a while. Both
passes are safe to run from several workers at once (conditional statements; a second sweeper
finds nothing left to do).
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.session import session_scope
from loraforge.files import uploads
from loraforge.files.service import sweep_expired_files
from loraforge.settings import Settings
from loraforge.storage import open_store
from loraforge.storage.blobs import BlobStore

log = logging.getLogger(__name__)


def sweep_storage(sessions: sessionmaker[Session], blobs: BlobStore) -> tuple[int, int]:
    """One pass: expire due uploads, then delete expired files.

    Returns:
        (uploads cleaned, files deleted).
    """
    with session_scope(sessions) as session:
        cleaned = uploads.sweep(session, blobs)
    with session_scope(sessions) as session:
        deleted = sweep_expired_files(session, blobs)
    return cleaned, deleted


class StorageSweeper:
    """Runs :func:`sweep_storage` every ``settings.storage_sweep_seconds`` on a daemon thread."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self._settings = settings
        self._sessions = sessions
        self._blobs = open_store(settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="storage-sweeper", daemon=True)

    def start(self) -> None:
        """Start sweeping in the background."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the current pass (waits up to ``timeout`` seconds)."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self._settings.storage_sweep_seconds):
            try:
                cleaned, deleted = sweep_storage(self._sessions, self._blobs)
                if cleaned or deleted:
                    log.info(
                        "storage sweep: %d uploads expired or cleaned, %d files expired", cleaned, deleted
                    )
            except Exception:  # a database hiccup must not kill the thread
                log.exception("storage sweep failed")
