"""Several loraforge machines on one box: each process (``loraforge api``, ``worker``, ``engine``)
on its own home, sharing only the database, the broker and the object store -- as separate
machines would. PostgreSQL + Redis when they answer on 127.0.0.1; otherwise one SQLite file and
the filesystem broker in a shared folder. The object store is always S3 (moto, ``tests/s3.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.net import free_port, reachable
from tests.postgres import create_database
from tests.s3 import S3Server

TINY = "loraforge/tiny-llama"
# The same fixed pool for the API and every worker (as a deployment sets it).
POOLS = json.dumps([{"name": "cpu", "device": "cpu", "count": 1, "memory_gib": 16}])


@dataclass
class Cluster:
    """Shared settings and the processes started on their own homes."""

    root: Path
    env: dict[str, str]
    backend: str
    cleanup: Callable[[], None] | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    api_url: str = ""
    engine_url: str = ""

    def home(self, name: str) -> Path:
        return self.root / name

    def start(self, name: str, *args: str, extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """``loraforge ARGS`` on the home ``root/name`` (its log: ``root/name.log``)."""
        home = self.home(name)
        home.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "LORAFORGE_HOME": str(home), **(extra or {})}
        with (self.root / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "loraforge", *args], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.procs[name] = proc
        return proc

    def start_worker(self, name: str, extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.start(name, "worker", extra=extra)

    def kill(self, name: str) -> None:
        """SIGKILL the process (a machine that dies) and wait for it."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(20)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def key(self, org: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "loraforge", "keys", "create", "--org", org],
            env={**self.env, "LORAFORGE_HOME": str(self.home("admin"))},
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return done.stdout.strip().splitlines()[-1]

    def wait_healthy(self, url: str, name: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                pytest.fail(f"{name} exited early:\n{self.log(name)[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        pytest.fail(f"{name} not healthy after {timeout}s:\n{self.log(name)[-3000:]}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.cleanup:
            self.cleanup()


# A Redis database of its own: the session's scale-out stack (``conftest.REDIS_URL``) keeps running
# beside a cluster, and its worker would take the cluster's tasks from a shared queue.
CLUSTER_REDIS_URL = os.environ.get("LORAFORGE_TEST_CLUSTER_REDIS_URL", "redis://127.0.0.1:6379/10")


def make_cluster(root: Path, s3: S3Server, *, need_redis: bool = False, **settings: str) -> Cluster:
    """Shared settings for the machines, with a short lease so a dead host is noticed in seconds.

    Args:
        root: a fresh folder (homes and logs go under it).
        s3: the object store.
        need_redis: skip unless Redis answers on 127.0.0.1:6379.
        settings: more ``LORAFORGE_*`` variables (name without the prefix, lower case).
    """
    engine_port = free_port()
    env = {
        **os.environ,
        **s3.env,
        "LORAFORGE_STORAGE_URL": s3.new_url("cluster"),
        "LORAFORGE_TRAIN_POOLS": POOLS,
        "LORAFORGE_ENGINES": json.dumps({TINY: [f"http://127.0.0.1:{engine_port}"]}),
        "LORAFORGE_ENGINE_PORT": str(engine_port),
        "LORAFORGE_ENGINE_API_KEY": "cluster-engine-key",
        "LORAFORGE_HEARTBEAT_SECONDS": "1",
        "LORAFORGE_LEASE_TIMEOUT_SECONDS": "6",
        "LORAFORGE_REAPER_INTERVAL_SECONDS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **{f"LORAFORGE_{name.upper()}": value for name, value in settings.items()},
    }
    redis_up = reachable("127.0.0.1", 6379)
    if need_redis and not redis_up:
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    db = create_database() if redis_up else None
    cleanup = None
    if redis_up:
        import redis

        redis.Redis.from_url(CLUSTER_REDIS_URL).flushdb()
        env["LORAFORGE_BROKER_URL"] = CLUSTER_REDIS_URL
    if db is not None:
        env["LORAFORGE_DATABASE_URL"], cleanup = db
    else:
        (root / "shared").mkdir(parents=True, exist_ok=True)
        env["LORAFORGE_DATABASE_URL"] = f"sqlite:///{root / 'shared' / 'loraforge.sqlite'}"
        if not redis_up:
            env["LORAFORGE_BROKER_URL"] = f"filesystem://{root / 'shared' / 'broker'}"
    backend = ("postgres" if db else "sqlite") + ("-redis" if redis_up else "-filesystem") + "-s3"
    cluster = Cluster(root, env, backend, cleanup)
    cluster.engine_url = f"http://127.0.0.1:{engine_port}"
    return cluster


def start_api_and_engine(cluster: Cluster) -> None:
    """The API and the engine, each on its own home (the engine has never seen an adapter)."""
    port = free_port()
    cluster.api_url = f"http://127.0.0.1:{port}"
    cluster.start("api", "api", "--port", str(port))
    cluster.start("engine", "engine")
    cluster.wait_healthy(cluster.api_url, "api")
    cluster.wait_healthy(cluster.engine_url, "engine")


def wipe(path: Path) -> None:
    """A host's disk is gone."""
    shutil.rmtree(path, ignore_errors=True)
