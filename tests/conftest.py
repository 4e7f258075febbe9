"""Shared fixtures: a migrated database on SQLite and on PostgreSQL, a secret box, settings.

Every test that takes ``database`` (or ``db_url``) runs twice: on a fresh SQLite file and on a fresh
PostgreSQL database created on 127.0.0.1:5432 for the test session. When PostgreSQL is unreachable
the PostgreSQL runs are skipped with a message, never failed.

Each test starts with the heap that earlier tests left frozen, as the daemon starts with its
start-up heap frozen (``cli.tune_gc``).
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from cti_bridge.store import migrate
from cti_bridge.store.crypto import SecretBox
from cti_bridge.store.db import Database, make_engine

PG_ADMIN_URL = os.environ.get("CTI_BRIDGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TEST_SECRET_KEY = "test-secret-key-0123456789-abcdefghijklmnop"


_TESTS_BETWEEN_COLLECTIONS = 50
_tests_since_collection = 0


@pytest.fixture(autouse=True)
def _frozen_heap() -> None:
    """Without this, a full collection walked everything the suite had built so far (pytest's
    reports, hypothesis' data, imported modules), 0.3-0.6 s with the event loop stopped (measured
    with ``gc.callbacks`` over ``make test``), inside whichever timing test it happened to hit: a
    retry 0.36 s late failed CI once. Frozen objects are never walked; what a test creates is
    collected as in the daemon. Frozen garbage cycles are never freed either (over the whole suite
    that was 600 MB more at the peak), so every 50 tests the heap is collected once, here, outside
    any test: +100 MB at the peak, about 15 s over the suite, no pause over 20 ms in a test body."""
    global _tests_since_collection
    _tests_since_collection += 1
    if _tests_since_collection >= _TESTS_BETWEEN_COLLECTIONS:
        _tests_since_collection = 0
        gc.unfreeze()
        gc.collect()
    gc.freeze()


def _pg_reachable() -> str | None:
    try:
        engine = create_engine(PG_ADMIN_URL, poolclass=NullPool, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # any failure means: skip the PostgreSQL runs
        return f"PostgreSQL at {PG_ADMIN_URL} is unreachable ({type(exc).__name__}); PostgreSQL runs skipped"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The admin URL of a reachable PostgreSQL server, or skip."""
    reason = _pg_reachable()
    if reason:
        pytest.skip(reason)
    yield PG_ADMIN_URL


def create_pg_database(admin_url: str) -> str:
    name = "cti_test_" + uuid.uuid4().hex[:12]
    engine = create_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


def drop_pg_database(admin_url: str, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    engine = create_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database only (tests of replicas and their advisory locks, which
    are per database, so tests cannot see each other's); skipped when the server is unreachable."""
    url = create_pg_database(pg_server)
    try:
        yield url
    finally:
        drop_pg_database(pg_server, url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database: a fresh SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cti-bridge.db'}"
        return
    admin_url = request.getfixturevalue("pg_server")
    url = create_pg_database(admin_url)
    try:
        yield url
    finally:
        drop_pg_database(admin_url, url)


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    """A Database migrated to head, on SQLite and on PostgreSQL."""
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    db = Database(db_url, engine=engine)
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[Database]:
    """A migrated SQLite database only, for tests about SQLite itself (the raw file, WAL)."""
    url = f"sqlite:///{tmp_path / 'cti-bridge.db'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    db = Database(url, engine=engine)
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture
def secret_box() -> SecretBox:
    return SecretBox(TEST_SECRET_KEY)
