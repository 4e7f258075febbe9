"""Database.run: where a unit of work runs (store/db.py). A quick unit of work on SQLite runs in the
loop's own thread when the database thread is idle, and in the thread, after what is there, when it
is not; PostgreSQL and ordinary units of work always use the threads. Units of work stay one at a
time and in order either way. The tests that are not about SQLite alone run on both databases."""

from __future__ import annotations

import asyncio
import threading

import pytest
from sqlalchemy import text
from sqlmodel import Session

from cti_bridge.store.db import Database


def _thread_of(_s: Session) -> int:
    return threading.get_ident()


async def test_a_quick_unit_of_work_on_sqlite_runs_in_the_loop_thread(sqlite_database: Database) -> None:
    here = threading.get_ident()
    assert await sqlite_database.run(_thread_of, quick=True) == here
    assert await sqlite_database.run(_thread_of) != here  # not quick: the database thread


async def test_postgresql_always_uses_its_threads(database: Database) -> None:
    here = threading.get_ident()
    where = await database.run(_thread_of, quick=True)
    assert (where == here) == database.is_sqlite


async def test_a_quick_unit_waits_its_turn_behind_the_thread(sqlite_database: Database) -> None:
    """SQLite: while a unit of work holds the database thread, a quick one queues behind it (in the
    thread) instead of running beside it: both commit, in the order they were given. (PostgreSQL
    runs units of work side by side in its threads, as before.)"""
    database = sqlite_database
    started = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def slow(s: Session) -> int:
        started.set()
        assert release.wait(10)
        s.exec(text("SELECT 1"))  # type: ignore[call-overload]
        order.append("slow")
        return threading.get_ident()

    def quick(s: Session) -> int:
        order.append("quick")
        return threading.get_ident()

    first = asyncio.ensure_future(database.run(slow))
    assert await asyncio.to_thread(started.wait, 10)
    assert database.busy_in_thread == 1
    second = asyncio.ensure_future(database.run(quick, quick=True))
    await asyncio.sleep(0.05)
    assert order == []  # the quick one did not run in the loop's thread meanwhile
    release.set()
    slow_thread, quick_thread = await asyncio.gather(first, second)
    assert order == ["slow", "quick"]
    assert quick_thread != threading.get_ident()
    assert database.busy_in_thread == 0
    # The thread is idle again: quick units run in the loop's thread again.
    assert await database.run(_thread_of, quick=True) == threading.get_ident()


async def test_a_cancelled_caller_leaves_its_unit_counted_until_it_ends(sqlite_database: Database) -> None:
    """Cancelling the caller does not stop a unit of work already in the thread; until it ends, a
    quick unit of work must not run beside it in the loop's thread."""
    started = threading.Event()
    release = threading.Event()

    def slow(_s: Session) -> None:
        started.set()
        assert release.wait(10)

    caller = asyncio.ensure_future(sqlite_database.run(slow))
    assert await asyncio.to_thread(started.wait, 10)
    caller.cancel()
    await asyncio.sleep(0)
    assert caller.cancelled()
    assert sqlite_database.busy_in_thread == 1  # still running in the thread
    quick = asyncio.ensure_future(sqlite_database.run(_thread_of, quick=True))
    await asyncio.sleep(0.05)
    assert not quick.done()
    release.set()
    assert await quick != threading.get_ident()
    assert sqlite_database.busy_in_thread == 0
    assert await sqlite_database.run(_thread_of, quick=True) == threading.get_ident()


async def test_a_quick_unit_that_fails_rolls_back(database: Database) -> None:
    """Inline or not, a unit of work that raises commits nothing and the caller gets the error."""
    await database.run(lambda s: s.exec(text("CREATE TABLE t_quick (v INTEGER)")), quick=True)  # type: ignore[call-overload]

    def insert_then_fail(s: Session) -> None:
        s.exec(text("INSERT INTO t_quick (v) VALUES (1)"))  # type: ignore[call-overload]
        raise ValueError("boom")

    try:
        await database.run(insert_then_fail, quick=True)
    except ValueError as exc:
        assert str(exc) == "boom"
    else:
        raise AssertionError("the error did not reach the caller")
    count = await database.run(lambda s: s.exec(text("SELECT count(*) FROM t_quick")).one()[0], quick=True)  # type: ignore[call-overload]
    assert count == 0


async def test_a_quick_unit_mixing_connection_statements_and_the_orm_is_one_transaction(
    database: Database,
) -> None:
    """A quick unit's session is made only when the unit uses the ORM (store/db.py
    ``_QuickSession``); what it did before on the connection and what it adds through the ORM
    commit together, or, when it fails after both, neither does."""
    await database.run(lambda s: s.exec(text("CREATE TABLE t_mixed (v INTEGER)")), quick=True)  # type: ignore[call-overload]

    def both(s: Session, fail: bool) -> None:
        s.connection().exec_driver_sql("INSERT INTO t_mixed (v) VALUES (1)")  # no session made yet
        s.execute(text("INSERT INTO t_mixed (v) VALUES (2)"))  # through the session: made now
        assert s.execute(text("SELECT count(*) FROM t_mixed")).scalar_one() == 2
        if fail:
            raise ValueError("after both")

    with pytest.raises(ValueError, match="after both"):
        await database.run(lambda s: both(s, fail=True), quick=True)
    assert await database.run(_values, quick=True) == []
    await database.run(lambda s: both(s, fail=False), quick=True)
    assert await database.run(_values, quick=True) == [1, 2]
    assert await database.run(_values) == [1, 2]  # and seen by another connection


def _values(s: Session) -> list[int]:
    return [int(v) for (v,) in s.connection().exec_driver_sql("SELECT v FROM t_mixed ORDER BY v")]


async def test_driver_statements_raise_what_sqlalchemy_would(database: Database) -> None:
    """The per-event statements run on the driver's cursor (store/deliveries.py ``_Raw``); a driver
    error must reach callers as the SQLAlchemy exception ``exec_driver_sql`` raises for the same
    statement (the pipeline retries ``OperationalError``), with the parameters hidden."""
    from sqlalchemy.exc import DBAPIError

    from cti_bridge.store.deliveries import _driver

    secret = "parameter-value-that-must-not-show"

    def marks(s: Session, sql: str) -> str:
        return _driver(s)[1].sql(sql)

    await database.run(lambda s: s.exec(text("CREATE TABLE t_raw (k TEXT PRIMARY KEY)")))  # type: ignore[call-overload]
    await database.run(lambda s: s.exec(text("INSERT INTO t_raw (k) VALUES ('a')")))  # type: ignore[call-overload]
    statements = [
        "SELECT * FROM no_such_table WHERE k = ?",  # an unknown table
        "INSERT INTO t_raw (k) VALUES (?) RETURNING k",  # a unique violation ('a' is there)
        "SELEC k FROM t_raw WHERE k = ?",  # a syntax error
    ]
    for sql in statements:
        params = ("a",) if "INSERT" in sql else (secret,)

        def via_raw(s: Session, sql: str = sql, params: tuple[str, ...] = params) -> object:
            return _driver(s)[0].rows(marks(s, sql), params)

        def via_sqlalchemy(s: Session, sql: str = sql, params: tuple[str, ...] = params) -> object:
            return s.connection().exec_driver_sql(marks(s, sql), params).all()

        errors: list[BaseException] = []
        for fn in (via_raw, via_sqlalchemy):
            try:
                await database.run(fn, quick=True)
            except DBAPIError as exc:
                errors.append(exc)
        assert len(errors) == 2, sql
        raw, expected = errors
        assert type(raw) is type(expected), (sql, type(raw), type(expected))
        assert type(raw.orig) is type(expected.orig)  # type: ignore[attr-defined]
        assert secret not in str(raw)
    rows = await database.run(lambda s: s.exec(text("SELECT k FROM t_raw")).all())  # type: ignore[call-overload]
    assert [tuple(r) for r in rows] == [("a",)]  # each failed unit of work was rolled back


async def test_a_write_lock_held_elsewhere_does_not_freeze_the_loop(sqlite_database: Database) -> None:
    """Another process holds SQLite's write lock (an operator's shell, say). A quick unit of work
    waits for it only briefly in the loop's thread (INLINE_LOCK_WAIT_MS), then in the database
    thread: the loop keeps running meanwhile, and the unit commits once the lock is free."""
    import sqlite3
    import time

    from cti_bridge.store.db import INLINE_LOCK_WAIT_MS

    path = sqlite_database.url.split(":///", 1)[1]
    other = sqlite3.connect(path, isolation_level=None)
    await sqlite_database.run(lambda s: s.exec(text("CREATE TABLE t_lock (v INTEGER)")), quick=True)  # type: ignore[call-overload]
    other.execute("BEGIN IMMEDIATE")
    hold = 2.0
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    def insert(s: Session) -> int:
        s.exec(text("INSERT INTO t_lock (v) VALUES (1)"))  # type: ignore[call-overload]
        return threading.get_ident()

    tick = asyncio.ensure_future(ticker())
    try:
        await asyncio.sleep(0.05)
        unit = asyncio.ensure_future(sqlite_database.run(insert, quick=True))
        await asyncio.sleep(hold)
        assert not unit.done()  # still waiting for the lock, in the database thread
        other.execute("COMMIT")
        where = await asyncio.wait_for(unit, 30)
    finally:
        tick.cancel()
        other.close()
    assert where != threading.get_ident()  # it went to the database thread
    # The loop was never stopped for anything like the lock's 2 s (at most the short inline wait,
    # plus whatever a loaded machine adds).
    assert max(gaps) < hold / 2, max(gaps)
    assert INLINE_LOCK_WAIT_MS / 1000 < hold / 2

    def count(s: Session) -> int:
        return int(s.exec(text("SELECT count(*) FROM t_lock")).one()[0])  # type: ignore[call-overload]

    assert await sqlite_database.run(count, quick=True) == 1
    # And the next quick unit runs in the loop's thread again, on the same held connection.
    assert await sqlite_database.run(_thread_of, quick=True) == threading.get_ident()


def _wal_frames(path: str) -> tuple[int, int]:
    """(frames in the WAL, frames of them copied back to the database), read from the WAL-index
    header in the ``-shm`` file (https://www.sqlite.org/walformat.html: ``mxFrame`` at offset 16,
    ``nBackfill`` at 96, native byte order), which reading does not change."""
    import struct

    with open(path + "-shm", "rb") as f:
        head = f.read(100)
    return struct.unpack_from("=I", head, 16)[0], struct.unpack_from("=I", head, 96)[0]


async def test_wal_checkpoints_run_in_a_thread_of_their_own(sqlite_database: Database) -> None:
    """SQLite: the quick units' commits leave the WAL's checkpoints to the checkpoint thread. The
    held connection's own autocheckpoint is only the backstop (INLINE_AUTOCHECKPOINT_PAGES): with
    the thread stopped, writing more than SQLite's default 1,000 pages (at which the loop's thread
    would have checkpointed) and fewer than that leaves the WAL unchecked; the thread, started
    again, copies it all back."""
    from cti_bridge.store.db import CHECKPOINT_INTERVAL, INLINE_AUTOCHECKPOINT_PAGES, _Checkpointer

    db = sqlite_database
    path = db.url.split(":///", 1)[1]
    await db.run(lambda s: s.exec(text("CREATE TABLE t_wal (v BLOB)")), quick=True)  # type: ignore[call-overload]
    assert db._inline_conn is not None and db._checkpointer is not None
    driver = db._inline_conn.connection.driver_connection
    assert driver.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == INLINE_AUTOCHECKPOINT_PAGES  # type: ignore[union-attr]
    db._checkpointer.stop()  # so that only the loop's thread could checkpoint meanwhile

    def insert(s: Session) -> None:
        s.exec(text("INSERT INTO t_wal (v) VALUES (randomblob(6000))"))  # type: ignore[call-overload]

    # Two pages per row and a few of the table's own: about 2,500 pages, between 1,000 and 4,000.
    first_frames, first_copied = _wal_frames(path)
    for _ in range(900):
        await db.run(insert, quick=True)
    frames, copied = _wal_frames(path)
    assert frames - first_frames > 1000 and frames < INLINE_AUTOCHECKPOINT_PAGES, (first_frames, frames)
    assert copied == first_copied  # the loop's thread did not checkpoint

    db._checkpointer = _Checkpointer(db)
    db._checkpointer.start()
    await db.run(insert, quick=True)  # something new to checkpoint
    deadline = asyncio.get_running_loop().time() + 100 * CHECKPOINT_INTERVAL
    while db.checkpoints == 0:
        assert asyncio.get_running_loop().time() < deadline, "the checkpoint thread never ran"
        await asyncio.sleep(CHECKPOINT_INTERVAL / 2)
    frames_after, copied_after = _wal_frames(path)
    assert frames_after > frames and copied_after == frames_after  # all of it copied back, by the thread


async def test_the_wal_stays_bounded_under_steady_writes(sqlite_database: Database) -> None:
    """A passive checkpoint beside a steady writer never lets SQLite start the WAL over; the held
    connection's backstop does, so the WAL file stays bounded (checkpoints off, it grew without
    bound)."""
    import os

    from cti_bridge.store.db import INLINE_AUTOCHECKPOINT_PAGES

    db = sqlite_database
    path = db.url.split(":///", 1)[1]
    await db.run(lambda s: s.exec(text("CREATE TABLE t_steady (v BLOB)")), quick=True)  # type: ignore[call-overload]

    def insert(s: Session) -> None:
        s.exec(text("INSERT INTO t_steady (v) VALUES (randomblob(6000))"))  # type: ignore[call-overload]

    for i in range(6000):  # about 15,000 pages written in all
        await db.run(insert, quick=True)
        if i % 50 == 0:
            await asyncio.sleep(0)
    page = 4096 + 24  # a WAL frame: the page and its header
    assert os.path.getsize(path + "-wal") < (INLINE_AUTOCHECKPOINT_PAGES + 1000) * page
    assert db.checkpoints > 0


async def test_a_large_transaction_does_not_leave_a_large_wal(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The WAL file kept the size of the largest transaction it ever held (deleting an integration
    with a month of history cascades in one: a review measured 62 MB left after a 60 MB
    transaction, for the process's life). Limited now (``WAL_SIZE_LIMIT``, small here): cut back
    once a checkpoint has let the WAL start over."""
    import os

    from cti_bridge.store import db as db_module
    from cti_bridge.store.db import CHECKPOINT_INTERVAL, make_engine

    limit = 256 * 1024
    monkeypatch.setattr(db_module, "WAL_SIZE_LIMIT", limit, raising=False)
    url = f"sqlite:///{tmp_path / 'wal.db'}"
    db = Database(url, engine=make_engine(url))
    try:
        await db.run(lambda s: s.exec(text("CREATE TABLE t_big (v BLOB)")), quick=True)  # type: ignore[call-overload]

        def big(s: Session) -> None:
            rows = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000) "
            s.exec(text(f"INSERT INTO t_big (v) {rows}SELECT randomblob(6000) FROM n"))  # type: ignore[call-overload]

        def small(s: Session) -> None:
            s.exec(text("INSERT INTO t_big (v) VALUES (randomblob(10))"))  # type: ignore[call-overload]

        await db.run(big, quick=True)
        wal = url.split(":///", 1)[1] + "-wal"
        assert os.path.getsize(wal) > 4 * 1024 * 1024
        deadline = asyncio.get_running_loop().time() + 200 * CHECKPOINT_INTERVAL
        while os.path.getsize(wal) > limit:
            assert asyncio.get_running_loop().time() < deadline, os.path.getsize(wal)
            await db.run(small, quick=True)
            await asyncio.sleep(CHECKPOINT_INTERVAL)
    finally:
        db.dispose()
