"""A run's durable files between this worker's disk and the blob store.

The trainer stays pure: it reads local files and writes checkpoints and its adapter to local
directories (``worker/artefacts.py``). This module is the worker's side of the object store:

* before the trainer starts, :func:`restore_checkpoint` puts the job's newest complete checkpoint
  from the store into the (possibly empty) local checkpoint directory, so a job resumes on any
  host, also one whose disk has never seen it;
* while it runs, :class:`CheckpointMirror` uploads every checkpoint the trainer reports, in order,
  in a background thread (the supervise loop keeps renewing the lease meanwhile), removes the
  ones the trainer pruned, and only then records an epoch checkpoint as a model: a checkpoint the
  API lists is in the store;
* at the end, :func:`publish_adapter` uploads the final adapter, and :func:`strip_training_state`
  drops the optimizer/RNG state of a finished job's checkpoints and its prepared data in the store.

The run's prepared (tokenized) data goes to the store before its first checkpoint and comes back
with it (``worker/data_sync.py``).

Uploads are sealed (:mod:`loraforge.storage.sealed`): a host that dies mid-upload leaves nothing
a reader would trust.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from queue import Queue

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loraforge.contracts.trainer_events import CheckpointEvent
from loraforge.db.models import Job
from loraforge.db.session import session_scope
from loraforge.engines import fleet_for
from loraforge.jobs import checkpoints
from loraforge.jobs.state import JobStatus, add_event, transition
from loraforge.settings import Settings
from loraforge.storage import (
    adapter_key,
    checkpoint_key,
    checkpoints_prefix,
    is_legacy_path,
    local_cache,
    open_store,
)
from loraforge.storage.blobs import BlobStore
from loraforge.storage.sealed import delete_dir, drop_file, put_dir, read_seal, sealed_children
from loraforge.worker import artefacts, data_sync

log = logging.getLogger(__name__)

_STEP = re.compile(r"^step-(\d+)$")


def _step(name: str) -> int | None:
    match = _STEP.match(name)
    return int(match.group(1)) if match else None


def _resumable(store: BlobStore, key: str) -> bool:
    seal = read_seal(store, key)
    return seal is not None and {artefacts.TRAINER_STATE, artefacts.CHECKPOINT_INFO} <= set(seal.files)


def _local_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints on this disk (what the trainer would resume from)."""
    if not folder.is_dir():
        return []
    return [
        step
        for path in folder.iterdir()
        if (step := _step(path.name)) is not None
        and (path / artefacts.TRAINER_STATE).is_file()
        and (path / artefacts.CHECKPOINT_INFO).is_file()
    ]


def restore_checkpoint(settings: Settings, sessions: sessionmaker[Session], job_id: str) -> int | None:
    """Put the job's newest resumable checkpoint from the store into the local checkpoint directory.

    Nothing is fetched when this disk already has one at least as new (the same host resuming).
    The trainer then resumes from the newest local one, as always.

    Args:
        settings: this worker's settings.
        sessions: the database (an event records what was fetched and how long it took).
        job_id: the job about to run.

    Returns:
        The step fetched, or None when nothing was.

    Raises:
        StorageIntegrityError: the download does not match the store's checksums.
    """
    store = open_store(settings)
    prefix = checkpoints_prefix(job_id)
    names = [name for name in sealed_children(store, prefix) if _step(name) is not None]
    resumable = [name for name in names if _resumable(store, f"{prefix}/{name}")]
    if not resumable:
        return None
    newest = max(resumable, key=lambda name: _step(name) or 0)
    step = _step(newest) or 0
    local_root = artefacts.checkpoint_dir(settings, job_id)
    if any(local >= step for local in _local_steps(local_root)):
        return None
    started = time.monotonic()
    size = local_cache(settings).copy_directory(f"{prefix}/{newest}", local_root / newest)
    seconds = time.monotonic() - started
    with session_scope(sessions) as session:
        add_event(
            session,
            job_id,
            f"Fetched the checkpoint at step {step} from the object store ({size / 1e6:.1f} MB in "
            f"{seconds:.1f} s)",
            data={"step": step, "checkpoint": f"{prefix}/{newest}", "bytes": size, "seconds": seconds},
        )
    log.info("job %s: fetched checkpoint %s from the store in %.2fs", job_id, newest, seconds)
    return step


def store_unreachable(exc: BaseException) -> bool:
    """An object store that does not answer (not a missing file): the job should wait, not fail."""
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError | PermissionError)


def give_back(sessions: sessionmaker[Session], job_id: str, wid: str, exc: BaseException) -> None:
    """Give the job back (``running`` -> ``queued``): its task is sent again by the reaper after
    ``requeue_after_seconds``, when the object store may answer again."""
    log.error("job %s: the object store failed while starting the run: %r", job_id, exc, exc_info=exc)
    with session_scope(sessions) as session:
        transition(
            session,
            job_id,
            JobStatus.QUEUED,
            f"Could not read the job's files or checkpoint from the object store ({type(exc).__name__}); "
            "the job stays queued and is retried.",
            level="warn",
            expect={"worker_id": wid},
        )


def publish_adapter(settings: Settings, job_id: str, local_dir: Path, attempts: int = 4) -> str:
    """Upload a finished adapter directory; return its key (what the registry stores).

    A store that fails is tried again (2, 4, 8 s apart) before the error is raised: hours of
    training must not be lost to a blip of the object store.
    """
    key = adapter_key(job_id)
    for attempt in range(attempts):
        try:
            put_dir(open_store(settings), local_dir, key)
            return key
        except OSError as exc:
            if attempt == attempts - 1 or isinstance(exc, FileNotFoundError):
                raise
            log.warning("job %s: uploading the adapter failed (%s); trying again", job_id, exc)
            time.sleep(2 ** (attempt + 1))
    return key


def strip_training_state(settings: Settings, job_id: str) -> None:
    """Drop the optimizer/RNG state of a finished job's checkpoints, here and in the store; the
    adapters stay servable."""
    artefacts.strip_training_state(settings, job_id)
    data_sync.drop_prepared(settings, job_id)
    store = open_store(settings)
    prefix = checkpoints_prefix(job_id)
    for name in sealed_children(store, prefix):
        drop_file(store, f"{prefix}/{name}", artefacts.TRAINER_STATE)


def stored_adapter_present(settings: Settings, ref: str) -> bool:
    """Whether the adapter ``ref`` (a store key, or a legacy host path) is still there."""
    if is_legacy_path(ref):
        return Path(ref).is_dir()
    return read_seal(open_store(settings), ref) is not None


class CheckpointMirror:
    """Uploads a run's checkpoints to the store in a background thread, in the order written.

    Args:
        settings: this worker's settings.
        sessions: the database (epoch checkpoints are recorded once uploaded).
        job_id: the job.
        keep: epoch checkpoints kept in the store (the spec's ``keep_checkpoints``).
    """

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], job_id: str, keep: int = 3
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.job_id = job_id
        self.keep = keep
        self._kinds: dict[str, str] = {}
        self._queue: Queue[CheckpointEvent | None] = Queue()
        self._thread: threading.Thread | None = None
        self._aborted = threading.Event()
        self.uploaded: list[int] = []
        self._data_stored = False

    def submit(self, event: CheckpointEvent) -> None:
        """Queue ``event``'s checkpoint for upload (the thread starts with the first one)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"mirror-{self.job_id}", daemon=True)
            self._thread.start()
        self._queue.put(event)

    def drain(self, keep_alive: Callable[[], bool], poll: float) -> bool:
        """Wait until every queued checkpoint is uploaded, calling ``keep_alive`` every ``poll`` s.

        Args:
            keep_alive: renews the job's lease; returns False when the job is no longer this
                worker's (then the rest is dropped and this returns at once).
            poll: seconds between calls.

        Returns:
            True when everything was uploaded; False when the job was lost meanwhile.
        """
        if self._thread is None:
            return True
        self._queue.put(None)
        while self._thread.is_alive():
            self._thread.join(poll)
            if self._thread.is_alive() and not keep_alive():
                self.abort()
                return False
        self._thread = None
        return True

    def abort(self) -> None:
        """Drop what is queued and wait for the upload in progress (the job left this worker)."""
        self._aborted.set()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while (event := self._queue.get()) is not None:
            if self._aborted.is_set():
                continue
            try:
                self._mirror(event)
            except Exception:  # noqa: BLE001 - the next checkpoint is uploaded all the same
                log.exception("job %s: uploading checkpoint step %s failed", self.job_id, event.step)

    def _mirror(self, event: CheckpointEvent) -> None:
        store = open_store(self.settings)
        local = Path(event.path)
        key = checkpoint_key(self.job_id, local.name)
        self._store_data()
        for removed in event.removed:
            delete_dir(store, checkpoint_key(self.job_id, Path(removed).name))
        try:
            put_dir(store, local, key)
        except FileNotFoundError:
            # Pruned by the trainer before it could be uploaded (a newer one has come since).
            delete_dir(store, key)
            log.info("job %s: checkpoint %s was pruned before its upload", self.job_id, local.name)
            return
        self.uploaded.append(event.step)
        self._kinds[local.name] = event.kind
        self._prune(store, event.step)
        if event.kind == "epoch":
            self._record(event, key)

    def _store_data(self) -> None:
        """Before the run's first checkpoint is stored, its prepared data: a host resuming from
        that checkpoint then reuses the tokenized data instead of preparing it again."""
        if self._data_stored:
            return
        try:
            data_sync.upload_prepared(self.settings, self.job_id)
            self._data_stored = True
        except Exception:  # noqa: BLE001 - tried again with the next checkpoint; a resume re-tokenizes
            log.exception("job %s: storing its prepared data failed", self.job_id)

    def _kind(self, store: BlobStore, name: str) -> str:
        """``epoch`` or ``pause``: as this run uploaded it, else from its stored ``checkpoint.json``."""
        if name not in self._kinds:
            try:
                raw = json.loads(
                    store.read_bytes(f"{checkpoints_prefix(self.job_id)}/{name}/{artefacts.CHECKPOINT_INFO}")
                )
                self._kinds[name] = str(raw.get("kind", "epoch"))
            except (OSError, ValueError):
                self._kinds[name] = "epoch"
        return self._kinds[name]

    def _prune(self, store: BlobStore, newest: int) -> None:
        """The store keeps what the trainer keeps: the newest ``keep`` epoch checkpoints, and no
        pause checkpoint older than the newest. Applied to the store itself, not only to what the
        trainer reports removed: a trainer killed mid-prune, or a run on another host, leaves
        stored checkpoints no local prune will ever name."""
        prefix = checkpoints_prefix(self.job_id)
        stored = sorted(
            (step, name) for name in sealed_children(store, prefix) if (step := _step(name)) is not None
        )
        epochs = [name for _, name in stored if self._kind(store, name) == "epoch"]
        doomed = epochs[: -self.keep] if len(epochs) > self.keep else []
        doomed += [name for step, name in stored if step < newest and self._kind(store, name) == "pause"]
        for name in doomed:
            delete_dir(store, f"{prefix}/{name}")
        self._sweep_partial(store, newest)

    def _sweep_partial(self, store: BlobStore, step: int) -> None:
        """Remove older uploads that were never sealed (a host died mid-upload)."""
        prefix = checkpoints_prefix(self.job_id)
        for name in store.names(prefix):
            older = _step(name)
            if older is not None and older < step and read_seal(store, f"{prefix}/{name}") is None:
                store.delete_prefix(f"{prefix}/{name}")

    def _record(self, event: CheckpointEvent, key: str) -> None:
        """The epoch checkpoint becomes a model (``…:ckpt-step-N``); pruned ones stop being one."""
        with session_scope(self.sessions) as session:
            job = session.execute(select(Job).where(Job.id == self.job_id)).scalar_one()
            if job.status != JobStatus.RUNNING.value:
                return  # cancelled meanwhile: the worker removes what is stored
            row = checkpoints.record(session, job, event.step, key, event.openai_metrics())
            gone = checkpoints.forget_missing(
                session, self.job_id, lambda ref: stored_adapter_present(self.settings, ref)
            )
            add_event(
                session,
                self.job_id,
                f"Checkpoint created at step {event.step}: {row.fine_tuned_model_checkpoint}",
                data={"step": event.step, "checkpoint": row.id},
            )
            base = job.model
        names = [row.fine_tuned_model_checkpoint for row in gone]
        if names:
            # Off this thread: an unreachable engine must not hold up the next upload.
            threading.Thread(target=fleet_for(self.settings).unload, args=(base, names), daemon=True).start()
