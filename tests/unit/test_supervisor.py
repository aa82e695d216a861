"""``loraforge serve``'s supervisor with fake processes and a fake clock: restarts with back-off,
the crash-loop stop and its message, the per-child logs, the stop; and the worker's side of a
stop (its running job is handed back to the queue)."""

from __future__ import annotations

import io
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.models import Job, JobEvent
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.settings import Settings
from loraforge.supervisor import ChildSpec, CrashHistory, RestartPolicy, Supervisor, describe_exit
from loraforge.worker import training
from tests.unit.test_worker_training import HYPERPARAMETERS, queued_job


def test_back_off_doubles_to_thirty_seconds_and_resets_after_a_healthy_run() -> None:
    history = CrashHistory(RestartPolicy(crash_limit=100))
    delays = [history.crashed(at=100.0 * i, uptime=0.5) for i in range(7)]
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert history.crashed(at=800.0, uptime=61.0) == 1  # it had been up a minute: start over
    assert history.crashed(at=900.0, uptime=2.0) == 2


def test_five_crashes_within_sixty_seconds_is_a_crash_loop() -> None:
    history = CrashHistory(RestartPolicy())
    assert [history.crashed(at=t, uptime=1.0) for t in (0, 2, 5, 10)] == [1, 2, 4, 8]
    assert history.crashed(at=59.0, uptime=1.0) is None
    spread = CrashHistory(RestartPolicy())
    # The same five exits over more than a minute are not a loop: the oldest falls out of the window.
    assert None not in [spread.crashed(at=t, uptime=1.0) for t in (0, 20, 40, 60, 61)]


def test_exit_descriptions() -> None:
    assert (describe_exit(3), describe_exit(-9), describe_exit(-15)) == (
        "code 3",
        "signal SIGKILL",
        "signal SIGTERM",
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeProcess:
    """Runs until ``lifetime`` fake seconds have passed (None: until stopped), printing ``lines``."""

    pids = iter(range(1000, 10**6))

    def __init__(self, clock: FakeClock, lifetime: float | None, code: int, lines: list[str]) -> None:
        self.pid = next(self.pids)
        self.clock, self.code = clock, code
        self.dies_at = None if lifetime is None else clock.now + lifetime
        self.returncode: int | None = None
        self.stdout = io.BytesIO("".join(f"{line}\n" for line in lines).encode())
        self.terminated = False

    def poll(self) -> int | None:
        if self.returncode is None and self.dies_at is not None and self.clock.now >= self.dies_at:
            self.returncode = self.code
        return self.returncode

    def terminate(self) -> None:
        self.terminated = True
        self.returncode = -15

    def kill(self) -> None:
        self.returncode = -9

    def wait(self, timeout: float | None = None) -> int:
        assert self.returncode is not None
        return self.returncode


def supervise(
    tmp_path: Path, plan: dict[str, Callable[[int], FakeProcess]], clock: FakeClock, until: float
) -> tuple[Supervisor, dict[str, list[FakeProcess]], io.StringIO, int]:
    """Run a supervisor over fake children until fake time ``until`` (or a crash loop)."""
    started: dict[str, list[FakeProcess]] = {name: [] for name in plan}

    def spawn(spec: ChildSpec) -> FakeProcess:
        proc = plan[spec.name](len(started[spec.name]))
        started[spec.name].append(proc)
        return proc

    console = io.StringIO()
    specs = [ChildSpec(name, ["loraforge", name], {}) for name in plan]
    supervisor = Supervisor(
        specs,
        logs_dir=tmp_path / "logs",
        spawn=spawn,
        clock=clock,
        sleep=clock.sleep,
        console=console,
        tick=0.1,
    )

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now >= until:
            supervisor.request_stop()

    supervisor._sleep = sleep
    code = supervisor.run()
    return supervisor, started, console, code


def test_a_killed_child_is_restarted_with_back_off_while_the_others_keep_running(tmp_path: Path) -> None:
    clock = FakeClock()
    plan = {
        "engine": lambda n: FakeProcess(clock, None, 0, ["engine ready"]),
        # The worker is killed three times, a second after each start, then stays up.
        "worker": lambda n: FakeProcess(clock, 1.0 if n < 3 else None, -9, [f"worker run {n}"]),
        "api": lambda n: FakeProcess(clock, None, 0, ["api ready"]),
    }
    supervisor, started, console, code = supervise(tmp_path, plan, clock, until=30.0)
    assert code == 0 and supervisor.failed is None
    assert len(started["engine"]) == len(started["api"]) == 1  # never restarted, never stopped early
    starts = [proc.dies_at for proc in started["worker"][:3]]
    # Started at 0, killed at 1, restarted 1 s later (2), killed at 3, restarted 2 s later (5)...
    # (each within a check interval of 0.1 s)
    assert [s - 1.0 for s in starts if s is not None] == pytest.approx([0.0, 2.0, 5.0], abs=0.25)
    assert len(started["worker"]) == 4
    text = console.getvalue()
    assert "worker exited with signal SIGKILL; restarting it in 1 s" in text
    assert "restarting it in 4 s" in text
    assert "worker | worker run 3" in text and "api    | api ready" in text
    # Each child's lines are also in its own log file; the stop reached every running child.
    assert (tmp_path / "logs" / "worker.log").read_text().splitlines() == [
        f"worker run {n}" for n in range(4)
    ]
    assert all(procs[-1].terminated for procs in started.values())


def test_a_crash_looping_child_stops_everything_with_its_last_lines(tmp_path: Path) -> None:
    clock = FakeClock()
    plan = {
        "engine": lambda n: FakeProcess(clock, 0.2, 3, ["loading", f"error: port 8100 is in use ({n})"]),
        "worker": lambda n: FakeProcess(clock, None, 0, []),
        "api": lambda n: FakeProcess(clock, None, 0, []),
    }
    supervisor, started, console, code = supervise(tmp_path, plan, clock, until=600.0)
    assert code == 1 and supervisor.failed == "engine"
    assert len(started["engine"]) == 5 and clock.now < 60  # 0.2 + 1 + 2 + 4 + 8 s of back-off
    text = console.getvalue()
    assert "engine exited 5 times within 60 s (last: code 3); stopping everything" in text
    assert str(tmp_path / "logs" / "engine.log") in text
    assert "serve  |   error: port 8100 is in use (4)" in text
    assert started["worker"][0].terminated and started["api"][0].terminated


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    clock = FakeClock()

    class Stubborn(FakeProcess):
        def terminate(self) -> None:
            self.terminated = True

        def wait(self, timeout: float | None = None) -> int:
            if self.returncode is None:
                import subprocess

                raise subprocess.TimeoutExpired("x", timeout or 0)
            return self.returncode

    plan = {"worker": lambda n: Stubborn(clock, None, 0, [])}
    supervisor, started, console, code = supervise(tmp_path, plan, clock, until=1.0)
    assert code == 0 and started["worker"][0].returncode == -9
    assert "did not stop within 30 s; killing it" in console.getvalue()


# ---------------------------------------------------------------- the worker when it is stopped


@pytest.fixture
def sessions(settings: Settings, api: TestClient) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)  # the api fixture has migrated the database
    yield make_sessionmaker(engine)
    engine.dispose()


def test_a_stopping_worker_hands_its_running_job_back_to_the_queue(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    script = tmp_path / "fake-trainer"  # says hello, then trains "forever"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{HYPERPARAMETERS}\nEOF\nexec sleep 600\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    _, job_id = queued_job(api, make_key("stop-org"), sessions)
    fast = settings.model_copy(update={"trainer_python": str(script), "cancel_poll_seconds": 0.05})
    requeued: list[str] = []
    runner = threading.Thread(
        target=training.run_training, args=(fast, sessions, job_id, None, requeued.append)
    )
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while status(sessions, job_id) != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status(sessions, job_id) == "running"
        training.begin_shutdown()  # what Celery's worker_shutting_down signal calls on SIGTERM
        runner.join(timeout=20)
        assert not runner.is_alive()
    finally:
        training._shutting_down.clear()
    assert status(sessions, job_id) == "queued" and requeued == [job_id]
    with session_scope(sessions) as session:
        last = session.execute(
            select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.seq.desc())
        ).scalars()
        assert "is shutting down; re-queued to resume from its last checkpoint" in next(iter(last))


def status(sessions: sessionmaker[Session], job_id: str) -> str:
    with session_scope(sessions) as session:
        return session.execute(select(Job.status).where(Job.id == job_id)).scalar_one()


@pytest.fixture(autouse=True)
def _no_leftover_shutdown() -> None:
    assert not training._shutting_down.is_set()


def test_serve_host_and_port_reach_the_api_child_and_the_banner(  # type: ignore[no-untyped-def]
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from loraforge import cli, supervisor
    from loraforge.db import session as db_session

    started: list[list[ChildSpec]] = []

    class Recorder:
        def __init__(self, specs: list[ChildSpec], **_: object) -> None:
            started.append(list(specs))

        def request_stop(self) -> None: ...

        def run(self) -> int:
            return 0

    monkeypatch.setenv("LORAFORGE_HOME", str(settings.home))
    monkeypatch.setenv("LORAFORGE_TRAIN_POOLS", '[{"name": "cpu", "device": "cpu", "memory_gib": 8}]')
    # serve writes the flags into its environment for the children: restored after the test.
    monkeypatch.setenv("LORAFORGE_API_HOST", "127.0.0.1")
    monkeypatch.setenv("LORAFORGE_API_PORT", "8000")
    monkeypatch.setattr(db_session, "migrate", lambda _settings: None)
    monkeypatch.setattr(supervisor, "Supervisor", Recorder)
    cli.get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli.app, ["serve", "--host", "0.0.0.0", "--port", "8123"])
    finally:
        cli.get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    specs = {spec.name: spec for spec in started[0]}
    assert list(specs) == ["engine", "worker", "api"]
    assert (
        specs["api"].env["LORAFORGE_API_HOST"] == "0.0.0.0"
        and specs["api"].env["LORAFORGE_API_PORT"] == "8123"
    )
    assert "API on http://0.0.0.0:8123/v1" in result.output and "/readyz" in result.output
    assert f"logs in {settings.home / 'logs'}" in result.output
