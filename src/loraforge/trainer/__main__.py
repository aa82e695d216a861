"""``python -m loraforge.trainer SPEC.json``: run :func:`loraforge.trainer.train`, JSON lines on stdout.

stdout carries only the JSON lines, one :mod:`loraforge.contracts.trainer_events` event each;
logs, warnings and progress bars go to stderr. SIGTERM stops the run promptly without writing the
adapter (exit 143).

When ``LORAFORGE_TRAINER_PARENT_PID`` is set (the worker sets it; see
:mod:`loraforge.contracts.trainer_launch`), the trainer dies with that process:
``PR_SET_PDEATHSIG`` on Linux, and a watcher thread everywhere (a SIGKILLed worker must not leave
a trainer holding the accelerator, nor one racing the run that resumes the job).

Under ``accelerate launch`` (FSDP; see :func:`~loraforge.contracts.trainer_launch.launch_command`)
there is one such process per GPU, each a child of the launcher, not of the worker: they watch the
worker's pid instead of their parent, only rank 0 prints JSON lines and only local rank 0 takes
the run lock.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from loraforge.contracts.train_spec import TrainSpec, load_spec
from loraforge.contracts.trainer_events import Emit, ErrorEvent, TrainerEvent
from loraforge.contracts.trainer_launch import PARENT_PID_ENV
from loraforge.trainer.data import TrainingDataError
from loraforge.trainer.dpo_data import read_preference_jsonl

logger = logging.getLogger("loraforge.trainer")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_DATA_ERROR = 2
EXIT_SIGTERM = 128 + signal.SIGTERM
EXIT_ORPHANED = 128 + signal.SIGKILL
PR_SET_PDEATHSIG = 1
PARENT_POLL_SECONDS = 1.0
LOCK_FILE = "trainer.lock"


class TrainingCancelled(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """Raised from the SIGTERM handler; a BaseException so no ``except Exception`` swallows it."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise TrainingCancelled(f"received signal {signum}")


def _launched_rank() -> tuple[int, int] | None:
    """``(rank, local_rank)`` when started by a launcher (torchrun / accelerate launch), else None."""
    if "LOCAL_RANK" not in os.environ:
        return None
    return int(os.environ.get("RANK", "0")), int(os.environ["LOCAL_RANK"])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent() -> None:
    """Exit when the process named by ``LORAFORGE_TRAINER_PARENT_PID`` is gone."""
    raw = os.environ.get(PARENT_PID_ENV, "")
    if not raw.isdigit():
        return
    parent = int(raw)
    if _launched_rank() is not None:
        # Our parent is the launcher, a child of the worker; follow the launcher at once and
        # the worker by polling its pid (the launcher itself does not die with the worker).
        if sys.platform.startswith("linux"):
            libc_name = ctypes.util.find_library("c")
            if libc_name:
                ctypes.CDLL(libc_name, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

        def watch_worker() -> None:
            while _pid_alive(parent):
                time.sleep(PARENT_POLL_SECONDS)
            logger.error("worker process %d is gone; stopping", parent)
            os._exit(EXIT_ORPHANED)

        threading.Thread(target=watch_worker, name="worker-watch", daemon=True).start()
        return
    if sys.platform.startswith("linux"):
        libc_name = ctypes.util.find_library("c")
        if libc_name:
            # The kernel kills us the moment the thread that forked us dies; no polling delay.
            ctypes.CDLL(libc_name, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        logger.error("parent process %d is gone; stopping", parent)
        os._exit(EXIT_ORPHANED)

    if os.getppid() != parent:  # it died before the prctl above took effect
        os._exit(EXIT_ORPHANED)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _hold_run_lock(spec: TrainSpec) -> TextIO | None:
    """Take an exclusive lock on the run's directory (the checkpoint directory's parent).

    The database lease already keeps two workers from running a job at once; this covers a
    worker that froze rather than died: its trainer still runs when the job is re-queued, and
    the new trainer waits here until it exits instead of writing the same checkpoints. The kernel
    drops the lock when the process ends, however it ends.
    """
    if not spec.checkpoint_dir:
        return None
    launched = _launched_rank()
    if launched is not None and launched[1] != 0:
        return None  # the ranks of one run share it; local rank 0 holds it for all of them
    import fcntl

    path = Path(spec.checkpoint_dir).parent / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        logger.warning("another trainer of this job holds %s; waiting for it to exit", path)
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _claim_stdout() -> TextIO:
    """Keep the real stdout for JSON lines and point fd 1 (and ``sys.stdout``) at stderr.

    Anything a library prints, even from C, then lands on stderr instead of corrupting the stream.
    """
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(json_fd, "w", buffering=1, encoding="utf-8")


def _emitter(out: TextIO) -> Emit:
    launched = _launched_rank()
    if launched is not None and launched[0] != 0:
        # One run, one stream of lines: ranks other than 0 compute the same global metrics.
        return lambda event: None

    def emit(event: TrainerEvent) -> None:
        out.write(event.to_line() + "\n")
        out.flush()

    return emit


def main(argv: list[str] | None = None) -> int:
    """Run one training spec.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``): the spec path.

    Returns:
        The exit code: 0 done or paused, 1 error, 2 invalid data, 143 SIGTERM.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="python -m loraforge.trainer", description=__doc__)
    parser.add_argument("spec", help="path of the TrainSpec JSON file")
    args = parser.parse_args(argv)

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _die_with_parent()
    signal.signal(signal.SIGTERM, _on_sigterm)
    out = _claim_stdout()
    emit = _emitter(out)
    try:
        spec = load_spec(args.spec)
        lock = _hold_run_lock(spec)  # noqa: F841 - held (open) until the process exits
        # A bad chat file fails in setup, before the model loads (the file is read once, in
        # parts); a preference file (DPO, read whole) is checked here, before the torch import.
        if spec.method == "dpo":
            read_preference_jsonl(spec.training_file)
        from loraforge.trainer.recipe import train  # torch & co. load only after the env is set

        train(spec, emit)
        return EXIT_OK
    except TrainingCancelled as exc:
        logger.warning("training cancelled (%s); no adapter written", exc)
        return EXIT_SIGTERM
    except TrainingDataError as exc:
        logger.error("invalid training data: %s", exc.message)
        emit(exc.to_event())
        return EXIT_DATA_ERROR
    except Exception as exc:
        logger.exception("training failed")
        emit(ErrorEvent(code="training_error", message=str(exc)))
        return EXIT_ERROR
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
