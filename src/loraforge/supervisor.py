"""``loraforge serve``'s supervisor: runs the engine, the worker and the API as child processes and
keeps them running.

* A child that exits is started again after a back-off: 1 s, doubling up to 30 s; a child that
  had been up for a minute starts over at 1 s. The others keep running, so the API answers while
  a killed worker comes back (the reaper then re-queues its job, which resumes from its
  checkpoint).
* A child that crashes 5 times within 60 s is crash-looping (a bad setting, a port in use, a
  broken driver): restarting it again would hide the problem, so the supervisor stops every child
  and exits 1 with a message naming it and the last lines of its output.
* SIGTERM or SIGINT stops every child with SIGTERM (the worker hands its running jobs back, to
  resume from their checkpoints), waits for them, and kills what is left after a grace period.

Each child's output (stdout and stderr) goes to the console, each line prefixed with the child's
name, and to ``<logs_dir>/<name>.log`` (rotated at 10 MB, 3 old files kept), so the lines a
crashed child printed last can still be read after the console scrolled. Children run in their
own session, so a Ctrl-C in the terminal reaches the supervisor only and the stop is orderly; they
stop when the supervisor dies however it dies (:func:`follow_supervisor`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import IO, Protocol

# The children know their supervisor by this variable (:func:`follow_supervisor`).
SUPERVISOR_PID_ENV = "LORAFORGE_SUPERVISOR_PID"
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3
TAIL_LINES = 30


@dataclass(frozen=True)
class RestartPolicy:
    """When to start a child that exited again, and when to give up on it."""

    first_delay: float = 1.0
    max_delay: float = 30.0
    # A child that ran this long was healthy: its next crash waits ``first_delay`` again.
    stable_after: float = 60.0
    # This many exits within ``crash_window`` seconds is a crash loop: stop everything.
    crash_limit: int = 5
    crash_window: float = 60.0


class CrashHistory:
    """One child's recent crashes and its next back-off (pure: times are passed in)."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.crashes: deque[float] = deque()
        self.next_delay = policy.first_delay

    def crashed(self, at: float, uptime: float) -> float | None:
        """Record an exit at ``at`` after ``uptime`` seconds of running.

        Args:
            at: when it exited (monotonic seconds).
            uptime: how long it had been running.

        Returns:
            Seconds to wait before starting it again, or None when it is crash-looping.
        """
        policy = self.policy
        if uptime >= policy.stable_after:
            self.next_delay = policy.first_delay
        self.crashes.append(at)
        while self.crashes and self.crashes[0] < at - policy.crash_window:
            self.crashes.popleft()
        if len(self.crashes) >= policy.crash_limit:
            return None
        delay = self.next_delay
        self.next_delay = min(delay * 2, policy.max_delay)
        return delay


class Process(Protocol):
    """What the supervisor needs of a child process (``subprocess.Popen``; fakes in tests)."""

    pid: int
    returncode: int | None
    stdout: IO[bytes] | None

    def poll(self) -> int | None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...


@dataclass(frozen=True)
class ChildSpec:
    """A child to keep running: its name, command line and full environment."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]


def spawn_process(spec: ChildSpec) -> Process:
    """Start ``spec`` with its output piped to the supervisor, in a session of its own."""
    env = {**spec.env, SUPERVISOR_PID_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        list(spec.argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )


def describe_exit(code: int) -> str:
    """``code 3`` or ``signal SIGKILL`` (Popen's negative return codes)."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


class ChildOutput:
    """Copies a child's output lines to the console and its log file; keeps the last few."""

    def __init__(self, name: str, log_path: Path, console: IO[str]) -> None:
        self.name = name
        self.log_path = log_path
        self.console = console
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = RotatingFileHandler(log_path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS)
        self._file.setFormatter(logging.Formatter("%(message)s"))
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        """Record one line (without its newline)."""
        with self._lock:
            self.tail.append(text)
            self._file.handle(logging.makeLogRecord({"msg": text, "args": None}))
            try:
                self.console.write(f"{self.name:<6} | {text}\n")
                self.console.flush()
            except (OSError, ValueError):
                pass  # a closed console must not stop the log file

    def pump(self, stream: Iterable[bytes]) -> None:
        """Read ``stream`` to its end (run in a thread per child process)."""
        for raw in stream:
            self.line(raw.decode("utf-8", "replace").rstrip("\n"))

    def close(self) -> None:
        self._file.close()


@dataclass
class _Child:
    spec: ChildSpec
    output: ChildOutput
    history: CrashHistory
    proc: Process | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    pump: threading.Thread | None = field(default=None, repr=False)


class Supervisor:
    """Keeps ``specs`` running until :meth:`request_stop` or a crash loop (module docstring).

    Args:
        specs: the children, started in this order.
        logs_dir: where ``<name>.log`` files go.
        policy: back-off and crash-loop limits.
        spawn: starts one child (tests pass fakes).
        clock: monotonic seconds.
        sleep: waits between checks.
        console: where children's lines and the supervisor's messages go.
        stop_grace: seconds children get to exit after SIGTERM before SIGKILL.
        tick: seconds between checks of the children.
        on_exit: called with a child's name and pid after it exits (e.g. metrics clean-up).
    """

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        *,
        logs_dir: Path,
        policy: RestartPolicy | None = None,
        spawn: Callable[[ChildSpec], Process] = spawn_process,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        console: IO[str] | None = None,
        stop_grace: float = 30.0,
        tick: float = 0.1,
        on_exit: Callable[[str, int], None] | None = None,
    ) -> None:
        policy = policy or RestartPolicy()
        self.console = console or sys.stderr
        self._children = [
            _Child(
                spec,
                ChildOutput(spec.name, logs_dir / f"{spec.name}.log", self.console),
                CrashHistory(policy),
            )
            for spec in specs
        ]
        self._spawn, self._clock, self._sleep = spawn, clock, sleep
        self._stop = threading.Event()
        self.stop_grace, self.tick, self._on_exit = stop_grace, tick, on_exit
        # What ended the run: None (asked to stop) or the crash-looping child's name.
        self.failed: str | None = None

    def request_stop(self) -> None:
        """Stop every child and return from :meth:`run` (safe from a signal handler)."""
        self._stop.set()

    def pids(self) -> dict[str, int]:
        """The running children's pids by name."""
        return {c.spec.name: c.proc.pid for c in self._children if c.proc is not None}

    def say(self, text: str) -> None:
        """A line from the supervisor itself."""
        try:
            self.console.write(f"serve  | {text}\n")
            self.console.flush()
        except (OSError, ValueError):
            pass

    def _start(self, child: _Child) -> None:
        child.proc = self._spawn(child.spec)
        child.started_at = self._clock()
        if child.proc.stdout is not None:
            child.pump = threading.Thread(
                target=child.output.pump,
                args=(child.proc.stdout,),
                name=f"serve-{child.spec.name}",
                daemon=True,
            )
            child.pump.start()

    def _reap(self, child: _Child, code: int) -> None:
        """The child's process has exited: collect the rest of its output."""
        assert child.proc is not None
        pid = child.proc.pid
        if child.pump is not None:
            child.pump.join(timeout=2)
        child.proc, child.pump = None, None
        if self._on_exit is not None:
            self._on_exit(child.spec.name, pid)

    def _check(self, child: _Child) -> bool:
        """Start a due restart, or handle an exit; False when the child is crash-looping."""
        now = self._clock()
        if child.proc is None:
            if now >= child.restart_at:
                self.say(f"starting {child.spec.name} again")
                self._start(child)
            return True
        code = child.proc.poll()
        if code is None:
            return True
        self._reap(child, code)
        delay = child.history.crashed(now, now - child.started_at)
        if delay is None:
            self.failed = child.spec.name
            self._crash_loop_message(child, code)
            return False
        self.say(
            f"{child.spec.name} exited with {describe_exit(code)}; restarting it in {delay:g} s "
            f"({len(child.history.crashes)} exit(s) in the last {child.history.policy.crash_window:g} s)"
        )
        child.restart_at = now + delay
        return True

    def _crash_loop_message(self, child: _Child, code: int) -> None:
        policy = child.history.policy
        lines = list(child.output.tail)[-15:]
        self.say(
            f"{child.spec.name} exited {len(child.history.crashes)} times within "
            f"{policy.crash_window:g} s (last: {describe_exit(code)}); stopping everything. The last "
            f"lines of its output ({child.output.log_path}):"
        )
        for text in lines or ["(no output)"]:
            self.say(f"  {text}")

    def run(self) -> int:
        """Start every child and supervise them.

        Returns:
            0 after a requested stop, 1 when a child was crash-looping.
        """
        for child in self._children:
            self._start(child)
        code = 0
        while not self._stop.is_set():
            if not all(self._check(child) for child in self._children):
                code = 1
                break
            self._sleep(self.tick)
        self.stop_all()
        return code

    def stop_all(self) -> None:
        """SIGTERM every running child, wait up to ``stop_grace``, then SIGKILL what is left."""
        running = [c for c in self._children if c.proc is not None and c.proc.poll() is None]
        for child in running:
            assert child.proc is not None
            try:
                child.proc.terminate()
            except ProcessLookupError:
                pass
        deadline = self._clock() + self.stop_grace
        for child in running:
            assert child.proc is not None
            try:
                child.proc.wait(max(0.1, deadline - self._clock()))
            except subprocess.TimeoutExpired:
                self.say(f"{child.spec.name} did not stop within {self.stop_grace:g} s; killing it")
                child.proc.kill()
                child.proc.wait()
        for child in self._children:
            if child.proc is not None:
                self._reap(child, child.proc.poll() or 0)
            child.output.close()


def follow_supervisor() -> None:
    """In a child of ``serve``: get SIGTERM when the supervisor dies, however it dies.

    Linux's ``PR_SET_PDEATHSIG``; elsewhere a no-op (the children then outlive a killed ``serve``).
    Does nothing outside ``serve`` (no :data:`SUPERVISOR_PID_ENV`).
    """
    parent = os.environ.get(SUPERVISOR_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(parent):  # it died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
