"""Where a job's files live on a worker, and how a cancelled job's are removed.

``{runs_dir}/{job_id}/``: ``spec.json``, ``trainer.log``, ``pause`` (the pause request),
``checkpoints/step-NNNNNNN/`` (servable adapter + training state) and ``data/`` (the tokenized
training data, memory-mapped Arrow, reused by a resumed run; removed once the job is over); the
final adapter is written
to ``{adapters_dir}/{job_id}``. These are this machine's working copies: every checkpoint and the
adapter are uploaded to the blob store (``worker/store_sync.py``), which is what another machine
resumes from and what engines load.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.models import Job
from loraforge.db.session import session_scope
from loraforge.engines import fleet_for
from loraforge.jobs import checkpoints
from loraforge.jobs.naming import checkpoint_model_name
from loraforge.settings import Settings
from loraforge.storage import adapter_key, checkpoints_prefix, data_prefix, open_store
from loraforge.storage.sealed import delete_dir

CHECKPOINTS = "checkpoints"
DATA = "data"
PAUSE_FILE = "pause"
# Files of a checkpoint directory (``trainer/checkpointer.py`` writes them).
TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_INFO = "checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def run_dir(settings: Settings, job_id: str) -> Path:
    """The job's working directory on this worker."""
    return settings.runs_dir / job_id


def checkpoint_dir(settings: Settings, job_id: str) -> Path:
    """Where the trainer writes the job's checkpoints."""
    return run_dir(settings, job_id) / CHECKPOINTS


def data_dir(settings: Settings, job_id: str) -> Path:
    """Where the trainer caches the job's tokenized data (what a resumed run reuses)."""
    return run_dir(settings, job_id) / DATA


def strip_training_state(settings: Settings, job_id: str) -> None:
    """Drop what only a resume needs from a finished job: the optimizer/RNG state of its
    checkpoints (the adapters stay servable) and its tokenized data."""
    for state in checkpoint_dir(settings, job_id).glob(f"step-*/{TRAINER_STATE}"):
        state.unlink(missing_ok=True)
    shutil.rmtree(data_dir(settings, job_id), ignore_errors=True)


def remove_job_artefacts(settings: Settings, sessions: sessionmaker[Session], job_id: str) -> None:
    """Remove a cancelled job's checkpoints (rows, directories, stored copies, engine copies) and
    its adapter, here and in the blob store.

    Args:
        settings: where the files are.
        sessions: the database.
        job_id: the job.
    """
    with session_scope(sessions) as session:
        rows = checkpoints.delete_all(session, job_id)
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one_or_none()
        base, reserved = (job.model, job.reserved_model) if job is not None else (None, None)
    folder = checkpoint_dir(settings, job_id)
    names = [row.fine_tuned_model_checkpoint for row in rows]
    if reserved and folder.is_dir():
        for path in folder.iterdir():
            if match := _STEP_DIR.match(path.name):
                names.append(checkpoint_model_name(reserved, int(match.group(1))))
    store = open_store(settings)
    delete_dir(store, adapter_key(job_id))  # the seal first: no reader trusts a half-deleted one
    store.delete_prefix(checkpoints_prefix(job_id))
    store.delete_prefix(data_prefix(job_id))
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(data_dir(settings, job_id), ignore_errors=True)
    shutil.rmtree(settings.adapters_dir / job_id, ignore_errors=True)
    (run_dir(settings, job_id) / PAUSE_FILE).unlink(missing_ok=True)
    if base and names:
        fleet_for(settings).unload(base, sorted(set(names)))
