"""The migrations and the models agree, and go up and down cleanly, on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import inspect

from cti_bridge.store import migrate
from cti_bridge.store.db import make_engine

TABLES = {
    "xelion_context",
    "crm_context",
    "user_credentials",
    "event_uri_mapping",
    "app_context",
    "call_event",
    "delivery",
    "delivery_attempt",
    "admin_session",
    "source_gap",
}


def test_upgrade_check_downgrade(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine)
        assert TABLES <= set(inspect(engine).get_table_names())
        migrate.check(engine)  # raises if the models and the migrations disagree
        migrate.upgrade(engine)  # idempotent
        migrate.downgrade(engine)
        assert not TABLES & set(inspect(engine).get_table_names())
        migrate.upgrade(engine)
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode(sqlite_database) -> None:  # type: ignore[no-untyped-def]
    with sqlite_database.engine.connect() as conn:
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
    assert mode == "wal"
