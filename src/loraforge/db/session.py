"""Engine and session factory. SQLite gets WAL and a busy timeout: the API and the worker
processes write to the same file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from loraforge.settings import Settings


def make_engine(settings: Settings) -> Engine:
    """Create the SQLAlchemy engine for ``settings`` (creating the home directory if needed)."""
    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        settings.home.mkdir(parents=True, exist_ok=True)
        # No cap on connections (max_overflow=-1; ten are kept open): a request holds its
        # session's connection until its commit, which FastAPI runs after validating the response
        # on the thread pool. With a capped pool, under a burst every pool thread could be a route
        # waiting for a connection while the requests holding the connections wait for a thread:
        # a stall until the 30 s pool timeout, then 500s (seen at 200 rps in bench/api_load.py).
        # A SQLite connection is a file handle.
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            pool_size=10,
            max_overflow=-1,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # The same stall as above is possible past pool_size + max_overflow requests in flight; a
    # PostgreSQL connection is a server process, so the cap stays (50 per process).
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=40)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


class ReadOnlySessionError(RuntimeError):
    """A session made for a read-only request tried to write (a programming error)."""


def make_read_sessionmaker(engine: Engine) -> sessionmaker[Session] | None:
    """Sessions for requests that only read, on PostgreSQL; None elsewhere.

    They run in autocommit: no ``BEGIN`` and ``COMMIT`` round trips around the request's
    queries, and nothing to commit afterwards, so the request needs no thread for it. Under READ
    COMMITTED, PostgreSQL's default, each statement sees its own snapshot inside a transaction
    too: the reads see the same data. On SQLite a transaction is what gives a request's
    statements one snapshot, and it costs no round trip: None, the usual sessions are used.
    A flush in one of these sessions raises :class:`ReadOnlySessionError` (it would commit
    statement by statement).
    """
    if engine.dialect.name != "postgresql":
        return None
    factory = sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)

    @event.listens_for(factory, "before_flush")
    def _refuse_writes(session: Session, _context: Any, _instances: Any) -> None:
        if session.new or session.dirty or session.deleted:
            raise ReadOnlySessionError("a read-only request's session tried to write")

    return factory


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def migrate(settings: Settings) -> None:
    """Bring the schema up to date with Alembic (idempotent; every process may call it)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", settings.sqlalchemy_url.replace("%", "%%"))
    settings.home.mkdir(parents=True, exist_ok=True)
    # Several processes (API, worker, engine) may start at once: one migrates, the others wait.
    with FileLock(str(settings.home / ".migrate.lock")):
        command.upgrade(cfg, "heads")
