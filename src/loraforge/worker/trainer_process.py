"""The trainer subprocess as the worker sees it: start, read its events, pause, stop.

Each stdout line is parsed into a typed event (:mod:`loraforge.contracts.trainer_events`). A line
that does not parse is logged and skipped, not fatal: the trainer's stdout carries only its own
lines, so such a line means a trainer of another version or a corrupted write, and the run's
outcome is decided by its last event and exit code (no ``done`` line: the job fails).

Pause is a file (``spec.pause_file``) rather than a signal: a signal that arrives before Python
installs its handler kills the process, a file cannot be missed. Cancel is SIGTERM, then SIGKILL.
The trainer is told the worker's pid and dies with it (``loraforge.trainer.__main__``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from pathlib import Path
from queue import Empty, Queue

from loraforge.contracts.trainer_events import TrainerEvent, parse_event
from loraforge.contracts.trainer_launch import PARENT_PID_ENV

log = logging.getLogger(__name__)

TERMINATE_GRACE_SECONDS = 8.0


class TrainerProcess:
    """``python -m loraforge.trainer SPEC`` and a thread that turns its stdout into events."""

    def __init__(
        self, cmd: list[str], log_path: Path, pause_file: Path, env: dict[str, str] | None = None
    ) -> None:
        """Start ``cmd``; ``env`` is added to this process's environment (e.g. the leased GPUs)."""
        self._log = log_path.open("ab")
        self.pause_file = pause_file
        env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid())}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, env=env)
        self.events: Queue[TrainerEvent] = Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("{"):
                continue  # not an event: e.g. the FSDP launcher's own output
            try:
                self.events.put(parse_event(line))
            except ValueError as exc:
                log.warning("skipping a trainer line that is not a known event (%s): %s", exc, line[:200])

    def next_event(self, timeout: float) -> TrainerEvent | None:
        """The next event, or None after ``timeout`` seconds without one."""
        try:
            return self.events.get(timeout=timeout)
        except Empty:
            return None

    def finished(self) -> bool:
        """The process has exited and every line it printed has been taken."""
        return self.proc.poll() is not None and not self._reader.is_alive() and self.events.empty()

    def request_pause(self) -> None:
        """Ask the trainer to save a checkpoint at its next step boundary and exit."""
        self.pause_file.touch()

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
        """Join the reader and close the log (after :meth:`stop` or a normal exit)."""
        self._reader.join(timeout=5)
        self._log.close()
