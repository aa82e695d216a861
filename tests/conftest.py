"""Shared fixtures: an API app on a temporary home with a recording dispatcher."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loraforge.api.app import create_app
from loraforge.db.session import make_engine, make_sessionmaker, migrate, session_scope
from loraforge.orgs import create_api_key, get_or_create_org
from loraforge.settings import Settings, TrainPool

REPO = Path(__file__).resolve().parents[1]


class RecordingDispatcher:
    def __init__(self) -> None:
        self.validated: list[str] = []
        self.trained: list[str] = []
        self.train_pools: list[str] = []
        self.files_validated: list[str] = []

    def validate_job(self, job_id: str) -> None:
        self.validated.append(job_id)

    def train_job(self, job_id: str, pool: str) -> None:
        self.trained.append(job_id)
        self.train_pools.append(pool)

    def validate_file(self, file_id: str) -> None:
        self.files_validated.append(file_id)


# Fixed worker pools, so what the memory planner accepts does not depend on the test machine
# (the default "auto" would detect its GPUs and RAM): one 80 GiB GPU and a 16 GiB CPU worker.
TEST_POOLS = [
    TrainPool(name="gpu", device="cuda", count=1, memory_gib=80),
    TrainPool(name="cpu", device="cpu", count=1, memory_gib=16),
]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", max_upload_bytes=64 * 1024, train_pools=TEST_POOLS)


@pytest.fixture
def dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


@pytest.fixture
def api(settings: Settings, dispatcher: RecordingDispatcher) -> Iterator[TestClient]:
    with TestClient(create_app(settings, dispatcher=dispatcher)) as client:
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
