"""The trainer subprocess as the worker sees it: start, read its JSON lines, pause, stop.

Pause is a file (``spec.pause_file``) rather than a signal: a signal that arrives before Python
installs its handler kills the process, a file cannot be missed. Cancel is SIGTERM, then SIGKILL.
The trainer is told the worker's pid and dies with it (``loraforge.trainer.__main__``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from pathlib import Path
from queue import Empty, Queue
from typing import Any

log = logging.getLogger(__name__)

TERMINATE_GRACE_SECONDS = 8.0
PARENT_PID_ENV = "LORAFORGE_TRAINER_PARENT_PID"  # read by loraforge.trainer.__main__


class TrainerProcess:
    """``python -m loraforge.trainer SPEC`` and a thread that turns its stdout into messages."""

    def __init__(
        self, cmd: list[str], log_path: Path, pause_file: Path, env: dict[str, str] | None = None
    ) -> None:
        """Start ``cmd``; ``env`` is added to this process's environment (e.g. the leased GPUs)."""
        self._log = log_path.open("ab")
        self.pause_file = pause_file
        env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid())}
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
        """The next parsed line, or None after ``timeout`` seconds without one."""
        try:
            return self.messages.get(timeout=timeout)
        except Empty:
            return None

    def finished(self) -> bool:
        """The process has exited and every line it printed has been taken."""
        return self.proc.poll() is not None and not self._reader.is_alive() and self.messages.empty()

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
