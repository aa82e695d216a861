"""Database sessions: read-only requests on PostgreSQL read in autocommit (no BEGIN/COMMIT round
trips); on SQLite they keep their transaction."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg.pq import TransactionStatus
from sqlalchemy import Engine, select

from loraforge.db.models import Organization
from loraforge.db.session import (
    ReadOnlySessionError,
    make_engine,
    make_read_sessionmaker,
    make_sessionmaker,
    migrate,
)
from loraforge.ids import now
from loraforge.settings import Settings
from tests.postgres import fresh_database


def test_sqlite_requests_keep_their_transaction(tmp_path: Path) -> None:
    engine = make_engine(Settings(home=tmp_path / "home"))
    try:
        assert make_read_sessionmaker(engine) is None  # one snapshot per request, no round trips
    finally:
        engine.dispose()


@pytest.fixture
def pg_engine(tmp_path: Path) -> Iterator[Engine]:
    with fresh_database() as url:
        settings = Settings(home=tmp_path / "home", database_url=url)
        migrate(settings)
        engine = make_engine(settings)
        try:
            yield engine
        finally:
            engine.dispose()


def _status(session: object) -> TransactionStatus:
    dbapi = session.connection().connection.dbapi_connection  # type: ignore[attr-defined]
    return TransactionStatus(dbapi.info.transaction_status)


@pytest.mark.slow
def test_postgresql_reads_run_in_autocommit_and_refuse_writes(pg_engine: Engine) -> None:
    reads = make_read_sessionmaker(pg_engine)
    assert reads is not None
    with make_sessionmaker(pg_engine)() as session:
        session.execute(select(Organization)).all()
        assert _status(session) == TransactionStatus.INTRANS  # BEGIN was sent, COMMIT will be
    with reads() as session:
        session.execute(select(Organization)).all()
        assert _status(session) == TransactionStatus.IDLE  # no transaction: nothing to end
        session.add(Organization(id="org-ro", name="ro", tier="trial", created_at=now()))
        with pytest.raises(ReadOnlySessionError):
            session.flush()
    with make_sessionmaker(pg_engine)() as session:
        written = session.execute(select(Organization).where(Organization.id == "org-ro")).first()
        assert written is None  # nothing was written
