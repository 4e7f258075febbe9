"""Database.exclusive (store/db.py): a lock every replica of a PostgreSQL database shares, for
short work that must not run in two replicas at once (a token refresh, delivery/oauth.py §10).
Two ``Database`` objects on one database stand for two replicas. SQLite has one process and takes
nothing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import text

from cti_bridge.store import migrate
from cti_bridge.store.db import EXCLUSIVE_CONNECTIONS, Database, make_engine
from tests.conftest import create_pg_database, drop_pg_database

NS = 7


@pytest.fixture
def replicas(pg_server: str) -> Iterator[tuple[Database, Database]]:
    url = create_pg_database(pg_server)
    engine = make_engine(url)
    migrate.upgrade(engine)
    a, b = Database(url, engine=engine), Database(url)
    try:
        yield a, b
    finally:
        b.dispose()
        a.dispose()
        drop_pg_database(pg_server, url)


async def test_one_holder_at_a_time_across_replicas(replicas: tuple[Database, Database]) -> None:
    a, b = replicas
    order: list[str] = []
    a_holds = asyncio.Event()
    a_may_go = asyncio.Event()

    async def first() -> None:
        async with a.exclusive(NS, 1):
            order.append("a in")
            a_holds.set()
            await a_may_go.wait()
            order.append("a out")

    async def second() -> None:
        await a_holds.wait()
        async with b.exclusive(NS, 1):
            order.append("b in")

    tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
    await a_holds.wait()
    # Another key is free meanwhile.
    async with b.exclusive(NS, 2):
        order.append("b other key")
    await asyncio.sleep(0.3)
    assert "b in" not in order  # b waits for a
    a_may_go.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert order == ["a in", "b other key", "a out", "b in"]


async def test_a_cancelled_wait_holds_nothing(replicas: tuple[Database, Database]) -> None:
    a, b = replicas
    release = asyncio.Event()

    async def hold() -> None:
        async with a.exclusive(NS, 3):
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.2)

    async def wait_for_it() -> None:
        async with b.exclusive(NS, 3):
            raise AssertionError("got a lock that is held")

    waiter = asyncio.create_task(wait_for_it())
    await asyncio.sleep(0.2)
    waiter.cancel()
    await asyncio.wait({waiter})
    assert waiter.cancelled()
    release.set()
    await holder
    # Neither the cancelled waiter nor a's finished hold keeps it.
    async with asyncio.timeout(5):
        async with b.exclusive(NS, 3):
            pass


async def test_a_lock_not_had_in_time_lets_the_work_go_ahead(
    replicas: tuple[Database, Database], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = replicas
    async with a.exclusive(NS, 4):
        with caplog.at_level(logging.WARNING, logger="cti_bridge.store.db"):
            ran = False
            async with b.exclusive(NS, 4, wait=0.3):
                ran = True
    assert ran
    assert "could not be taken (TimeoutError); going ahead without it" in caplog.text


async def test_holds_use_a_bounded_number_of_connections(replicas: tuple[Database, Database]) -> None:
    a, _ = replicas
    inside = 0
    most = 0
    seen_connections = 0

    def lock_connections() -> int:
        with a.engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'cti-bridge lock'")
                ).scalar_one()
            )

    async def hold(key: int) -> None:
        nonlocal inside, most, seen_connections
        async with a.exclusive(NS, key):
            inside += 1
            most = max(most, inside)
            seen_connections = max(seen_connections, await asyncio.to_thread(lock_connections))
            await asyncio.sleep(0.05)
            inside -= 1

    await asyncio.wait_for(asyncio.gather(*(hold(k) for k in range(100, 130))), 30)
    assert most == EXCLUSIVE_CONNECTIONS
    assert 0 < seen_connections <= EXCLUSIVE_CONNECTIONS


async def test_sqlite_takes_nothing(sqlite_database: Database) -> None:
    async with sqlite_database.exclusive(NS, 1):
        async with sqlite_database.exclusive(NS, 1):  # one process: no lock to wait for
            pass


async def test_a_lock_connection_sets_keepalives_on_both_ends(
    replicas: tuple[Database, Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica whose host vanishes in the middle of a refresh must let go of the lock within
    about 25 s, as its websocket lock does, not after the kernel's 2 hours (each refresh of that
    credential elsewhere waited the whole 30 s meanwhile)."""
    a, _ = replicas
    real = psycopg.AsyncConnection.connect
    seen: list[dict[str, object]] = []

    async def recording(*args: object, **kwargs: object) -> object:
        seen.append(kwargs)
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", recording)
    async with a.exclusive(NS, 5):
        pass
    (kwargs,) = seen
    assert (kwargs["keepalives"], kwargs["keepalives_idle"], kwargs["keepalives_count"]) == (1, 10, 3)
    assert "tcp_keepalives_idle=10" in str(kwargs["options"])
