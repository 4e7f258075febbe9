"""The daemon's own VACUUM of ``delivery``, ``delivery_attempt`` and ``call_event`` on PostgreSQL
(store/vacuum.py): run once the dead row versions reach the threshold, not before, never on SQLite
or with a threshold of 0; not again right after another replica's; a VACUUM the server skipped is
noticed and logged; VACUUMs that remove nothing back off; a failure is logged without ending the
loop; a stop does not wait for a long statement to end; and the history retention deletes from is
vacuumed too, each table on its own dead versions, so its freed space is used again."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection

from cti_bridge.config import Settings
from cti_bridge.retention import Retention
from cti_bridge.store.db import Database
from cti_bridge.store.vacuum import SKIPPED_PAUSE, Vacuum, table_stats, vacuum_sql
from tests.integration.oauth_helpers import FakeClock
from tests.integration.test_delivery_leases import T0, World, make_world


def _settings(dead: int, every: float = 0.05) -> Settings:
    return Settings(
        database_url="sqlite:///unused.db", pg_vacuum_dead_rows=dead, pg_vacuum_check_seconds=every
    )


def _stats(db: Database, table: str = "delivery") -> tuple[int, int]:
    """(dead row versions, manual VACUUMs) of ``table`` as pg_stat_user_tables shows them now."""
    stats = db.run_sync(lambda s: table_stats(s, table))
    return stats.dead, stats.vacuums


async def _until(what: str, check: Callable[[], bool], seconds: float = 20.0) -> None:
    """Poll ``check()`` (the statistics reach the view a little after the transactions end)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.2)


def _update_all(db: Database) -> None:
    db.run_sync(lambda s: s.execute(text("UPDATE delivery SET attempts = attempts + 1")))


async def _churn(db: Database, rows: int, rounds: int, at_least: int) -> tuple[int, int]:
    """``rows`` deliveries, each then updated ``rounds`` times (a dead version each, some pruned on
    the way); returns the statistics once they count ``at_least`` dead versions and stopped moving
    (every connection flushes its counts within about a second)."""
    world = make_world(db)
    for i in range(rows):
        world.event(f"call-{i}")
    for _ in range(rounds):
        _update_all(db)
    await _until(f"{at_least} dead versions counted", lambda: _stats(db)[0] >= at_least)
    stats = _stats(db)
    while True:
        await asyncio.sleep(1.5)
        if _stats(db) == stats:
            return stats
        stats = _stats(db)


async def test_the_table_is_vacuumed_once_its_dead_versions_reach_the_threshold(database: Database) -> None:
    if database.is_sqlite:
        vacuum = Vacuum(database, _settings(1))
        assert not vacuum.enabled and await vacuum.check("delivery") is False  # no statistics view asked
        return
    dead, vacuums = await _churn(database, rows=40, rounds=3, at_least=60)
    assert _stats(database)[0] == dead

    assert await Vacuum(database, _settings(dead + 1)).check("delivery") is False  # one short of it
    assert await Vacuum(database, _settings(0)).check("delivery") is False  # switched off
    assert _stats(database)[1] == vacuums

    vacuum = Vacuum(database, _settings(dead))
    assert await vacuum.check("delivery") is True and vacuum.tables["delivery"].vacuums == 1
    after = _stats(database)
    assert after[1] == vacuums + 1 and after[0] < dead
    assert vacuum.tables["delivery"].backoff == 0.0


async def test_a_replica_does_not_vacuum_right_after_another(database: Database) -> None:
    if database.is_sqlite:
        return
    dead, vacuums = await _churn(database, rows=40, rounds=2, at_least=40)
    first, second = Vacuum(database, _settings(10, every=30.0)), Vacuum(database, _settings(10, every=30.0))
    assert await first.check("delivery") is True
    _update_all(database)  # dead versions again, above the threshold
    await _until("new dead versions counted", lambda: _stats(database)[0] >= 20)
    # The other replica sees that the table was vacuumed less than its check interval ago.
    assert await second.check("delivery") is False
    assert _stats(database)[1] == vacuums + 1


async def test_a_vacuum_the_server_skipped_is_noticed_and_logged(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    if database.is_sqlite:
        return
    await _churn(database, rows=30, rounds=2, at_least=30)
    vacuum = Vacuum(database, _settings(10))
    with database.engine.connect() as holder:
        # What another VACUUM holds: SKIP_LOCKED makes the server skip ours with a notice.
        holder.exec_driver_sql("LOCK TABLE delivery IN SHARE UPDATE EXCLUSIVE MODE")
        with caplog.at_level(logging.WARNING, logger="cti_bridge.store.vacuum"):
            started = time.monotonic()
            assert await vacuum.check("delivery") is False
        holder.rollback()
    assert vacuum.tables["delivery"].vacuums == 0
    assert "the VACUUM of delivery was skipped" in caplog.text
    assert vacuum.tables["delivery"].not_before >= started + SKIPPED_PAUSE  # not tried again at every check


async def test_vacuums_that_remove_nothing_back_off(database: Database) -> None:
    if database.is_sqlite:
        return
    world = make_world(database)
    for i in range(40):
        world.event(f"call-{i}")
    # A transaction whose snapshot predates the updates: VACUUM cannot remove what it still sees.
    with database.engine.connect() as old:
        old.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")
        old.exec_driver_sql("SELECT count(*) FROM delivery").one()
        for _ in range(3):
            _update_all(database)
        await _until("dead versions counted", lambda: _stats(database)[0] >= 60)
        vacuum = Vacuum(database, _settings(20, every=0.5))
        state = vacuum.tables["delivery"]
        waits = []
        for _ in range(3):
            # The test does not wait out the backoff; only the gap any VACUUM leaves (the check
            # interval, or nine times its duration).
            state.not_before = 0.0
            assert await vacuum.check("delivery") is True
            waits.append(state.backoff)
            await asyncio.sleep(max(0.5, 9 * state.took) + 0.1)
        assert waits == [0.5, 1.0, 2.0]
        _rollback(old)
    state.not_before = 0.0
    assert await vacuum.check("delivery") is True
    assert state.backoff == 0.0  # the old transaction ended: they went, and the backoff with them


def _rollback(conn: Connection) -> None:
    conn.exec_driver_sql("ROLLBACK")


async def test_the_loop_vacuums_and_outlives_a_failure(
    database: Database, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    if database.is_sqlite:
        stop = asyncio.Event()
        await asyncio.wait_for(Vacuum(database, _settings(1)).run(stop), 1.0)  # returns at once
        return
    await _churn(database, rows=30, rounds=2, at_least=30)
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
        await _until(
            "a VACUUM after the failed one", lambda: vacuum.tables["delivery"].vacuums == 1, seconds=10
        )
        stop.set()
        await asyncio.wait_for(task, 2.0)
    assert failures == [vacuum_sql("delivery")]
    [failed] = [
        r for r in caplog.records if r.getMessage() == "vacuuming delivery failed; trying again later"
    ]
    assert failed.exc_info is not None and str(failed.exc_info[1]) == "the server went away"


#: The tables retention deletes from that nothing updates: only VACUUM makes their freed space usable.
HISTORY = ("delivery_attempt", "call_event")


def _history(world: World, rows: int) -> None:
    """``rows`` events at T0, each with a delivery delivered a minute later and its attempt record:
    what retention deletes, all three, 30 days on."""
    for i in range(rows):
        world.event(f"call-{i:04d}", now=T0)
    claimed = world.claim(T0 + timedelta(seconds=30), limit=rows)
    assert len(claimed) == rows
    for delivery_id, claim in claimed:
        assert world.complete(delivery_id, claim, "delivered", T0 + timedelta(minutes=1))


def _server_stats(db: Database) -> dict[str, tuple[int, int, int]]:
    """(dead row versions, manual VACUUMs, bytes of the heap) of delivery and of HISTORY, straight
    from the server."""
    found = db.run_sync(
        lambda s: s.execute(
            text(
                "SELECT relname, n_dead_tup, vacuum_count, pg_relation_size(relid) "
                "FROM pg_stat_user_tables "
                "WHERE relname IN ('delivery', 'delivery_attempt', 'call_event')"
            )
        ).all()
    )
    return {str(row[0]): (int(row[1]), int(row[2]), int(row[3])) for row in found}


def _history_of(db: Database) -> list[tuple[int, int, int]]:
    stats = _server_stats(db)
    return [stats[t] for t in HISTORY]


async def test_the_history_retention_deletes_from_is_vacuumed_too(database: Database) -> None:
    """``delivery_attempt`` and ``call_event`` are only inserted into and deleted from (retention);
    with autovacuum off, as on this machine's server, nothing vacuumed them, and the space of the
    deleted rows was never used again: the tables grew by their whole size each time their rows
    were replaced (a review measured call_event at 12.7, 25.4, 38.0 MB). The daemon's loop vacuums
    each table on its own dead versions: not while they have none (``delivery`` has, and is), then
    after retention's deletions; the same rows written again fit in the space the deleted ones left."""
    if database.is_sqlite:
        return
    world = make_world(database)
    world.serial = itertools.count(1000)  # keys and payloads of one length, in both rounds
    database.engine.dispose()  # one connection writes them (see below)
    rows = 300
    _history(world, rows)
    full = _server_stats(database)
    assert {t: full[t][:2] for t in HISTORY} == {t: (0, 0) for t in HISTORY}
    # At the threshold only once all their rows are gone (retention deletes them in batches): the
    # VACUUM then finds every page empty.
    vacuum = Vacuum(database, _settings(rows))
    stop = asyncio.Event()
    task = asyncio.create_task(vacuum.run(stop))
    try:
        # Each delivery was updated twice (claimed, completed): delivery's dead versions, not theirs.
        await _until("delivery vacuumed", lambda: _server_stats(database)["delivery"][1] >= 1)
        await asyncio.sleep(0.5)  # ten more checks
        assert [_server_stats(database)[t][1] for t in HISTORY] == [0, 0]

        retention = Retention(
            database,
            Settings(database_url="sqlite:///unused.db", retention_days=30),
            FakeClock(T0 + timedelta(days=31)),
        )
        pruned = await asyncio.wait_for(retention.prune(), 10)
        assert (pruned.deliveries, pruned.attempts, pruned.events) == (rows, rows, rows)
        await _until(
            "delivery_attempt and call_event vacuumed after retention's deletions",
            lambda: all(dead < rows and vacuums >= 1 for dead, vacuums, _ in _history_of(database)),
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 5.0)
    assert [vacuum.tables[t].vacuums for t in HISTORY] == [1, 1]

    # The same rows again, through one connection as the first ones were (each connection fills
    # a page of its own until VACUUM records the free space): in the space the deleted ones left,
    # not beside it, which made the tables twice as large.
    database.engine.dispose()
    _history(world, rows)
    again = _server_stats(database)
    assert {t: again[t][2] for t in HISTORY} == {t: full[t][2] for t in HISTORY}


async def test_a_cancelled_statement_is_cancelled_in_the_server_too(database: Database) -> None:
    """A stop cancels the VACUUM's task; the statement must end too, or ``dispose`` (which waits
    for the database threads) would wait for it. A 30-second sleep stands in for a long VACUUM."""
    if database.is_sqlite:
        return
    task = asyncio.create_task(database.run_outside_transaction("SELECT pg_sleep(30)"))
    await _until("the statement running", lambda: _sleeping(database) == 1, seconds=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _until("the statement cancelled in the server", lambda: _sleeping(database) == 0, seconds=10)


def _sleeping(db: Database) -> int:
    return int(
        db.run_sync(
            lambda s: s.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
                )
            ).scalar_one()
        )
    )
