"""What a worker does with a job: validate its files, then run the trainer as a subprocess
and turn its JSON lines into job state, events and a registered adapter.

Knows nothing of Celery (``queue/tasks.py`` calls these with ids) and never imports torch:
the trainer runs in ``python -m loraforge.trainer SPEC`` so CUDA never lives in this process
and cancel is a signal.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from queue import Empty, Queue
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.adapters import registry
from loraforge.db.models import FileRecord, Job, Organization
from loraforge.db.session import session_scope
from loraforge.ids import now
from loraforge.jobs.naming import fine_tuned_model_name
from loraforge.jobs.state import JobStatus, add_event, transition
from loraforge.jobs.validation import check_training_file
from loraforge.settings import Settings
from loraforge.storage.blobs import BlobStore

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
TERMINATE_GRACE_SECONDS = 8.0


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _file_path(session: Session, blobs: BlobStore, file_id: str) -> Path:
    record = session.execute(select(FileRecord).where(FileRecord.id == file_id)).scalar_one()
    return Path(blobs.local_path(record.storage_key))


def validate_job(settings: Settings, sessions: sessionmaker[Session], job_id: str) -> bool:
    """``validating_files`` -> ``queued`` (True) or ``failed`` with the file's problem (False)."""
    blobs = BlobStore(str(settings.blobs_dir))
    with session_scope(sessions) as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        if job.status != JobStatus.VALIDATING_FILES:
            return False
        checks = [(job.training_file, "training_file")]
        if job.validation_file:
            checks.append((job.validation_file, "validation_file"))
        for file_id, param in checks:
            problem = check_training_file(_file_path(session, blobs, file_id), param)
            if problem is not None:
                transition(
                    session,
                    job_id,
                    JobStatus.FAILED,
                    f"The job failed: {problem.message}",
                    level="error",
                    error={"code": problem.code, "message": problem.message, "param": problem.param},
                )
                return False
        return transition(session, job_id, JobStatus.QUEUED, "Files validated, moving job to queued state")


def _write_spec(settings: Settings, session: Session, job: Job, run_dir: Path) -> Path:
    blobs = BlobStore(str(settings.blobs_dir))
    spec = {
        "job_id": job.id,
        "base_model": job.model,
        "models_config": str(settings.models_config) if settings.models_config else None,
        "models_dir": str(settings.models_dir),
        "training_file": str(_file_path(session, blobs, job.training_file)),
        "validation_file": str(_file_path(session, blobs, job.validation_file))
        if job.validation_file
        else None,
        "output_dir": str(settings.adapters_dir / job.id),
        "hyperparameters": dict(job.hyperparameters),
        "seed": job.seed,
        "torch_threads": settings.torch_threads,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "spec.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


class _TrainerProcess:
    """The trainer subprocess and a thread that turns its stdout into parsed JSON messages."""

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self._log = log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, env=env)
        self.messages: Queue[dict[str, Any]] = Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("{"):
                continue
            try:
                self.messages.put(json.loads(line))
            except ValueError:
                log.warning("unparsable trainer line: %s", line[:200])

    def next_message(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self.messages.get(timeout=timeout)
        except Empty:
            return None

    def finished(self) -> bool:
        return self.proc.poll() is not None and not self._reader.is_alive() and self.messages.empty()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; frees the accelerator with the process."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(TERMINATE_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self._reader.join(timeout=5)
        self._log.close()


class _Run:
    """One training run of a job: reacts to the trainer's messages."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.started = time.monotonic()
        self.total_steps = 0
        self.done: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None

    def handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "hyperparameters":
            self._on_hyperparameters(msg)
        elif kind == "metrics":
            self._on_metrics(msg)
        elif kind == "done":
            self.done = msg
        elif kind == "error":
            self.error = msg

    def _on_hyperparameters(self, msg: dict[str, Any]) -> None:
        self.total_steps = int(msg.get("total_steps", 0))
        resolved = {k: msg[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
        with session_scope(self.sessions) as session:
            job = session.execute(select(Job).where(Job.id == self.job_id)).scalar_one()
            job.hyperparameters = resolved
            job.method = {"type": "supervised", "supervised": {"hyperparameters": resolved}}
            add_event(
                session,
                self.job_id,
                "Hyperparameters: "
                + ", ".join(f"{k}={v}" for k, v in resolved.items())
                + f" ({self.total_steps} steps)",
            )

    def _on_metrics(self, msg: dict[str, Any]) -> None:
        data = {k: v for k, v in msg.items() if k not in ("type", "epoch")}
        step, total = int(msg["step"]), int(msg.get("total_steps") or self.total_steps)
        text = f"Step {step}/{total}: training loss={msg.get('train_loss', float('nan')):.4f}"
        if "valid_loss" in msg:
            text += f", validation loss={msg['valid_loss']:.4f}"
        per_step = (time.monotonic() - self.started) / max(step, 1)
        with session_scope(self.sessions) as session:
            add_event(session, self.job_id, text, type="metrics", data=data)
            session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.status == JobStatus.RUNNING.value)
                .values(estimated_finish=now() + int(per_step * max(total - step, 0)))
            )


def _still_ours(sessions: sessionmaker[Session], job_id: str, wid: str, beat: bool) -> bool:
    """Is the job still running under this worker? Optionally renew the heartbeat."""
    with session_scope(sessions) as session:
        if beat:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.worker_id == wid)
                .values(heartbeat_at=now())
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]
        status, owner = session.execute(select(Job.status, Job.worker_id).where(Job.id == job_id)).one()
        return bool(status == JobStatus.RUNNING.value and owner == wid)


def run_training(settings: Settings, sessions: sessionmaker[Session], job_id: str) -> None:
    """``queued`` -> ``running`` -> ``succeeded`` | ``failed``; stops the trainer if cancelled."""
    wid = worker_id()
    run_dir = settings.runs_dir / job_id
    with session_scope(sessions) as session:
        stamp = now()
        if not transition(
            session,
            job_id,
            JobStatus.RUNNING,
            "Fine-tuning job started",
            worker_id=wid,
            started_at=stamp,
            heartbeat_at=stamp,
        ):
            return  # cancelled, or another worker has it
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        spec_path = _write_spec(settings, session, job, run_dir)

    cmd = [settings.trainer_python or sys.executable, "-m", "loraforge.trainer", str(spec_path)]
    trainer = _TrainerProcess(cmd, run_dir / "trainer.log")
    run = _Run(sessions, job_id)
    last_check = last_beat = time.monotonic()
    try:
        while not trainer.finished():
            msg = trainer.next_message(timeout=settings.cancel_poll_seconds)
            if msg is not None:
                run.handle(msg)
            clock = time.monotonic()
            if clock - last_check >= settings.cancel_poll_seconds:
                beat = clock - last_beat >= HEARTBEAT_SECONDS
                if not _still_ours(sessions, job_id, wid, beat):
                    trainer.stop()
                    shutil.rmtree(settings.adapters_dir / job_id, ignore_errors=True)
                    log.info("job %s is no longer running here; trainer stopped", job_id)
                    return
                last_check, last_beat = clock, (clock if beat else last_beat)
    finally:
        trainer.stop()
        trainer.close()
    _finish(settings, sessions, job_id, run, trainer.proc.returncode, run_dir)


def _finish(
    settings: Settings,
    sessions: sessionmaker[Session],
    job_id: str,
    run: _Run,
    returncode: int,
    run_dir: Path,
) -> None:
    if run.done is None or returncode != 0:
        error = run.error or {
            "code": "training_error",
            "message": f"The trainer exited with code {returncode} before finishing.",
            "param": None,
        }
        error = {"code": error.get("code"), "message": error.get("message"), "param": error.get("param")}
        with session_scope(sessions) as session:
            transition(
                session,
                job_id,
                JobStatus.FAILED,
                f"The job failed: {error['message']}",
                level="error",
                error=error,
            )
        shutil.rmtree(settings.adapters_dir / job_id, ignore_errors=True)
        return

    with session_scope(sessions) as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        org = session.execute(select(Organization).where(Organization.id == job.org_id)).scalar_one()
        name = fine_tuned_model_name(job.model, org.name, job.suffix)
        model = registry.register(
            session, name=name, org_id=org.id, job_id=job_id, adapter_dir=Path(run.done["adapter_dir"])
        )
    registry.load_into_engines(settings, model)
    with session_scope(sessions) as session:
        add_event(session, job_id, f"New fine-tuned model created: {name}")
        ok = transition(
            session,
            job_id,
            JobStatus.SUCCEEDED,
            "The job has successfully completed",
            fine_tuned_model=name,
            trained_tokens=int(run.done.get("trained_tokens", 0)),
        )
        if not ok:  # cancelled at the last moment: the adapter must not stay registered
            session.rollback()
            registry.delete_fine_tuned_model_by_name(session, name)
    if not ok:
        registry.unload_from_engines(settings, model)
        shutil.rmtree(settings.adapters_dir / job_id, ignore_errors=True)
