"""The hosted-model limit holds under real concurrency: five job creations by a trial org at the
same instant, each in its own thread, session and connection, on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from loraforge.catalog import load_catalog
from loraforge.db.models import FileRecord, Job
from loraforge.db.session import make_engine, make_sessionmaker, migrate, session_scope
from loraforge.errors import InvalidRequestError
from loraforge.ids import new_id, now
from loraforge.jobs import service
from loraforge.jobs.params import JobCreateParams
from loraforge.orgs import get_or_create_org
from loraforge.settings import Settings
from tests.conftest import TEST_POOLS, RecordingDispatcher
from tests.postgres import fresh_database

CREATORS = 5


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def db_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "sqlite":
        yield Settings(home=tmp_path / "home", train_pools=TEST_POOLS)
        return
    with fresh_database() as url:
        yield Settings(home=tmp_path / "home", database_url=url, train_pools=TEST_POOLS)


def test_five_simultaneous_creations_by_a_trial_org_make_one_job(db_settings: Settings) -> None:
    migrate(db_settings)
    engine = make_engine(db_settings)
    sessions = make_sessionmaker(engine)
    catalog = load_catalog(db_settings.models_config)
    with session_scope(sessions) as session:
        org = get_or_create_org(session, "race-org", "trial")
        file_id = new_id("file-")
        session.add(
            FileRecord(
                id=file_id,
                org_id=org.id,
                filename="t.jsonl",
                purpose="fine-tune",
                bytes=10,
                created_at=now(),
                status="processed",
                storage_key=f"files/{org.id}/{file_id}",
            )
        )
    params = JobCreateParams(model="loraforge/tiny-llama", training_file=file_id)
    barrier = threading.Barrier(CREATORS)
    outcomes: list[str] = []

    def create() -> None:
        with sessions() as session:
            barrier.wait()
            try:
                service.create_job(session, catalog, db_settings, org, params, RecordingDispatcher())
                outcomes.append("created")
            except InvalidRequestError as exc:
                session.rollback()
                outcomes.append(exc.code or "?")
            except Exception as exc:  # a database error would be a 500: report it
                session.rollback()
                outcomes.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=create) for _ in range(CREATORS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with sessions() as session:
        stored = session.execute(select(func.count()).select_from(Job)).scalar_one()
    engine.dispose()
    assert sorted(outcomes) == ["created"] + ["hosted_model_limit_reached"] * (CREATORS - 1), outcomes
    assert stored == 1
