"""Whether the database and pipeline work of an event grows with the tenant's configuration
(issue 7, item 3): ingest + claim + completion of N events, in batches of 24, in the loop's thread
as the daemon runs them (``Database.run(quick=True)`` on SQLite), with U users with credentials
and M mappings (4 that apply, the rest with a ``calleePhoneNumber == '...'`` condition that does
not hold), events spread over the users. Two rounds of N events; prints microseconds per event.

Wall time here is as noisy as the machine; instruction counts are not. Per event, from two runs
that differ only in N (what start-up and configuration cost cancels out):

    for n in 1000 2000; do N=$n valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/store_scale.py 1 4; done          # and again with 1000 200
    # instructions per event = (I refs at 2000 - I refs at 1000) / 2000

    .venv/bin/python bench/store_scale.py USERS MAPPINGS         # N from the environment, 4000
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime

import bench_store
from bench_store import attempt
from sqlmodel import Session, select

from cti_bridge.pipeline import Pipeline
from cti_bridge.routing import MappingCache, RoutingCache
from cti_bridge.store import migrate
from cti_bridge.store.db import Database, make_engine
from cti_bridge.store.deliveries import Completion, claim_due, complete_many
from cti_bridge.store.models import CrmContext, EventUriMapping, UserCredentials

EVENTS = bench_store.EVENT_TYPES
BATCH = 24  # about what an ingest batch holds in bench_e2e.py's runs


def configure(db: Database, users: int, mappings: int) -> int:
    """bench_store.py's integration (anne, one mapping per event type), plus ``users - 1`` more
    users and ``mappings - 4`` more mappings."""
    ctx = bench_store.configure(db)

    def more(s: Session) -> None:
        crm_id = s.exec(select(CrmContext.id).where(CrmContext.xelion_context_id == ctx)).one()
        for i in range(1, users):
            # Secrets of about a real credential's size, so the rows are as large as the daemon's.
            s.add(
                UserCredentials(
                    crm_context_id=crm_id,
                    xelion_username=user(i),
                    xelion_oid=str(10000 + i),
                    refresh_token_enc="x" * 200,
                    access_token_enc="y" * 300,
                    token_extra_enc="z" * 100,
                )
            )
        for i in range(4, mappings):
            s.add(
                EventUriMapping(
                    crm_context_id=crm_id,
                    xelion_event=EVENTS[i % 4],
                    crm_resource_uri="http://127.0.0.1:3/c",
                    crm_resource_payload=json.dumps({"a": "${callId}"}),
                    condition=f"${{calleePhoneNumber == '+319900{i:05d}'}}",
                )
            )

    db.run_sync(more)
    return ctx


def user(i: int) -> str:
    return "anne" if i == 0 else f"u{i:04d}"


def fields(prefix: str, i: int, users: int) -> tuple[str, dict[str, object]]:
    """bench_store.py's event ``i``, for one of the ``users`` in turn."""
    kind, f = bench_store.fields(prefix, i)
    f["calleeUser"] = user(i % users)
    return kind, f


async def rounds(db: Database, ctx: int, users: int, mappings: int, n: int) -> None:
    pipeline = Pipeline(db, RoutingCache(MappingCache()))
    for r in range(2):
        t0 = time.perf_counter()
        for start in range(0, n, BATCH):
            items = [(ctx, *fields(f"r{r}", i, users)) for i in range(start, start + BATCH)]
            await db.run(lambda s, items=items: pipeline._ingest_batch(s, items, None), quick=True)
            now = datetime.now(UTC)
            got = await db.run(
                lambda s, now=now: claim_due(s, now=now, limit=BATCH, lease_seconds=120), quick=True
            )
            done = [Completion(g.id, g.claim, "delivered", attempt(now)) for g in got]
            await db.run(lambda s, done=done, now=now: complete_many(s, done, now=now), quick=True)
        per_event = (time.perf_counter() - t0) / n * 1e6
        print(f"users {users}, mappings {mappings}: round {r}: {per_event:.1f} us per event", flush=True)


def main() -> None:
    users, mappings = int(sys.argv[1]), int(sys.argv[2])
    n = int(os.environ.get("N", "4000"))
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/store-scale.db"
        engine = make_engine(url)
        migrate.upgrade(engine)
        database = Database(url, engine=engine)
        try:
            asyncio.run(rounds(database, configure(database, users, mappings), users, mappings, n))
        finally:
            database.dispose()


if __name__ == "__main__":
    main()
