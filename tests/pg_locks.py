"""What an operator sees of the daemon's PostgreSQL advisory locks, for the replica tests: who holds
an integration's websocket lock (xelion/ownership.py), and ending a session in the server (what a
PostgreSQL restart, a failover or an operator's pg_terminate_backend does to a replica)."""

from __future__ import annotations

import psycopg

from cti_bridge.store.db import psycopg_conninfo
from cti_bridge.xelion.ownership import NAMESPACE


async def holder_pids(pg_url: str, xelion_context_id: int) -> list[int]:
    """The server processes holding the integration's websocket lock. Advisory locks belong to one
    database, and pg_locks lists every database's: another cti-bridge on the same server (a second
    test run, a daemon on its own database) holds the same keys there."""
    async with await psycopg.AsyncConnection.connect(psycopg_conninfo(pg_url), autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND classid::bigint = %s AND objid::bigint = %s",
            (NAMESPACE, xelion_context_id),
        )
        return [int(row[0]) for row in await cur.fetchall()]


async def terminate(pg_url: str, pid: int) -> None:
    """End server process ``pid``'s session (its session-level locks go with it)."""
    async with await psycopg.AsyncConnection.connect(psycopg_conninfo(pg_url), autocommit=True) as conn:
        await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


async def terminate_holder(pg_url: str, xelion_context_id: int) -> None:
    """End the session of the one holder of the integration's websocket lock."""
    (pid,) = await holder_pids(pg_url, xelion_context_id)
    await terminate(pg_url, pid)
