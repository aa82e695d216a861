"""One training run of a job, as the worker sees it: the trainer's JSON lines become job fields,
events and checkpoint rows (see ``loraforge.trainer`` for the line shapes)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.models import Job, JobEvent
from loraforge.db.session import session_scope
from loraforge.engines import fleet_for
from loraforge.ids import now
from loraforge.jobs import checkpoints
from loraforge.jobs.state import JobStatus, add_event
from loraforge.settings import Settings

log = logging.getLogger(__name__)


def metrics_message(msg: dict[str, Any], total: int) -> str:
    """OpenAI's metrics event text, e.g. ``Step 3/100: training loss=0.1523, validation loss=0.2000``."""
    text = f"Step {int(msg['step'])}/{total}: training loss={msg.get('train_loss', float('nan')):.4f}"
    if "valid_loss" in msg:
        text += f", validation loss={msg['valid_loss']:.4f}"
    if "full_valid_loss" in msg:
        text += f", full validation loss={msg['full_valid_loss']:.4f}"
    return text


class RunProgress:
    """Reacts to one trainer process's messages; remembers how the run ended."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], job_id: str) -> None:
        self.settings = settings
        self.sessions = sessions
        self.job_id = job_id
        self.started = time.monotonic()
        self.total_steps = 0
        # The step this run started from (a checkpoint's), for the time-per-step estimate.
        self.start_step = 0
        self.seen_metrics = False
        self.done: dict[str, Any] | None = None
        self.paused: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None

    def handle(self, msg: dict[str, Any]) -> None:
        """Apply one trainer message."""
        kind = msg.get("type")
        if kind == "hyperparameters":
            self._on_hyperparameters(msg)
        elif kind == "resumed":
            self._on_resumed(msg)
        elif kind == "metrics":
            self._on_metrics(msg)
        elif kind == "checkpoint":
            self._on_checkpoint(msg)
        elif kind == "done":
            self.done = msg
        elif kind == "paused":
            self.paused = msg
        elif kind == "error":
            self.error = msg

    def _on_hyperparameters(self, msg: dict[str, Any]) -> None:
        self.total_steps = int(msg.get("total_steps", 0))
        resolved = {k: msg[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
        with session_scope(self.sessions) as session:
            job = session.execute(select(Job).where(Job.id == self.job_id)).scalar_one()
            if {k: job.hyperparameters.get(k) for k in resolved} == resolved:
                return  # a resumed run: already reported
            # Merge: the LoRA knobs set at creation stay on the job next to the resolved trio.
            job.hyperparameters = {**job.hyperparameters, **resolved}
            job.method = {"type": "supervised", "supervised": {"hyperparameters": job.hyperparameters}}
            add_event(
                session,
                self.job_id,
                "Hyperparameters: "
                + ", ".join(f"{k}={v}" for k, v in resolved.items())
                + f" ({self.total_steps} steps)",
            )

    def _on_resumed(self, msg: dict[str, Any]) -> None:
        step = int(msg["step"])
        self.start_step = step
        with session_scope(self.sessions) as session:
            add_event(
                session,
                self.job_id,
                f"Resumed from checkpoint at step {step}/{self.total_steps}",
                data={"step": step, "kind": msg.get("kind")},
            )

    def _on_metrics(self, msg: dict[str, Any]) -> None:
        data = {k: v for k, v in msg.items() if k not in ("type", "epoch")}
        step, total = int(msg["step"]), int(msg.get("total_steps") or self.total_steps)
        per_step = (time.monotonic() - self.started) / max(step - self.start_step, 1)
        with session_scope(self.sessions) as session:
            if not self.seen_metrics:
                self._drop_superseded(session, step)
                self.seen_metrics = True
            add_event(session, self.job_id, metrics_message(msg, total), type="metrics", data=data)
            session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.status == JobStatus.RUNNING.value)
                .values(estimated_finish=now() + int(per_step * max(total - step, 0)))
            )

    def _drop_superseded(self, session: Session, first_step: int) -> None:
        """A run that trains ``first_step`` again (after a crash: from a checkpoint, or from the
        start when none was written) supersedes the metrics an earlier run recorded from there."""
        rows = session.execute(
            select(JobEvent.id, JobEvent.data).where(
                JobEvent.job_id == self.job_id, JobEvent.type == "metrics"
            )
        ).all()
        stale = [eid for eid, data in rows if data and int(data.get("step", 0)) >= first_step]
        if stale:
            session.execute(delete(JobEvent).where(JobEvent.id.in_(stale)))

    def _on_checkpoint(self, msg: dict[str, Any]) -> None:
        if msg.get("kind") != "epoch":
            return  # a pause checkpoint is the job's private resume point, not a model
        step = int(msg["step"])
        with session_scope(self.sessions) as session:
            job = session.execute(select(Job).where(Job.id == self.job_id)).scalar_one()
            if job.status != JobStatus.RUNNING.value:
                return  # cancelled meanwhile: the worker removes what is on disk
            row = checkpoints.record(session, job, step, str(msg["path"]), dict(msg.get("metrics") or {}))
            gone = checkpoints.forget_missing(session, self.job_id)
            add_event(
                session,
                self.job_id,
                f"Checkpoint created at step {step}: {row.fine_tuned_model_checkpoint}",
                data={"step": step, "checkpoint": row.id},
            )
            base = job.model
        names = [row.fine_tuned_model_checkpoint for row in gone]
        if names:
            # Off the message loop: an unreachable engine must not delay the lease's heartbeat.
            threading.Thread(target=fleet_for(self.settings).unload, args=(base, names), daemon=True).start()
