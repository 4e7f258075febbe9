"""The database: engine set-up for SQLite and PostgreSQL, sessions, and running queries off the loop.

Queries are plain synchronous SQLModel code. ``Database.run`` executes one unit of work in a worker
thread and commits it, so the asyncio loop never blocks on the database. SQLite gets one writer
thread (it has one writer anyway) and every transaction starts with ``BEGIN IMMEDIATE``, so a
transaction never fails half-way by upgrading a read lock; WAL mode lets readers go on meanwhile.
``synchronous=NORMAL`` in WAL mode keeps every committed transaction across a process crash
(``kill -9``); only an OS crash or power loss may lose the last ones.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from cti_bridge.errors import StoreLockedError

log = logging.getLogger(__name__)
T = TypeVar("T")


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
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True, hide_parameters=True)


class Database:
    """The engine plus a thread pool for running units of work from asyncio code."""

    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine or make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._executor = ThreadPoolExecutor(
            max_workers=1 if self.is_sqlite else 8, thread_name_prefix="cti-db"
        )

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

    async def run(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` in the database thread and commit.

        Cancellation: the awaiting task is cancelled at once, but the unit of work already handed
        to the thread runs to its end (commit or rollback); it is never torn half-way.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run_sync, fn)

    def ping(self) -> bool:
        """Whether the database answers a trivial query."""
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except Exception:
            log.warning("database ping failed", exc_info=True)
            return False

    def dispose(self) -> None:
        self._executor.shutdown(wait=True)
        self.engine.dispose()


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
