"""What the database work of one event costs, one at a time and in batches (the store's functions,
unchanged, on a fresh SQLite file or PostgreSQL database).

The daemon's database work per event is three transactions' worth: the pipeline's ingest (event +
delivery), the worker's claim (skipped for deliveries handed off at ingest), and the completion.
The daemon batches all three (group commit); this measures each of them one at a time (one event,
one claimed delivery, one completion per transaction: what a trickle of events costs) and batched
(B events in one transaction; claim_due with limit B; B completions in one transaction), plus the
claim with a backlog, and the fixed costs around them: an empty round trip to the
database thread, and an empty transaction (BEGIN IMMEDIATE / COMMIT on SQLite). Single thread, no
event loop in the timed parts except the round trip, so these are the database work's own costs.

    .venv/bin/python bench/bench_store.py [--db sqlite|postgresql|both] [--events 1000] [--batch 64]
                                          [--backlog 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench_e2e import create_pg_database, drop_pg_database
from sqlalchemy import text
from sqlmodel import Session

from cti_bridge.pipeline import Pipeline
from cti_bridge.routing import MappingCache, RoutingCache
from cti_bridge.store import migrate
from cti_bridge.store.db import Database, make_engine
from cti_bridge.store.deliveries import AttemptRecord, Claimed, claim_due, complete
from cti_bridge.store.models import CrmContext, EventUriMapping, UserCredentials, XelionContext

RELEASE = text(
    "UPDATE delivery SET state = 'pending', lease_owner = NULL, lease_expires_at = NULL"
    " WHERE state = 'sending'"
)
EVENT_TYPES = ("newCallEvent", "callConnectedEvent", "callHungUpEvent", "missedCallEvent")


def configure(db: Database) -> int:
    """One integration: one user with credentials, one mapping per event type."""

    def work(s: Session) -> int:
        xc = XelionContext(
            host="127.0.0.1:1", tenant="master", admin_username="admin", admin_password_enc="x"
        )
        s.add(xc)
        s.flush()
        assert xc.id is not None
        crm = CrmContext(xelion_context_id=xc.id, authorization_server_uri="http://127.0.0.1:2/oauth2/token")
        s.add(crm)
        s.flush()
        assert crm.id is not None
        s.add(UserCredentials(crm_context_id=crm.id, xelion_username="anne", xelion_oid="1650939"))
        for event in EVENT_TYPES:
            payload = {
                "callId": "${callId}",
                "from": "${callerPhoneNumber}",
                "user": "${user.xelionUsername}",
            }
            s.add(
                EventUriMapping(
                    crm_context_id=crm.id,
                    xelion_event=event,
                    crm_resource_uri="http://127.0.0.1:3/services/apexrest/Call",
                    crm_resource_payload=json.dumps(payload),
                )
            )
        return xc.id

    return db.run_sync(work)


def fields(prefix: str, i: int) -> tuple[str, dict[str, object]]:
    return EVENT_TYPES[i % 4], {
        "callId": f"{prefix}-{i}",
        "initiation": "incoming",
        "date": "2026-01-01 12:00:00",
        "callerPhoneNumber": f"+316{i:08d}",
        "calleePhoneNumber": "+31152511401",
        "callerUser": None,
        "calleeUser": "anne",
        "calleeFlowId": f"f-{i}",
    }


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def attempt(now: datetime) -> AttemptRecord:
    return AttemptRecord(
        started_at=now,
        duration_ms=3,
        outcome="delivered",
        http_status=201,
        error=None,
        request_method="POST",
        request_url="http://127.0.0.1:3/services/apexrest/Call",
        request_excerpt='{"callId":"x","from":"+31612345678","user":"anne"}',
        response_excerpt='{"ok":true}',
    )


def measure(url: str, n: int, batch: int, backlog: int, backlog_small: int = 100) -> dict[str, float]:
    engine = make_engine(url)
    migrate.upgrade(engine)
    db = Database(url, engine=engine)
    ctx = configure(db)
    pipeline = Pipeline(db, RoutingCache(MappingCache()))
    out: dict[str, float] = {}

    def us(seconds: float, count: int) -> float:
        return round(seconds / count * 1e6, 1)

    # Fixed costs: a round trip to the database thread, an empty transaction.
    async def round_trips() -> float:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        for _ in range(n):
            await loop.run_in_executor(db._executor, lambda: None)
        return time.perf_counter() - t0

    out["thread_round_trip_us"] = us(asyncio.run(round_trips()), n)
    out["empty_transaction_us"] = us(
        timed(lambda: [db.run_sync(lambda s: s.execute(text("SELECT 1"))) for _ in range(n)]), n
    )

    # Ingest: one event per transaction (one at a time), then `batch` events per transaction.
    def ingest_one(prefix: str) -> None:
        for i in range(n):
            kind, f = fields(prefix, i)
            db.run_sync(lambda s, kind=kind, f=f: pipeline.ingest_sync(s, ctx, kind, f))

    def ingest_batched(prefix: str) -> None:
        for start in range(0, n, batch):

            def work(s: Session, start: int = start) -> None:
                for i in range(start, min(n, start + batch)):
                    kind, f = fields(prefix, i)
                    pipeline.ingest_sync(s, ctx, kind, f)

            db.run_sync(work)

    ingest_one("warm")  # routing cache, statement caches, pages
    out["ingest_1_us"] = us(timed(lambda: ingest_one("one")), n)
    out[f"ingest_{batch}_us"] = us(timed(lambda: ingest_batched("batch")), n)

    # Claim: limit 1 (what a trickle of events gives the worker), then limit `batch`.
    now = datetime.now(UTC)
    claimed: list[Claimed] = []

    def claim(limit: int, count: int) -> None:
        while count > 0:
            take = min(limit, count)
            got = db.run_sync(lambda s, take=take: claim_due(s, now=now, limit=take, lease_seconds=120))
            if not got:
                raise RuntimeError("nothing to claim")
            claimed.extend(got)
            count -= len(got)

    claim(batch, n)  # the warm-up events
    out["claim_1_us"] = us(timed(lambda: claim(1, n)), n)
    out[f"claim_{batch}_us"] = us(timed(lambda: claim(batch, n)), n)

    # Completion: one per transaction (one at a time), then `batch` per transaction.
    def complete_one(items: list[Claimed]) -> None:
        for item in items:
            db.run_sync(
                lambda s, item=item: complete(
                    s, delivery_id=item.id, claim=item.claim, state="delivered", now=now, attempt=attempt(now)
                )
            )

    def complete_batched(items: list[Claimed]) -> None:
        for start in range(0, len(items), batch):

            def work(s: Session, chunk: list[Claimed] = items[start : start + batch]) -> None:
                for item in chunk:
                    complete(
                        s,
                        delivery_id=item.id,
                        claim=item.claim,
                        state="delivered",
                        now=now,
                        attempt=attempt(now),
                    )

            db.run_sync(work)

    complete_one(claimed[:n])
    out["complete_1_us"] = us(timed(lambda: complete_one(claimed[n : 2 * n])), n)
    out[f"complete_{batch}_us"] = us(timed(lambda: complete_batched(claimed[2 * n : 3 * n])), n)

    today = out["ingest_1_us"] + out["claim_1_us"] + out["complete_1_us"]
    batched = out[f"ingest_{batch}_us"] + out[f"claim_{batch}_us"] + out[f"complete_{batch}_us"]
    out["per_event_today_us"] = round(today, 1)
    out["per_event_batched_us"] = round(batched, 1)
    out["db_thread_ceiling_today_per_s"] = round(1e6 / today)
    out["db_thread_ceiling_batched_per_s"] = round(1e6 / batched)

    # The claim query sorts every due row before its LIMIT: its cost grows with the backlog (a CRM
    # outage, a slow CRM). Claim limit 1 with `backlog` deliveries due.
    pending = 0
    for b in (backlog_small, backlog):
        add = b - pending
        for start in range(0, add, 500):

            def fill(s: Session, start: int = start, add: int = add, base: int = pending) -> None:
                for i in range(base + start, base + min(add, start + 500)):
                    kind, f = fields("backlog", i)
                    pipeline.ingest_sync(s, ctx, kind, f)

            db.run_sync(fill)
        pending = b
        rounds = 20
        later = datetime.now(UTC)  # every delivery created so far is due

        def claim_rounds(rounds: int = rounds, later: datetime = later) -> None:
            for _ in range(rounds):
                db.run_sync(lambda s: claim_due(s, now=later, limit=1, lease_seconds=120))

        out[f"claim_1_backlog_{b}_us"] = us(timed(claim_rounds), rounds)
        db.run_sync(lambda s: s.execute(RELEASE))
    db.dispose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--backlog", type=int, default=10000, help="due deliveries for the last claim row")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for db in ["sqlite", "postgresql"] if args.db == "both" else [args.db]:
        if db == "sqlite":
            workdir = Path(tempfile.mkdtemp(prefix="cti-bench-store-"))
            try:
                results[db] = measure(
                    f"sqlite:///{workdir / 'store.db'}", args.events, args.batch, args.backlog
                )
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        else:
            name, url = create_pg_database()
            try:
                results[db] = measure(url, args.events, args.batch, args.backlog)
            finally:
                drop_pg_database(name)
    b = args.batch
    rows = [
        ("round trip to the database thread (empty)", "thread_round_trip_us"),
        ("empty transaction (SELECT 1)", "empty_transaction_us"),
        ("ingest, 1 event per transaction (one at a time)", "ingest_1_us"),
        (f"ingest, {b} events per transaction", f"ingest_{b}_us"),
        ("claim, limit 1 (a trickle of events)", "claim_1_us"),
        (f"claim, limit {b}", f"claim_{b}_us"),
        ("completion, 1 per transaction (one at a time)", "complete_1_us"),
        (f"completion, {b} per transaction", f"complete_{b}_us"),
        ("database work per event, one at a time", "per_event_today_us"),
        (f"database work per event, batched by {b}", "per_event_batched_us"),
        ("  = ceiling of one database thread, one at a time (ev/s)", "db_thread_ceiling_today_per_s"),
        (f"  = ceiling, batched by {b} (ev/s)", "db_thread_ceiling_batched_per_s"),
        ("claim, limit 1, with 100 deliveries due", "claim_1_backlog_100_us"),
        (f"claim, limit 1, with {args.backlog:,} deliveries due", f"claim_1_backlog_{args.backlog}_us"),
    ]
    print(f"store costs, microseconds per event or delivery ({args.events:,} of each, one thread)")
    print(f"{'':<52}" + "".join(f"{db:>12}" for db in results))
    for label, key in rows:
        print(f"  {label:<50}" + "".join(f"{results[db][key]:>12,.1f}" for db in results))


if __name__ == "__main__":
    main()
