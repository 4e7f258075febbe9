"""The daemon's own VACUUM of ``delivery`` on PostgreSQL (store/vacuum.py): run once the dead row
versions reach the threshold, not before, never on SQLite or with a threshold of 0, and a failure
is logged without ending the loop."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from sqlalchemy import text

from cti_bridge.config import Settings
from cti_bridge.store.db import Database
from cti_bridge.store.vacuum import Vacuum, dead_rows
from tests.integration.test_delivery_leases import make_world


def _settings(dead: int) -> Settings:
    return Settings(
        database_url="sqlite:///unused.db", pg_vacuum_dead_rows=dead, pg_vacuum_check_seconds=0.05
    )


def _stats(db: Database) -> tuple[int, int]:
    """(dead row versions, vacuums) of ``delivery`` as pg_stat_user_tables shows them now."""
    row = db.run_sync(
        lambda s: s.execute(
            text(
                "SELECT n_dead_tup, vacuum_count FROM pg_stat_user_tables "
                "WHERE relid = CAST('delivery' AS regclass)"
            )
        ).one()
    )
    return int(row[0]), int(row[1])


async def _until(what: str, check: object, seconds: float = 20.0) -> None:
    """Poll ``check()`` (the statistics reach the view a little after the transactions end)."""
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.2)


def _churn(db: Database, rows: int, rounds: int) -> None:
    """``rows`` deliveries, each then updated ``rounds`` times: as many dead versions each."""
    world = make_world(db)
    for i in range(rows):
        world.event(f"call-{i}")
    for _ in range(rounds):
        db.run_sync(lambda s: s.execute(text("UPDATE delivery SET attempts = attempts + 1")))


async def test_the_table_is_vacuumed_once_its_dead_versions_reach_the_threshold(database: Database) -> None:
    if database.is_sqlite:
        vacuum = Vacuum(database, _settings(1))
        assert not vacuum.enabled and await vacuum.check() is False  # no statistics view asked
        return
    _churn(database, rows=40, rounds=3)  # 120 dead versions, some pruned on the way
    await _until("dead versions counted", lambda: _stats(database)[0] >= 60)
    # Every connection's statistics in: the count no longer moves (each flushes within a second).
    dead, vacuums = _stats(database)
    while True:
        await asyncio.sleep(1.5)
        if _stats(database) == (dead, vacuums):
            break
        dead, vacuums = _stats(database)
    assert database.run_sync(dead_rows) == dead

    assert await Vacuum(database, _settings(dead + 1)).check() is False  # one short of it
    assert await Vacuum(database, _settings(0)).check() is False  # switched off
    assert _stats(database)[1] == vacuums

    vacuum = Vacuum(database, _settings(dead))
    assert await vacuum.check() is True and vacuum.vacuums == 1
    await _until("the VACUUM counted", lambda: _stats(database)[1] == vacuums + 1)
    assert _stats(database)[0] < dead
    # Right after, the pause (nine times the VACUUM's duration) holds the next one back.
    assert vacuum._not_before > time.monotonic() - 1


async def test_the_loop_vacuums_and_outlives_a_failure(
    database: Database, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    if database.is_sqlite:
        stop = asyncio.Event()
        await asyncio.wait_for(Vacuum(database, _settings(1)).run(stop), 1.0)  # returns at once
        return
    _churn(database, rows=30, rounds=2)
    await _until("dead versions counted", lambda: _stats(database)[0] >= 30)
    vacuum = Vacuum(database, _settings(30))
    real = database.run_outside_transaction
    failures = []

    async def fails_once(sql: str) -> None:
        if not failures:
            failures.append(sql)
            raise RuntimeError("the server went away")
        await real(sql)

    monkeypatch.setattr(database, "run_outside_transaction", fails_once)
    stop = asyncio.Event()
    with caplog.at_level(logging.WARNING, logger="cti_bridge.store.vacuum"):
        task = asyncio.create_task(vacuum.run(stop))
        await _until("a VACUUM after the failed one", lambda: vacuum.vacuums == 1, seconds=10)
        stop.set()
        await asyncio.wait_for(task, 2.0)
    assert failures == ["VACUUM (SKIP_LOCKED, ANALYZE) delivery"]
    assert "vacuuming delivery failed (RuntimeError: the server went away)" in caplog.text
