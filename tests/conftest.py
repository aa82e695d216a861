"""Shared fixtures: an API app on a temporary home with a recording dispatcher."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from loraforge.api.app import create_app
from loraforge.db.session import make_engine, make_sessionmaker, migrate, session_scope
from loraforge.orgs import create_api_key, get_or_create_org
from loraforge.settings import Settings, TrainPool
from tests.s3 import S3Server, start_s3

REPO = Path(__file__).resolve().parents[1]


# What plain `pytest` leaves out; a path or a -m expression on the command line brings them back
# (`-m slow`, `-m integration`, `-m gpu`; `-m "not gpu"` is everything CI runs).
NOT_BY_DEFAULT = ("slow", "integration", "gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Make plain `pytest` the quick unit run, while `pytest tests/x/test_y.py` runs what it names."""
    if config.option.markexpr or config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return
    keep, drop = [], []
    for item in items:
        (drop if any(item.get_closest_marker(m) for m in NOT_BY_DEFAULT) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


class RecordingDispatcher:
    def __init__(self) -> None:
        self.validated: list[str] = []
        self.trained: list[str] = []
        self.train_pools: list[str] = []
        self.files_validated: list[str] = []
        self.batches: list[tuple[str, int]] = []

    def validate_job(self, job_id: str) -> None:
        self.validated.append(job_id)

    def train_job(self, job_id: str, pool: str) -> None:
        self.trained.append(job_id)
        self.train_pools.append(pool)

    def validate_file(self, file_id: str) -> None:
        self.files_validated.append(file_id)

    def run_batch(self, batch_id: str, token: int) -> None:
        self.batches.append((batch_id, token))


# Fixed worker pools, so what the memory planner accepts does not depend on the test machine
# (the default "auto" would detect its GPUs and RAM): one 80 GiB GPU and a 16 GiB CPU worker.
TEST_POOLS = [
    TrainPool(name="gpu", device="cuda", count=1, memory_gib=80),
    TrainPool(name="cpu", device="cpu", count=1, memory_gib=16),
]


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated to the newest schema once per run.

    Migrating a fresh database costs about 0.1 s and most unit tests start from one: each gets
    its own copy of this file instead (the app's own ``migrate`` then finds nothing to do).
    """
    template = Settings(home=tmp_path_factory.mktemp("migrated") / "home", database_url="")
    migrate(template)
    return template.home / "loraforge.sqlite"


@pytest.fixture
def settings(tmp_path: Path, migrated_sqlite: Path) -> Settings:
    settings = Settings(home=tmp_path / "home", max_upload_bytes=64 * 1024, train_pools=TEST_POOLS)
    if not settings.database_url:  # the embedded default: start from a copy of the migrated file
        settings.home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(migrated_sqlite, settings.home / "loraforge.sqlite")
    return settings


@pytest.fixture
def dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


def _error_has_code(response: httpx.Response) -> None:
    """Every error the API answers carries a ``code`` (checked on every response of the unit suite)."""
    if response.status_code < 400 or "json" not in response.headers.get("content-type", ""):
        return
    response.read()
    error = response.json().get("error")
    assert isinstance(error, dict) and error.get("code"), (
        f"{response.request.method} {response.request.url.path} answered {response.status_code} "
        f"without an error code: {response.text[:300]}"
    )


@pytest.fixture
def api(settings: Settings, dispatcher: RecordingDispatcher) -> Iterator[TestClient]:
    with TestClient(create_app(settings, dispatcher=dispatcher)) as client:
        client.event_hooks["response"].append(_error_has_code)
        yield client


@pytest.fixture
def make_key(settings: Settings):  # type: ignore[no-untyped-def]
    """``make_key(org)`` -> a bearer key for a new or existing organization."""
    migrate(settings)
    engine = make_engine(settings)

    def make(org: str, tier: str | None = None) -> str:
        with session_scope(make_sessionmaker(engine)) as session:
            return create_api_key(session, get_or_create_org(session, org, tier))

    yield make
    engine.dispose()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server on a loopback port, for the session (``tests/s3.py``)."""
    server = start_s3(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()
