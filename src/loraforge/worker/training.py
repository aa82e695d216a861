"""What a worker does with a job: validate its files, then run the trainer as a subprocess
and turn its events into job state, job events and a registered adapter.

Knows nothing of Celery (``queue/tasks.py`` calls these with ids) and never imports torch:
the trainer runs in ``python -m loraforge.trainer SPEC`` so CUDA never lives in this process
and cancel is a signal.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.adapters import registry
from loraforge.contracts.job_error import JobError
from loraforge.contracts.train_spec import load_spec
from loraforge.contracts.trainer_launch import launch_command
from loraforge.db.models import Job, Organization
from loraforge.db.session import session_scope
from loraforge.engines import fleet_for
from loraforge.errors import ModelNotFoundError
from loraforge.ids import now
from loraforge.jobs import file_checks
from loraforge.jobs.naming import fine_tuned_model_name
from loraforge.jobs.state import JobStatus, add_event, fail, transition
from loraforge.ops.metrics import worker_metrics
from loraforge.settings import Settings
from loraforge.storage import adapter_key, open_store
from loraforge.storage.sealed import delete_dir
from loraforge.worker import admission, artefacts, data_sync, job_spec, results, store_sync
from loraforge.worker.gpu_leases import GpuLease
from loraforge.worker.progress import RunProgress
from loraforge.worker.trainer_process import TrainerProcess

log = logging.getLogger(__name__)


# Set when this worker process shuts down (SIGTERM: ``loraforge serve`` stopping, a deploy): each
# running job's trainer is stopped and the job handed back to the queue at once, to resume from
# its newest checkpoint on whichever worker takes it, instead of waiting out its lease.
_shutting_down = threading.Event()


def begin_shutdown() -> None:
    """Hand every job this process runs back to the queue (see ``_shutting_down``)."""
    _shutting_down.set()


def shutting_down() -> bool:
    """Whether this worker process is stopping (batches hand their work back too)."""
    return _shutting_down.is_set()


def worker_id() -> str:
    """This worker process's lease holder name: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def validate_job(settings: Settings, sessions: sessionmaker[Session], job_id: str) -> bool:
    """``validating_files`` -> ``queued`` (True) or ``failed`` with the files' problem (False).

    The full pre-flight against the job's base model (``jobs/file_checks.py``): every line checked,
    tokens counted with the model's tokenizer and chat template, the format matched to the method.
    """
    return file_checks.validate_job_files(settings, sessions, job_id)


_OURS, _PAUSE, _LOST = "ours", "pause", "lost"


def _poll(sessions: sessionmaker[Session], job_id: str, wid: str, beat: bool) -> str:
    """Is the job still running under this worker's lease, and is a pause asked for?

    Optionally renews the lease (heartbeat). ``_LOST`` means cancelled, or re-queued by a reaper
    because this worker's heartbeat lapsed: either way the trainer must stop now.
    """
    with session_scope(sessions) as session:
        if beat:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.worker_id == wid)
                .values(heartbeat_at=now())
            )
        status, owner, pause = session.execute(
            select(Job.status, Job.worker_id, Job.pause_requested).where(Job.id == job_id)
        ).one()
    if status != JobStatus.RUNNING.value or owner != wid:
        return _LOST
    return _PAUSE if pause else _OURS


def _start(settings: Settings, sessions: sessionmaker[Session], job_id: str, wid: str) -> Path | None:
    """Take the job's lease (``queued`` -> ``running``) and write its spec; None if not ours to run.

    The lease is the compare-and-set ``queued -> running`` in the database, so a second copy of
    the train task -- a re-send by the reaper, or Redis handing the unacknowledged task out again
    after its visibility timeout -- finds the job running under another worker's live lease and
    returns without starting a trainer, on any host. That copy is then acknowledged: the job is
    not lost with it, because the database, not the message, holds it (the reaper re-queues a job
    whose lease lapses and sends its task again).
    """
    folder = artefacts.run_dir(settings, job_id)
    with session_scope(sessions) as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one_or_none()
        if job is None or job.status != JobStatus.QUEUED.value:
            return None  # cancelled, paused, or another worker has it (a duplicate message)
        org = session.execute(select(Organization).where(Organization.id == job.org_id)).scalar_one()
        stamp = now()
        if not transition(
            session,
            job_id,
            JobStatus.RUNNING,
            "Fine-tuning job started",
            event_data={"worker_id": wid},
            worker_id=wid,
            started_at=job.started_at or stamp,
            heartbeat_at=stamp,
            pause_requested=False,
            reserved_model=job.reserved_model or fine_tuned_model_name(job.model, org.name, job.suffix),
        ):
            return None
    (folder / artefacts.PAUSE_FILE).unlink(missing_ok=True)
    with session_scope(sessions) as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        try:
            spec = job_spec.write_spec(settings, session, job, folder)
        except Exception as exc:  # noqa: BLE001 - any reason the run cannot start fails the job
            if store_sync.store_unreachable(exc):
                session.rollback()
                store_sync.give_back(sessions, job_id, wid, exc)
                return None
            log.exception("job %s: could not prepare the run", job_id)
            if isinstance(exc, ModelNotFoundError):
                error = JobError(code="model_not_found", message=exc.message, param="model")
            else:
                error = JobError(code="training_error", message=f"Could not start training: {exc}")
            session.rollback()
            fail(session, job_id, error, expect={"worker_id": wid})
            return None
    try:
        # This disk may never have seen the job (another host ran it until it died): its newest
        # checkpoint comes from the store, and the trainer resumes from it.
        store_sync.restore_checkpoint(settings, sessions, job_id)
        data_sync.restore_prepared(settings, sessions, job_id)
    except Exception as exc:  # noqa: BLE001 - the store is the job's memory: wait for it
        store_sync.give_back(sessions, job_id, wid, exc)
        return None
    return spec


def run_training(
    settings: Settings,
    sessions: sessionmaker[Session],
    job_id: str,
    wait_token: int | None = None,
    requeue: Callable[[str], None] | None = None,
) -> int | None:
    """``queued`` -> ``running`` -> ``succeeded`` | ``failed`` | ``paused``, once its GPUs are free.

    A cuda job first leases ``plan.num_gpus`` GPUs of this host (``worker/admission.py``) and its
    trainer sees only those (``CUDA_VISIBLE_DEVICES``); while they are busy the job stays queued.

    Args:
        settings: the worker's settings.
        sessions: the database.
        job_id: the job.
        wait_token: what the previous copy of this task returned, if it was a re-send.
        requeue: sends the job's train task again, after the job was handed back to the queue
            because this worker is shutting down (:func:`begin_shutdown`).

    Returns:
        None, or, when the job waits for GPUs, the token the re-sent train task must carry.
    """
    admitted = admission.admit(settings, sessions, job_id)
    if admitted.wait:
        return admission.keep_waiting(sessions, job_id, wait_token)
    try:
        if _run(settings, sessions, job_id, admitted.lease) and requeue is not None:
            requeue(job_id)
    finally:
        if admitted.lease is not None:
            admitted.lease.release()  # the trainer has exited: the GPUs are free again
    return None


def _run(settings: Settings, sessions: sessionmaker[Session], job_id: str, lease: GpuLease | None) -> bool:
    """Start the job and supervise its trainer, on the ``lease``d GPUs if it has any.

    Polls the database every ``cancel_poll_seconds``: renews the lease every
    ``heartbeat_seconds``, stops the trainer when the job was cancelled or taken over, and asks it
    for a pause checkpoint when a pause was requested. A job that was running before (crash,
    pause) continues from its newest checkpoint: the trainer finds it in the checkpoint directory.

    Returns:
        True when the job was handed back to the queue because this worker is shutting down
        (its train task must be sent again).
    """
    wid = worker_id()
    spec_path = _start(settings, sessions, job_id, wid)
    if spec_path is None:
        return False
    folder = artefacts.run_dir(settings, job_id)
    # One process, or `accelerate launch` with one process per GPU when the plan shards (FSDP).
    spec = load_spec(spec_path)
    plan = spec.plan
    port = lease.rendezvous_port() if lease else None
    cmd = launch_command(
        spec_path, plan, python=settings.trainer_python or sys.executable, main_process_port=port
    )
    env = lease.env() if lease else {}
    trainer = TrainerProcess(cmd, folder / "trainer.log", folder / artefacts.PAUSE_FILE, env=env)
    run = RunProgress(settings, sessions, job_id, keep_checkpoints=spec.keep_checkpoints)
    worker_metrics().running.inc()
    pause_deadline: float | None = None
    last_check = last_beat = time.monotonic()
    try:
        while not trainer.finished():
            event = trainer.next_event(timeout=settings.cancel_poll_seconds)
            if event is not None:
                run.handle(event)
            clock = time.monotonic()
            if clock - last_check < settings.cancel_poll_seconds:
                continue
            beat = clock - last_beat >= settings.heartbeat_seconds
            state = _poll(sessions, job_id, wid, beat)
            last_check, last_beat = clock, (clock if beat else last_beat)
            if state == _LOST:
                trainer.stop()
                run.mirror.abort()
                _abandon(settings, sessions, job_id)
                return False
            if _shutting_down.is_set():
                trainer.stop()
                # What the trainer saved must be in the store for whoever takes the job next.
                run.mirror.drain(lambda: _poll(sessions, job_id, wid, beat=True) != _LOST, 0.5)
                return _hand_back(sessions, job_id, wid)
            if state == _PAUSE and pause_deadline is None:
                trainer.request_pause()
                pause_deadline = clock + settings.pause_timeout_seconds
            elif pause_deadline is not None and clock > pause_deadline:
                log.warning(
                    "job %s: no pause checkpoint after %ss; stopping", job_id, settings.pause_timeout_seconds
                )
                trainer.stop()
    finally:
        trainer.stop()
        trainer.close()
        run.close()
        worker_metrics().running.dec()
    # The last checkpoints (a pause's above all) must be in the store before the job moves on.
    still_ours = lambda: _poll(sessions, job_id, wid, beat=True) != _LOST  # noqa: E731
    if not run.mirror.drain(still_ours, settings.cancel_poll_seconds):
        _abandon(settings, sessions, job_id)
        return False
    if run.done is None and run.error is None and (run.paused is not None or pause_deadline is not None):
        _pause(settings, sessions, job_id, wid, run)
        return False
    try:
        _finish(settings, sessions, job_id, wid, run, trainer.proc.returncode)
    except Exception as exc:  # noqa: BLE001 - a job must end somewhere, not stay "running"
        log.exception("job %s: recording the outcome failed", job_id)
        _fail(
            settings,
            sessions,
            job_id,
            wid,
            JobError(code="training_error", message=f"Recording the result failed: {exc}"),
        )
    return False


def _hand_back(sessions: sessionmaker[Session], job_id: str, wid: str) -> bool:
    """This worker is shutting down: ``running`` -> ``queued`` (``paused`` if a pause was asked).

    Returns:
        True if the job is queued again (its task must be sent), False otherwise.
    """
    with session_scope(sessions) as session:
        pause = session.execute(select(Job.pause_requested).where(Job.id == job_id)).scalar_one()
        target = JobStatus.PAUSED if pause else JobStatus.QUEUED
        ok = transition(
            session,
            job_id,
            target,
            f"The worker running this job ({wid}) is shutting down; "
            + ("paused, as requested" if pause else "re-queued to resume from its last checkpoint"),
            level="warn",
            expect={"worker_id": wid},
            event_data={"worker_id": wid},
            pause_requested=False,
            estimated_finish=None,
        )
    log.warning("job %s: this worker is shutting down; handed back (%s)", job_id, target.value)
    return ok and target == JobStatus.QUEUED


def _observe_end(sessions: sessionmaker[Session], job_id: str) -> None:
    """Record a job this worker ran reaching its final state, for ``loraforge_job_duration_seconds``."""
    with session_scope(sessions) as session:
        row = session.execute(
            select(Job.status, Job.started_at, Job.finished_at).where(Job.id == job_id)
        ).one_or_none()
    if row is not None and row.started_at is not None:
        worker_metrics().job_ended(row.status, (row.finished_at or now()) - row.started_at)


def _abandon(settings: Settings, sessions: sessionmaker[Session], job_id: str) -> None:
    """The job left this worker: a cancelled one loses its files; a re-queued one keeps them."""
    with session_scope(sessions) as session:
        status = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one()
    if status == JobStatus.CANCELLED.value:
        _observe_end(sessions, job_id)
        artefacts.remove_job_artefacts(settings, sessions, job_id)
        log.info("job %s was cancelled; trainer stopped and its files removed", job_id)
    else:
        log.warning("job %s is no longer this worker's (%s); trainer stopped", job_id, status)


def _pause(
    settings: Settings, sessions: sessionmaker[Session], job_id: str, wid: str, run: RunProgress
) -> None:
    step = run.paused.step if run.paused is not None else None
    where = f" at step {step}/{run.total_steps}" if step is not None else ""
    with session_scope(sessions) as session:
        ok = transition(
            session,
            job_id,
            JobStatus.PAUSED,
            f"Fine-tuning job paused{where}; resume continues from its last checkpoint",
            expect={"worker_id": wid},
            event_data={"step": step},
            pause_requested=False,
            estimated_finish=None,
        )
    if not ok:
        _abandon(settings, sessions, job_id)


def _trainer_error(run: RunProgress, returncode: int) -> JobError:
    """Why a run that did not finish failed: the trainer's error line, else its exit code."""
    if run.error is None:
        return JobError(
            code="training_error",
            message=f"The trainer exited with code {returncode} before finishing.",
        )
    error = run.error  # the trainer's error event
    return JobError(code=error.code, message=error.message, param=error.param)


def _fail(
    settings: Settings, sessions: sessionmaker[Session], job_id: str, wid: str, error: JobError
) -> None:
    """Fail the job if this worker still holds its lease (and drop the partial adapter and the
    tokenized data: a failed job is not resumed)."""
    with session_scope(sessions) as session:
        ok = fail(session, job_id, error, expect={"worker_id": wid})
    if ok:
        _observe_end(sessions, job_id)
        shutil.rmtree(settings.adapters_dir / job_id, ignore_errors=True)
        shutil.rmtree(artefacts.data_dir(settings, job_id), ignore_errors=True)
        data_sync.drop_prepared(settings, job_id)
        delete_dir(open_store(settings), adapter_key(job_id))
    else:
        _abandon(settings, sessions, job_id)


def _finish(
    settings: Settings,
    sessions: sessionmaker[Session],
    job_id: str,
    wid: str,
    run: RunProgress,
    returncode: int,
) -> None:
    """Record how the trainer ended: register the adapter and the results file, or fail the job."""
    if run.done is None or returncode != 0:
        _fail(settings, sessions, job_id, wid, _trainer_error(run, returncode))
        return
    if _poll(sessions, job_id, wid, beat=True) == _LOST:  # renew the lease for the last stretch
        _abandon(settings, sessions, job_id)
        return
    blobs = open_store(settings)
    adapter_dir = Path(run.done.adapter_dir)
    ref = store_sync.publish_adapter(settings, job_id, adapter_dir)
    with session_scope(sessions) as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        name = job.reserved_model or ""
        # A run killed between registering and succeeding left its registration: replace it.
        registry.delete_fine_tuned_model_by_name(session, name)
        model = registry.register(
            session, name=name, org_id=job.org_id, job_id=job_id, adapter_dir=adapter_dir, ref=ref
        )
    fleet_for(settings).load(model.base_model, model.id, model.adapter_path)
    record = None
    with session_scope(sessions) as session:
        job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
        record = results.store_results(session, blobs, job)
        add_event(session, job_id, f"New fine-tuned model created: {name}")
        ok = transition(
            session,
            job_id,
            JobStatus.SUCCEEDED,
            "The job has successfully completed",
            expect={"worker_id": wid},
            fine_tuned_model=name,
            trained_tokens=run.done.trained_tokens,
            result_files=[record.id],
        )
        if not ok:  # cancelled (or taken over) at the last moment: nothing of this run may stay
            session.rollback()
            results.discard_results(blobs, record)
            registry.delete_fine_tuned_model_by_name(session, name)
    if ok:
        _observe_end(sessions, job_id)
        store_sync.strip_training_state(settings, job_id)
    else:
        fleet_for(settings).unload(model.base_model, [model.id])
        _abandon(settings, sessions, job_id)
