"""The database: engine set-up for SQLite and PostgreSQL, sessions, and running queries off the loop.

Queries are plain synchronous SQLModel code. ``Database.run`` executes one unit of work in a worker
thread and commits it, so the asyncio loop does not wait on the database. SQLite gets one writer
thread (it has one writer anyway) and every transaction starts with ``BEGIN IMMEDIATE``, so a
transaction never fails half-way by upgrading a read lock; WAL mode lets readers go on meanwhile.
``synchronous=NORMAL`` in WAL mode keeps every committed transaction across a process crash
(``kill -9``); only an OS crash or power loss may lose the last ones.

Quick units of work on SQLite run in the loop's own thread (``run(fn, quick=True)``): the delivery
path's short transactions (an ingest batch, a claim, a batch of completions), when the database
thread has nothing queued or running. Such a transaction on an embedded database is tens of
microseconds to a few milliseconds of CPU, with no network and no fsync (WAL,
``synchronous=NORMAL``; checkpoints aside), and this process is the database's only writer
(``InstanceLock``). Handing it to a thread cost more than the work itself: the hand-off and the
wake-ups, and above all the GIL, which the sqlite3 module lets go of around every statement step
and which the thread then waits for until the loop's thread lets go of it in turn (up to the
switch interval each time). Measured back to back with ``bench/bench_e2e.py --db sqlite``: about
1,100 -> 1,500 events/s, 0.9 -> 0.65 ms of daemon CPU per event. Everything else (the admin API's
queries, which may be long) keeps the thread, and a quick unit of work goes to the thread as well
while anything is queued or running there, so units of work still run one at a time and in order.
The quick units share one held connection (no pool round trip, and a session joined to its
transaction: half the cost of a session of its own) whose wait for the write lock is short
(``INLINE_LOCK_WAIT_MS``): if another process holds the lock, the unit goes to the thread, and the
loop does not freeze. PostgreSQL always uses its threads: its statements are network round trips.

Checkpoints (copying the WAL back into the database file, with an fsync of each) would otherwise run
in the loop's thread too: SQLite runs one inside the COMMIT that takes the WAL past
``wal_autocheckpoint`` pages (1,000 by default, every ~200 events at full load). A thread of its own
(``_Checkpointer``) does them instead, passive (beside the writer, never holding its lock), every
``CHECKPOINT_INTERVAL`` while quick units commit; the sqlite3 module lets go of the GIL meanwhile.
The held connection keeps an autocheckpoint at ``INLINE_AUTOCHECKPOINT_PAGES`` as a backstop: a
passive checkpoint cannot finish while commits keep coming, and only a checkpoint in the writer's
own connection lets SQLite start the WAL over, so the WAL stays bounded. That one copies only what
the thread has not (the last interval's pages).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, create_engine

from cti_bridge.errors import StoreLockedError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds to wait before each new try of a unit that failed with a transient database error
#: (``retry_transient``); after the last, the error goes to the caller.
TRANSIENT_RETRY_DELAYS = (0.2, 1.0, 3.0)


async def retry_transient(attempt: Callable[[bool], Awaitable[T]], what: str) -> T:
    """``await attempt(again)`` until it raises no ``OperationalError`` (a PostgreSQL connection
    dropped, a server restarting, a locked SQLite file), waiting ``TRANSIENT_RETRY_DELAYS`` between
    tries; the last try's error goes to the caller, as any other error at once. ``again`` is true
    from the second try on. Only for units that are safe to run twice: the first try may have
    committed before its error (the ingest's dedupe key, a completion's claim check make them so).
    """
    for again, delay in enumerate(TRANSIENT_RETRY_DELAYS):
        try:
            return await attempt(again > 0)
        except OperationalError as exc:
            log.warning("%s failed (%s); trying again in %.1f s", what, type(exc).__name__, delay)
        await asyncio.sleep(delay)
    return await attempt(True)


#: How long a quick unit of work in the loop's thread waits for SQLite's write lock before it
#: goes to the database thread instead (which waits as long as ``busy_timeout``, 30 s). Only
#: another process can hold that lock (an operator's ``sqlite3`` shell, say; one database belongs
#: to one daemon), and it must not freeze the event loop, its websockets and its admin API.
INLINE_LOCK_WAIT_MS = 50
#: Seconds between two passive checkpoints by the checkpoint thread (only while quick units commit).
CHECKPOINT_INTERVAL = 0.1
#: The held connection's own ``wal_autocheckpoint`` (pages of 4 KiB): the backstop that lets the WAL
#: start over (see the module docstring). The default is 1,000.
INLINE_AUTOCHECKPOINT_PAGES = 4000


#: The size (bytes) an SQLite WAL file is cut back to after a large transaction.
WAL_SIZE_LIMIT = 64 * 1024 * 1024


def make_engine(url: str) -> Engine:
    """An engine with the pragmas and pool this daemon needs for ``url``."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=4,
            max_overflow=4,
            hide_parameters=True,  # an error's text must not carry payloads or excerpts into logs
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event below issue BEGIN itself (pysqlite's own is DEFERRED).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            # A WAL file keeps the size of the largest transaction it held (deleting an integration
            # with a month of history cascades in one) unless limited: truncated back to this once
            # a checkpoint let the WAL start over.
            cur.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # A connect timeout and keepalives: a server (or a PgBouncer before a dead one) that accepts the
    # connection and never answers held the start (no exit code 4, no line), the stop and every
    # database thread for ever.
    return create_engine(
        url,
        pool_size=10,
        max_overflow=10,
        pool_pre_ping=True,
        hide_parameters=True,
        connect_args={"connect_timeout": PG_CONNECT_TIMEOUT, **keepalive_options()},
    )


#: The first keys of the daemon's two-key advisory locks (PostgreSQL), one per kind of thing locked
#: ("CTIB", "CTIU", "CTIA"). Two int4 keys live in a key space of their own (``objsubid`` 2), apart
#: from the one-key transaction locks on callIds (store/deliveries.py) and the retention pass.
LOCK_SOURCE_OWNER = 0x43544942  # an integration's websocket (xelion/ownership.py)
LOCK_REFRESH_USER = 0x43544955  # a user credential's token refresh (delivery/oauth.py §10)
LOCK_REFRESH_APP = 0x43544941  # an app context's token refresh


#: Connections ``Database.exclusive`` holds at most at once (PostgreSQL).
EXCLUSIVE_CONNECTIONS = 8

#: Seconds a new PostgreSQL connection of the pool may take (libpq's ``connect_timeout``).
PG_CONNECT_TIMEOUT = 10

#: TCP keepalives of the connections that hold advisory locks, on both ends: a replica whose host
#: vanished without closing them lets go of its locks after about idle + interval * count seconds,
#: not the kernel's 2 hours.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3


def keepalive_options() -> dict[str, Any]:
    """The psycopg connection arguments that set those keepalives (client and server side)."""
    return {
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE,
        "keepalives_interval": KEEPALIVE_INTERVAL,
        "keepalives_count": KEEPALIVE_COUNT,
        "options": (
            f"-c tcp_keepalives_idle={KEEPALIVE_IDLE}"
            f" -c tcp_keepalives_interval={KEEPALIVE_INTERVAL}"
            f" -c tcp_keepalives_count={KEEPALIVE_COUNT}"
        ),
    }


def psycopg_conninfo(url: str) -> str:
    """The libpq connection string of a ``postgresql[+psycopg]://`` database URL, for connections
    the daemon opens with psycopg itself (locks that must live on a connection of their own)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class _QuickSession:
    """The session of a quick unit of work (``Database._run_inline``), made only if the unit uses it.

    The delivery path's units run their statements on the transaction's connection
    (``session.connection()``, store/deliveries.py ``_driver``) and seldom touch the ORM (a cache
    miss). A ``Session`` joined to the connection's transaction, made, committed and closed per
    unit, cost about 35 us of the 55 us a unit's wrapping took (a few units per ingest batch and
    completion batch): here ``connection()`` is the connection itself, which is what the joined
    session would answer, and anything else makes the real session then (it joins the same
    transaction, so what the unit did before on the connection is part of it).
    """

    __slots__ = ("_conn", "_session")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._session: Session | None = None

    def connection(self, *args: Any, **kwargs: Any) -> Connection:
        if self._session is not None:
            return self._session.connection(*args, **kwargs)
        return self._conn

    def __getattr__(self, name: str) -> Any:
        if self._session is None:
            # Joins the connection's transaction; committing that is the caller's to do.
            self._session = Session(
                bind=self._conn, expire_on_commit=False, join_transaction_mode="rollback_only"
            )
        return getattr(self._session, name)

    def finish(self) -> None:
        """Flush what the unit left in the ORM session (as its commit would, in this join mode)."""
        if self._session is not None:
            self._session.commit()

    def close(self) -> None:
        if self._session is not None:
            self._session.close()


class Database:
    """The engine plus a thread pool for running units of work from asyncio code."""

    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine or make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._executor = ThreadPoolExecutor(
            max_workers=1 if self.is_sqlite else 8, thread_name_prefix="cti-db"
        )
        # Units of work handed to the thread and not finished yet (counted down by the thread
        # itself, so a cancelled caller does not make a running one look finished).
        self._in_thread = 0
        self._in_thread_lock = threading.Lock()
        # The connection of the quick units run in the loop's thread (SQLite), held for the
        # Database's life: no pool round trip per unit, and its own short wait for the write lock.
        self._inline_conn: Connection | None = None
        self._inline_commits = 0  # quick units committed in the loop's thread (for the checkpointer)
        self._checkpointer: _Checkpointer | None = None
        self._exclusive_slots = asyncio.Semaphore(EXCLUSIVE_CONNECTIONS)  # see ``exclusive``

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits when the block ends without an exception."""
        with Session(self.engine, expire_on_commit=False) as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def run_sync(self, fn: Callable[[Session], T]) -> T:
        with self.session() as session:
            return fn(session)

    async def run(self, fn: Callable[[Session], T], *, quick: bool = False) -> T:
        """Run ``fn(session)`` in the database thread and commit.

        ``quick``: a short unit of work of the delivery path; on SQLite it runs at once in the
        calling (loop) thread when the database thread is idle (see the module docstring).

        Cancellation: the awaiting task is cancelled at once, but the unit of work already handed
        to the thread runs to its end (commit or rollback); it is never torn half-way. A quick unit
        of work run in the loop's thread cannot be interrupted at all.
        """
        if quick and self.is_sqlite and self._in_thread == 0:
            ran, result = self._run_inline(fn)
            if ran:
                return result  # type: ignore[return-value]
        with self._in_thread_lock:
            self._in_thread += 1
        try:
            future = self._executor.submit(self.run_sync, fn)
        except BaseException:
            self._thread_done(None)
            raise
        future.add_done_callback(self._thread_done)
        return await asyncio.wrap_future(future)

    @contextlib.asynccontextmanager
    async def exclusive(self, namespace: int, key: int, *, wait: float = 30.0) -> AsyncIterator[None]:
        """Hold a lock named (``namespace``, ``key``) shared by every replica of this database, for
        a short piece of work that must not run in two replicas at once (a token refresh).

        PostgreSQL: a session-level advisory lock on a connection opened for it and closed after
        (closing lets go at once, whatever happened in between; a replica that dies lets go when
        its connection does). Waiting for another replica's hold is bounded by ``wait`` seconds,
        after which the work goes ahead without the lock (logged): what it guards must stay safe
        without it, only less tidy. SQLite has one process: nothing to take.

        Cancellation: the wait ends and the connection is closed, which lets go of the lock.
        """
        if self.is_sqlite:
            yield
            return
        conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        slot = False
        try:
            try:
                async with asyncio.timeout(wait):
                    # A connection per hold, at most EXCLUSIVE_CONNECTIONS at once: a start with
                    # every user's token expired must not take the server's last connections.
                    await self._exclusive_slots.acquire()
                    slot = True
                    # With keepalives: a replica whose host vanishes mid-refresh would otherwise
                    # hold the lock for hours, and every refresh elsewhere wait the whole ``wait``.
                    conn = await psycopg.AsyncConnection.connect(
                        psycopg_conninfo(self.url),
                        autocommit=True,
                        application_name="cti-bridge lock",
                        **keepalive_options(),
                    )
                    await conn.execute("SELECT pg_advisory_lock(%s, %s)", (namespace, key))
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.warning(
                    "the lock (%d, %d) could not be taken (%s); going ahead without it",
                    namespace,
                    key,
                    type(exc).__name__,
                )
            yield
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            if slot:
                self._exclusive_slots.release()

    async def run_outside_transaction(self, sql: str) -> None:
        """Run ``sql``, a statement that cannot run inside a transaction (VACUUM), on a connection
        of its own in autocommit mode, in the database thread pool. Only constant SQL: no
        parameters, nothing a user typed.

        Cancellation: on PostgreSQL the statement is cancelled in the server too (a VACUUM may run
        for minutes, and ``dispose`` waits for the thread pool: a stop must not wait for it).
        """
        running: list[Any] = []

        def work() -> None:
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                running.append(conn.connection.driver_connection)
                conn.exec_driver_sql(sql)

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, work)
        except asyncio.CancelledError:
            if running and not self.is_sqlite:
                with contextlib.suppress(Exception):
                    running[0].cancel_safe(timeout=2.0)  # psycopg: a cancel request of its own
            raise

    def _run_inline(self, fn: Callable[[Session], T]) -> tuple[bool, T | None]:
        """Run ``fn`` in this thread on the held connection; (False, None) if the write lock is
        held elsewhere for longer than INLINE_LOCK_WAIT_MS (nothing ran: the caller uses the
        database thread)."""
        conn = self._inline_conn
        if conn is None or conn.closed or conn.invalidated:
            conn = self._inline_conn = self.engine.connect()
            # Straight on the driver: through SQLAlchemy the PRAGMA would open a transaction.
            driver = conn.connection.driver_connection
            driver.execute(f"PRAGMA busy_timeout={INLINE_LOCK_WAIT_MS}")  # type: ignore[union-attr]
            if self._checkpointer is None and self._file_in_wal_mode(driver):
                self._checkpointer = _Checkpointer(self)
                self._checkpointer.start()
            if self._checkpointer is not None:
                driver.execute(f"PRAGMA wal_autocheckpoint={INLINE_AUTOCHECKPOINT_PAGES}")  # type: ignore[union-attr]
        try:
            transaction = conn.begin()  # BEGIN IMMEDIATE: the write lock, or "database is locked"
        except OperationalError:
            if conn.in_transaction():
                conn.rollback()
            return False, None
        try:
            session = _QuickSession(conn)
            try:
                result = fn(cast(Session, session))
                session.finish()
            finally:
                session.close()
            transaction.commit()
        except BaseException:
            if transaction.is_active:
                transaction.rollback()
            raise
        self._inline_commits += 1
        return True, result

    def _file_in_wal_mode(self, driver: Any) -> bool:
        """Whether the database is a file in WAL mode (an in-memory one has no WAL to checkpoint)."""
        mode = driver.execute("PRAGMA journal_mode").fetchone()
        return bool(self.engine.url.database) and mode is not None and str(mode[0]).lower() == "wal"

    @property
    def checkpoints(self) -> int:
        """Passive checkpoints the checkpoint thread has run (for tests)."""
        return self._checkpointer.done if self._checkpointer is not None else 0

    def _thread_done(self, _future: object) -> None:
        with self._in_thread_lock:
            self._in_thread -= 1

    @property
    def busy_in_thread(self) -> int:
        """Units of work handed to the database thread and not finished (for tests)."""
        return self._in_thread

    def ping(self) -> bool:
        """Whether the database answers a trivial query."""
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except Exception:
            log.warning("database ping failed", exc_info=True)
            return False

    def dispose(self, *, wait: bool = True) -> None:
        """Close the engine and the database threads. ``wait=False`` (a stop): a thread held by a
        database that does not answer is not waited for here (the process's exit decides, cli.py),
        and work queued behind it is dropped."""
        self._executor.shutdown(wait=wait, cancel_futures=not wait)
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._inline_conn is not None:
            self._inline_conn.close()
            self._inline_conn = None
        self.engine.dispose()


class _Checkpointer(threading.Thread):
    """Passive WAL checkpoints of an SQLite file, off the loop's thread (see the module docstring).

    Its own driver connection, outside the pool. A passive checkpoint takes no lock a writer needs
    and never waits, so a failure (the file busy with another process's checkpoint) is simply
    tried again at the next interval.
    """

    def __init__(self, db: Database) -> None:
        super().__init__(name="cti-db-checkpoint", daemon=True)
        self._db = db
        self._stopping = threading.Event()
        self.done = 0

    def run(self) -> None:
        conn = sqlite3.connect(str(self._db.engine.url.database), isolation_level=None)
        seen = -1
        try:
            while not self._stopping.wait(CHECKPOINT_INTERVAL):
                commits = self._db._inline_commits
                if commits == seen:
                    continue  # nothing new in the WAL from the loop's thread
                seen = commits
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.done += 1
                except sqlite3.Error as exc:
                    log.warning("WAL checkpoint failed (%s); trying again", type(exc).__name__)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=10)


class InstanceLock:
    """An exclusive lock file beside an SQLite database: a second daemon on it fails fast."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the process
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise StoreLockedError(
                f"another cti-bridge process is already running on this database (lock {self.path})"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
