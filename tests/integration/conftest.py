"""A live loraforge (``loraforge serve``: API + Celery worker + engine as real processes) per
backend: the embedded default (SQLite + filesystem broker + a local blob folder) and the scale-out
one, what a cluster runs: PostgreSQL + Redis + an S3 object store (moto's server, started by the
tests on a loopback port). Without PostgreSQL or Redis on 127.0.0.1 the scale-out stack keeps
SQLite and the filesystem broker but still stores everything in S3, so the object store is always
covered."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.helpers import CITIES, to_jsonl, tool_call_examples
from tests.net import free_port, reachable
from tests.postgres import create_database
from tests.s3 import S3Server

REDIS_URL = os.environ.get("LORAFORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
START_TIMEOUT = 180


@dataclass
class Stack:
    """A running ``loraforge serve`` and how to reach it."""

    # "embedded" (SQLite + filesystem broker + local folder), or the scale-out stack:
    # "postgres-redis-s3", or "sqlite-filesystem-s3" where PostgreSQL or Redis is missing.
    backend: str
    home: Path
    env: dict[str, str]
    api_url: str
    engine_url: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"{self.api_url}/v1"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "loraforge", *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def key(self, org: str, tier: str | None = None) -> str:
        """An API key for ``org`` (created once per stack), from ``loraforge keys create``."""
        if org not in self.keys:
            args = ["keys", "create", "--org", org] + (["--tier", tier] if tier else [])
            self.keys[org] = self.cli(*args).stdout.strip().splitlines()[-1]
        return self.keys[org]

    def log_tail(self, n: int = 80) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def _wait_healthy(stack: Stack) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert stack.proc is not None
        if stack.proc.poll() is not None:
            pytest.fail(f"loraforge serve exited early:\n{stack.log_tail()}")
        try:
            if (
                httpx.get(f"{stack.api_url}/health", timeout=2).status_code == 200
                and httpx.get(f"{stack.engine_url}/health", timeout=2).status_code == 200
            ):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"loraforge serve not healthy after {START_TIMEOUT}s:\n{stack.log_tail()}")


def start_stack(home: Path, extra_env: dict[str, str], backend: str = "embedded") -> Stack:
    api_port, engine_port = free_port(), free_port()
    env = {
        **os.environ,
        "LORAFORGE_HOME": str(home),
        "LORAFORGE_API_PORT": str(api_port),
        "LORAFORGE_ENGINE_PORT": str(engine_port),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # Short webhook back-off so retry tests take seconds, not minutes.
        "LORAFORGE_WEBHOOK_RETRY_BASE_SECONDS": "0.5",
        # The tests' webhook receivers listen on 127.0.0.1, which is refused unless allowed.
        "LORAFORGE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        # Expired uploads and files swept within a second or so, not a minute.
        "LORAFORGE_STORAGE_SWEEP_SECONDS": "1",
        # Jobs with a W&B integration log to offline run files (no network in CI).
        "WANDB_MODE": "offline",
        **extra_env,
    }
    log_path = home / "serve.log"
    home.mkdir(parents=True, exist_ok=True)
    stack = Stack(
        backend, home, env, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{engine_port}", log_path
    )
    with log_path.open("wb") as log:
        stack.proc = subprocess.Popen(
            [sys.executable, "-m", "loraforge", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    _wait_healthy(stack)
    return stack


def only_embedded(stack: Stack) -> None:
    """Skip on the scale-out stack: for tests whose subject does not depend on the backend."""
    if stack.backend != "embedded":
        pytest.skip("backend-independent; runs on the embedded stack only")


def stop_stack(stack: Stack) -> None:
    if stack.proc and stack.proc.poll() is None:
        stack.proc.terminate()
        try:
            stack.proc.wait(30)
        except subprocess.TimeoutExpired:
            stack.proc.kill()


def scale_out_env(s3: S3Server) -> tuple[str, dict[str, str], Callable[[], None] | None]:
    """The scale-out backend's settings: S3 always; PostgreSQL and Redis when they answer.

    Returns:
        The backend's name, its environment and a clean-up function (None: nothing to clean).
    """
    env = {**s3.env, "LORAFORGE_STORAGE_URL": s3.new_url("stack")}
    db = create_database() if reachable("127.0.0.1", 6379) else None
    if db is None:
        return "sqlite-filesystem-s3", env, None
    url, cleanup = db
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    return (
        "postgres-redis-s3",
        {**env, "LORAFORGE_DATABASE_URL": url, "LORAFORGE_BROKER_URL": REDIS_URL},
        cleanup,
    )


@pytest.fixture(scope="session", params=["embedded", "scale-out"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The live service, once per backend."""
    extra: dict[str, str] = {}
    cleanup = None
    backend = "embedded"
    if request.param == "scale-out":
        backend, extra, cleanup = scale_out_env(request.getfixturevalue("s3_server"))
    stack = start_stack(tmp_path_factory.mktemp(f"home-{request.param}"), extra, backend)
    try:
        yield stack
    finally:
        stop_stack(stack)
        if cleanup:
            cleanup()


# ---------------------------------------------------------------- a tool-calling fine-tune
# Five cities, each example twice: 10 lines, 5 steps per epoch at batch size 2. With the tiny
# model's full learning rate (5e-3, constant) the loss oscillates between 1e-3 and 1 for hundreds of
# steps; at half of it the train loss is ~1e-4 by step 125 and stays there (seed 42, measured on
# this machine kind with the trainer in process), so 200 steps leave a margin.
TOOL_CITIES = CITIES[:5]
TOOL_HYPERPARAMETERS = {"n_epochs": 40, "batch_size": 2, "learning_rate_multiplier": 0.5}
# About 30 s on a quiet 2-core machine; a loaded one takes minutes.
TOOL_JOB_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def tool_model(stack: Stack) -> tuple[OpenAI, str]:
    """A tool-calling fine-tune of the tiny model (``tests/integration/test_tool_calling.py``),
    trained once per session for org ``toolsmith``: the SDK client and the model's name."""
    only_embedded(stack)
    client = OpenAI(base_url=stack.base_url, api_key=stack.key("toolsmith"), max_retries=0, timeout=120)
    data = to_jsonl(tool_call_examples(TOOL_CITIES) * 2)
    uploaded = client.files.create(file=("weather.jsonl", io.BytesIO(data)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="loraforge/tiny-llama",
        training_file=uploaded.id,
        suffix="weather",
        seed=42,
        hyperparameters=TOOL_HYPERPARAMETERS,
    )
    start = time.monotonic()
    while job.status not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() - start > TOOL_JOB_TIMEOUT_S:
            pytest.fail(f"job still {job.status} after {TOOL_JOB_TIMEOUT_S} s\n{stack.log_tail()}")
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", f"{job.error}\n{stack.log_tail()}"
    # No pre-flight warning: the tools are rendered and the calls trained.
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert not [e for e in events if e.level == "warn"], [e.message for e in events]
    return client, job.fine_tuned_model
