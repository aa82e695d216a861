"""One training run of a job, as the worker sees it: the trainer's events become job fields,
job events and, through the store mirror, stored checkpoints and checkpoint rows (the events are
:mod:`loraforge.contracts.trainer_events`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.contracts.trainer_events import (
    CheckpointEvent,
    DataProgressEvent,
    DoneEvent,
    ErrorEvent,
    HyperparametersEvent,
    MetricsEvent,
    PausedEvent,
    ResumedEvent,
    TrainerEvent,
)
from loraforge.db.models import Job, JobEvent
from loraforge.db.session import session_scope
from loraforge.ids import now
from loraforge.jobs.state import JobStatus, add_event
from loraforge.ops.metrics import worker_metrics
from loraforge.settings import Settings
from loraforge.storage import checkpoint_key
from loraforge.worker.store_sync import CheckpointMirror
from loraforge.worker.wandb_run import open_for_job

log = logging.getLogger(__name__)


def metrics_message(event: MetricsEvent, total: int) -> str:
    """OpenAI's metrics event text, e.g. ``Step 3/100: training loss=0.1523, validation loss=0.2000``."""
    metrics = event.metrics
    text = f"Step {event.step}/{total}: training loss={metrics.train_loss:.4f}"
    if metrics.valid_loss is not None:
        text += f", validation loss={metrics.valid_loss:.4f}"
    if metrics.full_valid_loss is not None:
        text += f", full validation loss={metrics.full_valid_loss:.4f}"
    return text


class RunProgress:
    """Reacts to one trainer process's events; remembers how the run ended."""

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], job_id: str, keep_checkpoints: int = 3
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.job_id = job_id
        self.started = time.monotonic()
        # Share of the data prepared when the last "Preparing data" event was written.
        self._data_reported = -1.0
        self.total_steps = 0
        # The step this run started from (a checkpoint's), for the time-per-step estimate.
        self.start_step = 0
        self.seen_metrics = False
        # Trained tokens per optimizer step (from the hyperparameters line), and the first metrics
        # line of this run (monotonic time, step): the throughput gauge measures from there, so
        # loading the model does not count.
        self.tokens_per_step: float | None = None
        self._first_metrics: tuple[float, int] | None = None
        # How the run ended (its last event), if it said so.
        self.done: DoneEvent | None = None
        self.paused: PausedEvent | None = None
        self.error: ErrorEvent | None = None
        # Every checkpoint goes to the blob store, so the job can resume on any host.
        self.mirror = CheckpointMirror(settings, sessions, job_id, keep=keep_checkpoints)
        # The job's W&B run, if it has the integration: fed every event, never waited for.
        self.wandb = open_for_job(settings, sessions, job_id, settings.wandb_dir / job_id)

    def handle(self, event: TrainerEvent) -> None:
        """Apply one trainer event.

        Args:
            event: the event, as :func:`loraforge.contracts.trainer_events.parse_event` read it.
        """
        if self.wandb is not None:
            self.wandb.send(event)
        match event:
            case DataProgressEvent():
                self._on_data_progress(event)
            case HyperparametersEvent():
                self._on_hyperparameters(event)
            case ResumedEvent():
                self._on_resumed(event)
            case MetricsEvent():
                self._on_metrics(event)
            case CheckpointEvent():
                self._on_checkpoint(event)
            case DoneEvent():
                self.done = event
            case PausedEvent():
                self.paused = event
            case ErrorEvent():
                self.error = event

    def close(self) -> None:
        """The run is over: its throughput is no longer reported, its W&B run finishes (in the
        background: the job does not wait for W&B)."""
        worker_metrics().throughput(self.job_id, None)
        if self.wandb is not None:
            self.wandb.close()

    def _on_hyperparameters(self, event: HyperparametersEvent) -> None:
        self.total_steps = event.total_steps
        if event.total_steps:
            self.tokens_per_step = event.train_tokens_per_epoch * event.n_epochs / event.total_steps
        resolved = {
            "n_epochs": event.n_epochs,
            "batch_size": event.batch_size,
            "learning_rate_multiplier": event.learning_rate_multiplier,
        }
        with session_scope(self.sessions) as session:
            job = session.execute(select(Job).where(Job.id == self.job_id)).scalar_one()
            if {k: job.hyperparameters.get(k) for k in resolved} == resolved:
                return  # a resumed run: already reported
            # Merge: the LoRA knobs set at creation stay on the job next to the resolved trio.
            job.hyperparameters = {**job.hyperparameters, **resolved}
            kind = (job.method or {}).get("type") or "supervised"
            job.method = {"type": kind, kind: {"hyperparameters": job.hyperparameters}}
            add_event(
                session,
                self.job_id,
                "Hyperparameters: "
                + ", ".join(f"{k}={v}" for k, v in resolved.items())
                + f" ({self.total_steps} steps)",
            )

    def _on_data_progress(self, event: DataProgressEvent) -> None:
        """An event every 10% of the file (and when it is ready); ``estimated_finish`` at the data's
        estimate until the first step. The time per step is measured from when the data is ready."""
        if event.fraction >= 1:
            self.started = time.monotonic()  # steps are timed from here: preparing is not a step
            how = "reused from an earlier run" if event.cached else f"prepared in {event.elapsed_s:.0f} s"
            message = f"Training data ready: {event.n_examples} examples, {how}"
        elif event.fraction - self._data_reported >= 0.1:
            self._data_reported = event.fraction
            message = f"Preparing data: {event.fraction:.0%} done, est. {event.eta_s:.0f} s to first step"
        else:
            return
        data = {"fraction": event.fraction, "elapsed_s": event.elapsed_s, "eta_s": event.eta_s}
        with session_scope(self.sessions) as session:
            add_event(session, self.job_id, message, data=data)
            if event.fraction < 1:
                session.execute(
                    update(Job)
                    .where(Job.id == self.job_id, Job.status == JobStatus.RUNNING.value)
                    .values(estimated_finish=now() + int(event.eta_s))
                )

    def _on_resumed(self, event: ResumedEvent) -> None:
        step = event.step
        self.start_step = step
        with session_scope(self.sessions) as session:
            add_event(
                session,
                self.job_id,
                f"Resumed from checkpoint at step {step}/{self.total_steps}",
                data={
                    "step": step,
                    "kind": event.kind,
                    "checkpoint": checkpoint_key(self.job_id, Path(event.path).name),
                },
            )

    def _on_metrics(self, event: MetricsEvent) -> None:
        # OpenAI's metrics event data: the step, the total and the metrics (not the epoch).
        step, total = event.step, event.total_steps or self.total_steps
        data = {"step": step, "total_steps": event.total_steps, **event.metrics.model_dump()}
        clock = time.monotonic()
        per_step = (clock - self.started) / max(step - self.start_step, 1)
        self._report_throughput(clock, step)
        with session_scope(self.sessions) as session:
            if not self.seen_metrics:
                self._drop_superseded(session, step)
                self.seen_metrics = True
            add_event(session, self.job_id, metrics_message(event, total), type="metrics", data=data)
            session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.status == JobStatus.RUNNING.value)
                .values(estimated_finish=now() + int(per_step * max(total - step, 0)))
            )

    def _report_throughput(self, clock: float, step: int) -> None:
        if self._first_metrics is None:
            self._first_metrics = (clock, step)
            return
        since, first_step = self._first_metrics
        if self.tokens_per_step is not None and clock > since and step > first_step:
            rate = (step - first_step) * self.tokens_per_step / (clock - since)
            worker_metrics().throughput(self.job_id, rate)

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

    def _on_checkpoint(self, event: CheckpointEvent) -> None:
        # Uploaded in the background (an 8B checkpoint takes a while); an epoch checkpoint
        # becomes a model once it is in the store (``worker/store_sync.py``).
        self.mirror.submit(event)
