"""A job's Weights & Biases run, fed from the trainer's events on the worker side.

The trainer knows nothing of W&B: the worker already reads its typed events
(:mod:`loraforge.contracts.trainer_events`) and hands each to :meth:`WandbRun.send` as well. A
background thread owns the run: ``wandb.init`` (the job's project, name, entity, tags; the
config holds the job, its hyperparameters, its LoRA settings and its memory plan), one
``run.log`` per metrics event (at the event's step), the resolved hyperparameters into the
config, the totals into the summary, ``run.finish`` at the end.

W&B never fails or slows the job: :meth:`send` only puts the event on a bounded queue (an event
that finds it full is dropped and counted), and any W&B error -- a bad key, an unreachable
server, an exception while logging -- ends the run's thread with ONE ``warn`` job event; the job
goes on. The run's URL (or, offline, its directory) is an ``info`` job event whose ``data``
carries ``wandb_run_url``; the web job page links it. The org's key reaches ``wandb`` through its
``Settings`` (never the environment: several jobs of several orgs share a worker process) and is
scrubbed from any message.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loraforge.contracts.trainer_events import DoneEvent, HyperparametersEvent, MetricsEvent, TrainerEvent
from loraforge.db.models import Job
from loraforge.db.session import session_scope
from loraforge.jobs.placement import public_plan
from loraforge.jobs.state import add_event
from loraforge.org_integrations import wandb_credentials
from loraforge.settings import Settings

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000
_STOP = object()
# Report(message, level, data): writes one job event.
Report = Callable[[str, str, dict[str, Any]], None]


def run_id(job_id: str) -> str:
    """The W&B run id of a job: stable, so a resumed job continues the same run."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", job_id)


class WandbRun:
    """One job's W&B run, driven by a background thread (see the module docstring)."""

    def __init__(
        self,
        *,
        job_id: str,
        wandb: dict[str, Any],
        api_key: str,
        entity: str | None,
        config: dict[str, Any],
        directory: Path,
        report: Report,
        base_url: str = "",
        init_timeout: float = 60.0,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.job_id = job_id
        self._wandb = wandb
        self._api_key = api_key
        self._entity = wandb.get("entity") or entity
        self._config = config
        self._dir = directory
        self._report = report
        self._base_url = base_url
        self._init_timeout = init_timeout
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self.failed = threading.Event()
        self.dropped = 0
        self.url: str | None = None
        self._thread = threading.Thread(target=self._main, name=f"wandb-{job_id}", daemon=True)
        self._thread.start()

    def send(self, event: TrainerEvent) -> None:
        """Queue ``event`` for the run; never blocks (a full queue drops it)."""
        if self.failed.is_set():
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def close(self, wait: float = 0.0) -> None:
        """No more events: the thread finishes the run. Waits at most ``wait`` seconds for it."""
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            self.failed.set()  # the thread stops at its next look at the flag
        self._thread.join(wait)

    def join(self, timeout: float) -> bool:
        """Wait for the run's thread; True if it has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _fail(self, stage: str, exc: BaseException) -> None:
        self.failed.set()
        reason = self._scrub(f"{type(exc).__name__}: {exc}")[:500]
        log.warning("job %s: W&B %s failed: %s", self.job_id, stage, reason)
        self._report(
            f"Weights & Biases logging stopped ({stage} failed: {reason}); the job continues without it",
            "warn",
            {"wandb_error": reason},
        )

    def _main(self) -> None:
        try:
            run = self._init()
        except BaseException as exc:  # noqa: BLE001 - any W&B failure is one warning, never the job's
            self._fail("starting the run", exc)
            return
        try:
            while not self.failed.is_set():
                item = self._queue.get()
                if item is _STOP:
                    break
                self._apply(run, item)  # type: ignore[arg-type]
            if self.dropped:
                run.summary["loraforge/dropped_events"] = self.dropped
            run.finish()
        except BaseException as exc:  # noqa: BLE001
            self._fail("logging", exc)
            try:
                run.finish(exit_code=1)
            except BaseException:  # noqa: BLE001, S110 - already reported
                pass

    def _init(self) -> Any:
        import wandb

        options: dict[str, Any] = {
            "api_key": self._api_key,
            "init_timeout": self._init_timeout,
            "silent": True,
            "console": "off",
            "disable_git": True,
            "x_disable_stats": True,
            "x_disable_machine_info": True,
        }
        if self._base_url:
            options["base_url"] = self._base_url
        # wandb reads WANDB_MODE once per process (its first run); read it for every run, so a
        # change reaches a long-lived worker's next job.
        mode = os.environ.get("WANDB_MODE") or None
        self._dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=self._wandb["project"],
            entity=self._entity,
            name=self._wandb.get("name"),
            tags=self._wandb.get("tags"),
            id=run_id(self.job_id),
            resume="allow",
            dir=str(self._dir),
            config=self._config,
            reinit="create_new",
            mode=mode,  # type: ignore[arg-type]  # wandb checks the value
            settings=wandb.Settings(**options),
        )
        self.url = run.url
        offline = run.settings.mode in ("offline", "dryrun")
        where = f"logged offline in the worker's run folder ({run.id})" if offline else str(run.url)
        self._report(
            f"Weights & Biases run: {where}",
            "info",
            {
                "wandb_run_url": run.url,
                "wandb_run_id": run.id,
                "wandb_project": run.project,
                "offline": offline,
            },
        )
        return run

    def _apply(self, run: Any, event: TrainerEvent) -> None:
        match event:
            case MetricsEvent():
                run.log({**event.metrics.model_dump(), "epoch": event.epoch}, step=event.step)
            case HyperparametersEvent():
                resolved = event.model_dump(exclude={"type"})
                run.config.update({"resolved_hyperparameters": resolved}, allow_val_change=True)
            case DoneEvent():
                run.summary.update({"trained_tokens": event.trained_tokens, "total_steps": event.total_steps})
            case _:
                pass


def _config(job: Job) -> dict[str, Any]:
    hyper = dict(job.hyperparameters or {})
    lora = {k.removeprefix("lora_"): hyper[k] for k in list(hyper) if k.startswith("lora_")}
    return {
        "job_id": job.id,
        "model": job.parent_model or job.model,
        "base_model": job.model,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "suffix": job.suffix,
        "seed": job.seed,
        "hyperparameters": hyper,
        "lora": lora,
        "plan": public_plan(job.plan),
    }


def open_for_job(
    settings: Settings, sessions: sessionmaker[Session], job_id: str, directory: Path
) -> WandbRun | None:
    """The job's W&B run if it asked for one (None otherwise). Never raises: a missing or
    unreadable key is the job's one W&B warning event, and the job runs without W&B."""

    def report(message: str, level: str, data: dict[str, Any]) -> None:
        try:
            with session_scope(sessions) as session:
                add_event(session, job_id, message, level=level, data=data)
        except Exception:  # noqa: BLE001 - the job must not notice
            log.exception("job %s: could not record a W&B event", job_id)

    try:
        with session_scope(sessions) as session:
            job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
            wandb = next((i["wandb"] for i in job.integrations or [] if i.get("type") == "wandb"), None)
            if wandb is None:
                return None
            credentials = wandb_credentials(session, settings, job.org_id)
            config = _config(job)
    except Exception as exc:  # noqa: BLE001
        report(f"Weights & Biases logging is off for this run: {type(exc).__name__}: {exc}", "warn", {})
        return None
    if credentials is None:
        report("Weights & Biases logging is off: the organization's W&B key was removed", "warn", {})
        return None
    return WandbRun(
        job_id=job_id,
        wandb=wandb,
        api_key=credentials.api_key,
        entity=credentials.entity,
        config=config,
        directory=directory,
        report=report,
        base_url=settings.wandb_base_url,
        init_timeout=settings.wandb_init_timeout_seconds,
    )
