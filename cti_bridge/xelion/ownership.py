"""Which replica listens on an integration's websocket (DESIGN.md §5).

Several replicas may share one PostgreSQL database. Each integration's websocket must be read by
one of them at a time, for two reasons found by running two replicas side by side:

- xelion-protocol.md §2: the source logs in with a fixed userSpace and presents the stored token of
  the last live session, which ENDS that session. Two replicas sharing the stored token kept ending
  each other's sessions (and websockets) at start, then settled on two sessions in two userSpaces.
- Then every event arrived twice: two ingest transactions per event, every stored event counted as
  a duplicate of itself, and two Xelion sessions held for one integration.

So the websocket of an integration belongs to the replica holding a session-level PostgreSQL
advisory lock, ``pg_try_advisory_lock(NAMESPACE, xelion_context_id)``, on a connection of its own
(:class:`PostgresOwnership`). The others stand by and try again every ``poll_seconds``. The lock
lives as long as the connection: a replica that dies loses it when the server notices, which the
connection's TCP keepalives bound to about 25 s when the replica's host vanishes without closing
it (at once when the process dies and its kernel closes the socket). The owner checks its lock
connection every ``poll_seconds``; when it fails, every lock of the replica is gone and each of its
sources is told (``Held.lost``) so it stops before another replica takes over for long.

Two replicas may still overlap for a moment (the server released a lock before its holder noticed).
That costs nothing but a duplicate ingest (the dedupe key makes it one event) and is fenced where it
would: a source writes the integration's shared state (its state, gaps, the stored session token)
only after :meth:`Held.confirm` has checked with the server that the lock is still its own.

With SQLite there is one process (the lock file of ``store/db.py`` guards that): every integration is
always this process's own (:class:`LocalOwnership`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

import psycopg

from cti_bridge.clock import Clock, SystemClock
from cti_bridge.store.db import (
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    LOCK_SOURCE_OWNER,
    keepalive_options,
    psycopg_conninfo,
)

log = logging.getLogger(__name__)

#: The first key of the locks: two int4 keys, apart from the daemon's other advisory locks.
NAMESPACE = LOCK_SOURCE_OWNER


@dataclass(eq=False)
class Held:
    """This replica's ownership of one integration's websocket, from ``acquire`` to ``release``.

    ``since``: the last time another replica was seen holding it (None: none was), which is where the
    gap of a takeover starts. ``lost`` is set when the ownership is gone (the lock connection failed).
    """

    xelion_context_id: int
    since: datetime | None
    generation: int
    owner: Ownership
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    async def confirm(self) -> bool:
        """True if this is still this replica's (asks the server, for PostgreSQL). Sets ``lost`` if not."""
        if self.lost.is_set():
            return False
        ok = await self.owner.confirm(self)
        if not ok:
            self.lost.set()
        return ok


class Ownership(Protocol):
    """Who listens on which integration's websocket (implemented per database)."""

    async def acquire(self, xelion_context_id: int) -> Held:
        """Wait until this replica owns the integration's websocket.

        Cancellation: nothing is held (a lock taken in the same moment is let go).
        """
        ...

    @property
    def silent_loss(self) -> timedelta:
        """How long a replica that vanished may keep its locks after it stopped reading."""
        ...

    def held_elsewhere(self, xelion_context_id: int) -> bool:
        """True if the last try found another replica holding it (a standby proper; False when the
        server did not answer, so nobody may be listening)."""
        ...

    def retain(self, xelion_context_id: int) -> Held | None:
        """Another hold on an integration this replica owns now (None if it does not): a restart
        hands it to the new source so that no other replica takes over in between."""
        ...

    async def release(self, held: Held) -> None:
        """Give up one hold; the lock goes when the last hold of the integration does."""
        ...

    async def confirm(self, held: Held) -> bool:
        """Whether ``held`` is still this replica's."""
        ...

    async def aclose(self) -> None:
        """Let go of everything (the daemon is stopping)."""
        ...


class LocalOwnership:
    """One process: every integration is ours, at once and for good."""

    async def acquire(self, xelion_context_id: int) -> Held:
        return Held(xelion_context_id, None, 0, self)

    def held_elsewhere(self, xelion_context_id: int) -> bool:
        return False

    @property
    def silent_loss(self) -> timedelta:
        return timedelta(0)

    def retain(self, xelion_context_id: int) -> Held | None:
        return Held(xelion_context_id, None, 0, self)

    async def release(self, held: Held) -> None:
        return None

    async def confirm(self, held: Held) -> bool:
        return True

    async def aclose(self) -> None:
        return None


class PostgresOwnership:
    """Session-level advisory locks on one connection of this replica's own (see the module)."""

    def __init__(
        self,
        database_url: str,
        *,
        poll_seconds: float = 5.0,
        connect_timeout: float = 10.0,
        clock: Clock | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self._conninfo = psycopg_conninfo(database_url)
        self.poll_seconds = poll_seconds
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._clock = clock or SystemClock()
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._generation = 0
        # integration -> this replica's holds of it; the lock is held while the list is not empty
        self._holds: dict[int, list[Held]] = {}
        self._lock = asyncio.Lock()  # one statement at a time on the connection, and the holds
        self._guard: asyncio.Task[None] | None = None
        self._elsewhere: set[int] = set()  # integrations another replica held at the last try
        self._tasks: set[asyncio.Future[None]] = set()  # releases running on their own
        self._warned = False
        self._closed = False

    @property
    def held(self) -> frozenset[int]:
        """The integrations this replica owns now."""
        return frozenset(self._holds)

    def held_elsewhere(self, xelion_context_id: int) -> bool:
        return xelion_context_id in self._elsewhere

    @property
    def idle_timeout(self) -> float:
        """Seconds after which the server ends a lock connection that ran no statement: a live
        owner checks it every ``poll_seconds``, so only a hung one (SIGSTOP, a frozen VM, whose
        kernel still answers keepalives) is cut off, and its integrations taken over."""
        if self._idle_timeout is not None:
            return self._idle_timeout
        return max(3 * self.poll_seconds, 15.0)

    @property
    def silent_loss(self) -> timedelta:
        # The server's keepalives end a vanished replica's session (and locks) after this long, its
        # idle timeout a hung one's; the replica itself notices a failing lock connection within one
        # poll interval.
        keepalive = KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT
        return timedelta(seconds=max(keepalive, self.idle_timeout) + self.poll_seconds)

    async def acquire(self, xelion_context_id: int) -> Held:
        seen: datetime | None = None
        while True:
            # Each try runs to its end in a task of its own: a cancelled wait must not leave a lock
            # the server granted in the same moment held by nobody (the next holder would wait
            # for as long as this replica's connection lives).
            attempt = asyncio.ensure_future(self._attempt(xelion_context_id, seen))
            try:
                held, got = await asyncio.shield(attempt)
            except asyncio.CancelledError:
                attempt.add_done_callback(self._let_go)
                raise
            if held is not None:
                return held
            if got is False:
                seen = self._clock.now()
            await asyncio.sleep(self.poll_seconds)

    def retain(self, xelion_context_id: int) -> Held | None:
        if xelion_context_id not in self._holds:
            return None
        return self._hold(xelion_context_id, None)

    async def release(self, held: Held) -> None:
        # Shielded like a try: a cancelled caller must not leave the unlock half done.
        await asyncio.shield(self._release_on_its_own(held))

    async def confirm(self, held: Held) -> bool:
        async with self._lock:
            if held.generation != self._generation or self._conn is None:
                return False
            try:
                async with asyncio.timeout(self.poll_seconds):
                    cur = await self._conn.execute(
                        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
                        " AND pid = pg_backend_pid() AND objsubid = 2"
                        " AND classid::bigint = %s AND objid::bigint = %s)",
                        (NAMESPACE, held.xelion_context_id),
                    )
                    row = await cur.fetchone()
            except (psycopg.Error, OSError, TimeoutError) as exc:
                self._drop(exc)
                return False
            return bool(row and row[0])

    async def aclose(self) -> None:
        async with self._lock:
            self._closed = True
            if self._guard is not None:
                self._guard.cancel()
                self._guard = None
            self._drop(None)

    # -- internals --------------------------------------------------------------------------------

    async def _attempt(
        self, xelion_context_id: int, seen: datetime | None
    ) -> tuple[Held | None, bool | None]:
        """One try: (the hold, True) if this replica owns it now; (None, False) if another replica
        holds it; (None, None) if the server did not answer (who holds it is unknown)."""
        async with self._lock:
            if self._closed:
                raise RuntimeError("ownership closed")
            if xelion_context_id in self._holds:
                return self._hold(xelion_context_id, seen), True
            try:
                got: bool | None = await self._try_lock(xelion_context_id)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                self._drop(exc)
                got = None
            if got:
                self._elsewhere.discard(xelion_context_id)
                log.info("this replica now owns the websocket of integration %d", xelion_context_id)
                return self._hold(xelion_context_id, seen), True
            if got is False:
                self._elsewhere.add(xelion_context_id)
            else:
                self._elsewhere.discard(xelion_context_id)
            return None, got

    def _let_go(self, attempt: asyncio.Future[tuple[Held | None, bool | None]]) -> None:
        """A try whose waiter was cancelled: give back what it got."""
        if attempt.cancelled() or attempt.exception() is not None:
            return
        held, _ = attempt.result()
        if held is not None:
            self._release_on_its_own(held)

    def _release_on_its_own(self, held: Held) -> asyncio.Future[None]:
        """``_release`` in a task of its own (kept referenced until done), which a cancelled
        caller cannot interrupt."""
        task = asyncio.ensure_future(self._release(held))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _release(self, held: Held) -> None:
        async with self._lock:
            holds = self._holds.get(held.xelion_context_id, [])
            if held.generation != self._generation or held not in holds:
                return  # its lock went with an earlier connection
            holds.remove(held)
            if holds:
                return
            del self._holds[held.xelion_context_id]
            conn = self._conn
            if conn is None:
                return
            try:
                async with asyncio.timeout(self.poll_seconds):
                    await conn.execute(
                        "SELECT pg_advisory_unlock(%s, %s)", (NAMESPACE, held.xelion_context_id)
                    )
            except (psycopg.Error, OSError, TimeoutError) as exc:
                self._drop(exc)  # a connection that fails has let go of its locks
            log.info("this replica let go of the websocket of integration %d", held.xelion_context_id)

    def _hold(self, xelion_context_id: int, since: datetime | None) -> Held:
        held = Held(xelion_context_id, since, self._generation, self)
        self._holds.setdefault(xelion_context_id, []).append(held)
        if self._guard is None or self._guard.done():
            self._guard = asyncio.create_task(self._check(), name="source-ownership-check")
        return held

    async def _try_lock(self, xelion_context_id: int) -> bool:
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connect()
            self._conn = conn
            if self._warned:
                log.info("the source ownership connection to PostgreSQL is back")
                self._warned = False
        async with asyncio.timeout(self.poll_seconds):
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (NAMESPACE, xelion_context_id))
            row = await cur.fetchone()
        return bool(row and row[0])

    async def _connect(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        conn = await asyncio.wait_for(
            psycopg.AsyncConnection.connect(
                self._conninfo,
                autocommit=True,
                connect_timeout=max(1, int(self._connect_timeout)),
                application_name="cti-bridge source owner",
                **keepalive_options(),
            ),
            self._connect_timeout + 1,
        )
        if conn.info.server_version >= 140000:  # idle_session_timeout is new in PostgreSQL 14
            try:
                async with asyncio.timeout(self.poll_seconds):
                    await conn.execute(
                        "SELECT set_config('idle_session_timeout', %s, false)",
                        (f"{int(self.idle_timeout * 1000)}ms",),
                    )
            except BaseException:
                await conn.close()
                raise
        return conn

    def _drop(self, exc: BaseException | None) -> None:
        """The connection failed (or we are closing): every lock of it is gone; tell every holder."""
        if exc is not None and not self._warned:
            log.warning(
                "the source ownership connection to PostgreSQL failed (%s); this replica's websockets "
                "stop until it owns them again",
                type(exc).__name__,
            )
            self._warned = True
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            # Closing drops the session, and with it the locks, at once (no statement needed).
            with contextlib.suppress(Exception):
                conn.pgconn.finish()
        self._generation += 1
        for holds in self._holds.values():
            for held in holds:
                held.lost.set()
        self._holds.clear()

    async def _check(self) -> None:
        """While anything is held: is the lock connection still alive? (``poll_seconds`` apart)."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            async with self._lock:
                if not self._holds:
                    return
                conn = self._conn
                try:
                    if conn is None:
                        raise psycopg.OperationalError("no connection")
                    async with asyncio.timeout(self.poll_seconds):
                        await conn.execute("SELECT 1")
                except (psycopg.Error, OSError, TimeoutError) as exc:
                    self._drop(exc)
                    return
