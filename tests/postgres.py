"""A fresh PostgreSQL database for a test, on the server at ``LORAFORGE_TEST_PG_URL``
(``postgresql://postgres@127.0.0.1:5432/postgres`` by default)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.net import reachable

PG_ADMIN_URL = os.environ.get("LORAFORGE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def create_database() -> tuple[str, Callable[[], None]] | None:
    """A new, empty database's URL and a function that drops it; None without a server."""
    if not reachable("127.0.0.1", 5432):
        return None
    import psycopg

    name = f"loraforge_test_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error:
        return None

    def drop() -> None:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", drop


@contextmanager
def fresh_database() -> Iterator[str]:
    """:func:`create_database` for one test, dropped afterwards; the test skips without one."""
    created = create_database()
    if created is None:
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (or refused CREATE DATABASE)")
    url, drop = created
    try:
        yield url
    finally:
        drop()
