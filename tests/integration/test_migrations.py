"""The migrations and the models agree, and go up and down cleanly, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import event, inspect, text
from sqlmodel import Session

from cti_bridge.errors import SchemaTooNewError
from cti_bridge.events import dedupe_key
from cti_bridge.store import migrate
from cti_bridge.store.db import InstanceLock, make_engine
from cti_bridge.store.deliveries import UNDELIVERED, park_credential, unpark_credential
from cti_bridge.store.models import WAITING, WAITING_SQL, XelionContext
from tests.e2e.process_helpers import cli

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
    "id_high_water",
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


def test_stored_dedupe_keys_follow_the_new_form_both_ways(db_url: str) -> None:
    """Migration 0004 rewrites the keys of stored events to ``<callId>|<digest>``: an event that
    arrives again after the upgrade gets the same key (still a duplicate). Downgrade restores the
    old keys exactly."""
    fields = {"callId": "1732443153.1021", "callerPhoneNumber": "+31612345678", "calleePhoneNumber": None}
    canonical = json.dumps(
        [1, "callHungUpEvent", fields["callId"], fields["callerPhoneNumber"], None], separators=(",", ":")
    )
    old_key = hashlib.sha256(canonical.encode()).hexdigest()
    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine, "0003")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO xelion_context (id, host, protocol, tenant, admin_username, "
                    "admin_password_enc, source_state, created_at, updated_at) VALUES "
                    "(1, 'h', 'https', 't', 'a', 'x', 'stopped', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO call_event (xelion_context_id, notification_type, call_id, dedupe_key, "
                    "payload, duplicates, received_at) "
                    "VALUES (1, 'callHungUpEvent', :call, :key, :payload, 0, CURRENT_TIMESTAMP)"
                ),
                {"call": fields["callId"], "key": old_key, "payload": json.dumps(fields)},
            )

        def stored() -> str:
            with engine.connect() as conn:
                return str(conn.execute(text("SELECT dedupe_key FROM call_event")).scalar_one())

        migrate.upgrade(engine)
        assert stored() == dedupe_key(1, "callHungUpEvent", fields)
        migrate.downgrade(engine, "0003")
        assert stored() == old_key
    finally:
        engine.dispose()


def test_parking_uses_the_partial_credential_index(db_url: str) -> None:
    """Migrations 0005 and 0009: the credential index holds only deliveries waiting to be sent
    (its condition is the WAITING states, word for word: not those in flight, whose claim and
    completion would move its entries), and parking and unparking a credential use it on both
    databases (on PostgreSQL with sequential scans off: the tables are empty)."""
    assert "sending" not in WAITING and set(WAITING) < set(UNDELIVERED)
    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine)
        indexes = {i["name"]: i for i in inspect(engine).get_indexes("delivery")}
        assert "ix_delivery_credential_state" not in indexes
        assert "ix_delivery_credential_undelivered" not in indexes
        assert indexes["ix_delivery_credential_waiting"]["column_names"] == ["credential_id", "state"]
        # The condition as the database keeps it: the waiting states, not those in flight.
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                definition = conn.exec_driver_sql(
                    "SELECT sql FROM sqlite_master WHERE name = 'ix_delivery_credential_waiting'"
                ).scalar_one()
                assert definition.endswith(f"WHERE {WAITING_SQL}"), definition
            else:
                definition = conn.exec_driver_sql(
                    "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_delivery_credential_waiting'"
                ).scalar_one()
            assert all(f"'{state}'" in definition for state in WAITING), definition
            assert "'sending'" not in definition, definition
        captured: list[tuple[str, object]] = []

        def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
            if statement.lstrip().upper().startswith("UPDATE"):
                captured.append((statement, parameters))

        event.listen(engine, "before_cursor_execute", capture)
        now = datetime.now(UTC)
        with Session(engine) as s:
            park_credential(s, credential_id=1, reason="r", now=now)
            unpark_credential(s, credential_id=1, now=now)
            s.rollback()
        event.remove(engine, "before_cursor_execute", capture)
        assert len(captured) == 2
        explain = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("SET enable_seqscan = off")
            for statement, parameters in captured:
                rows = conn.exec_driver_sql(explain + statement, parameters)  # type: ignore[arg-type]
                plan = " ".join(str(r[-1]) for r in rows)
                assert "ix_delivery_credential_waiting" in plan, (statement, plan)
            conn.rollback()
    finally:
        engine.dispose()


def test_ids_go_on_from_the_largest_stored_one_after_the_upgrade(db_url: str) -> None:
    """Migration 0007 starts the high water mark at each table's largest id: the first row made
    after the upgrade gets the next one, and a deleted newest row's id is not given again."""
    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine, "0006")
        with engine.begin() as conn:
            for i in (2, 5):
                conn.execute(
                    text(
                        "INSERT INTO xelion_context (id, host, protocol, tenant, admin_username, "
                        "admin_password_enc, source_state, created_at, updated_at) VALUES "
                        "(:i, 'h', 'https', :t, 'a', 'x', 'stopped', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                    ),
                    {"i": i, "t": f"t{i}"},
                )
        if engine.dialect.name == "postgresql":  # rows given ids by hand leave the sequence behind
            with engine.begin() as conn:
                conn.execute(text("SELECT setval('xelion_context_id_seq', 5)"))
        migrate.upgrade(engine)

        def add(tenant: str) -> int:
            with Session(engine) as s:
                row = XelionContext(host="h", tenant=tenant, admin_username="a", admin_password_enc="x")
                s.add(row)
                s.commit()
                assert row.id is not None
                return row.id

        first = add("new")
        assert first == 6
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM xelion_context WHERE id = :i"), {"i": first})
        assert add("newer") == 7
        migrate.downgrade(engine, "0006")
        assert "id_high_water" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def _cli(db_url: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``cti-bridge ARGS`` on ``db_url`` in a process of its own (no other setting of ours)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTI_BRIDGE_")}
    return cli(list(args), env | {"CTI_BRIDGE_DATABASE_URL": db_url, "CTI_BRIDGE_SECRET_KEY": "k" * 44}, cwd)


def test_a_schema_newer_than_this_release_is_refused_and_left_alone(db_url: str, tmp_path: Path) -> None:
    """A newer release migrated the database (a rollback; an old replica restarting during a
    rolling upgrade): ``run`` ended with exit 1 and Alembic's traceback, ``migrate`` with exit 4
    and "Can't locate revision". Both exit 4 now, saying what happened, and change nothing."""
    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine)
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0999'"))
        with pytest.raises(SchemaTooNewError, match="revision 0999, which this release does not know"):
            migrate.upgrade(engine)
        for command in ("migrate", "run"):
            proc = _cli(db_url, tmp_path, command)
            assert proc.returncode == 4, (command, proc.stdout, proc.stderr)
            assert "schema is at revision 0999" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0999"
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_replicas_migrating_at_once_wait_for_each_other(db_url: str) -> None:
    """Three replicas starting together on an empty PostgreSQL database: one migrated and the
    others failed on what it had just made (exit 4, a crash loop). They take turns now."""
    if not db_url.startswith("postgresql"):
        pytest.skip("an SQLite file has one process (its instance lock), which migrates alone")
    engines = [make_engine(db_url) for _ in range(3)]
    start = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def replica(engine: object) -> None:
        start.wait()
        try:
            migrate.upgrade(engine)  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=replica, args=(e,), daemon=True) for e in engines]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a migration still runs after a minute"
        assert errors == []
        migrate.check(engines[0])
    finally:
        for e in engines:
            e.dispose()


def test_migrate_does_not_change_an_sqlite_file_a_running_daemon_holds(tmp_path: Path) -> None:
    """``cti-bridge migrate`` moved the schema beneath a running daemon (of an older release, say);
    it takes the instance lock, as ``run`` does, and exits 4 naming it."""
    path = tmp_path / "cti-bridge.db"
    lock = InstanceLock(path.resolve())
    lock.acquire()
    try:
        proc = _cli(f"sqlite:///{path}", tmp_path, "migrate")
    finally:
        lock.release()
    assert proc.returncode == 4 and "another cti-bridge process is already running" in proc.stderr, (
        proc.stderr
    )
    assert not path.exists()  # nothing was made
    assert _cli(f"sqlite:///{path}", tmp_path, "migrate").returncode == 0
