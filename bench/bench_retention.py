"""What a retention pass costs (README "Retention"): N delivered events with their attempts and
N/10 dead ones (kept: dead retention 0) are stored through the store's own functions, then the
retention job's own batches (``Retention.batches``, 200 rows, without the pause between them)
delete the delivered history 31 days later. Prints rows deleted per second, how long one batch
holds the database (the write lock on SQLite: what ingest waits for at most), the
database's size before and after, and two more passes: one right after (nothing to delete, the
event walk starts where it stopped) and one as after a restart (the walk starts at the beginning
and goes past every kept event once).

    .venv/bin/python bench/bench_retention.py [--db sqlite|postgresql|both] [--events 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench_e2e import create_pg_database, drop_pg_database
from bench_store import attempt, configure, fields
from common import percentile
from sqlalchemy import text
from sqlmodel import Session

from cti_bridge.config import Settings
from cti_bridge.pipeline import Pipeline
from cti_bridge.retention import BATCH, Retention
from cti_bridge.routing import MappingCache, RoutingCache
from cti_bridge.store import migrate
from cti_bridge.store.db import Database, make_engine
from cti_bridge.store.deliveries import Completion, claim_due, complete_many
from cti_bridge.store.retention import Pruned


def fill(db: Database, n: int, dead: int) -> None:
    ctx = configure(db)
    pipeline = Pipeline(db, RoutingCache(MappingCache()))
    total = n + dead
    for start in range(0, total, 500):

        def ingest(s: Session, start: int = start) -> None:
            for i in range(start, min(total, start + 500)):
                kind, f = fields("r", i)
                pipeline.ingest_sync(s, ctx, kind, f)

        db.run_sync(ingest)
    done = 0
    while done < total:
        now = datetime.now(UTC)

        def finish(s: Session, now: datetime = now, done: int = done) -> int:
            claimed = claim_due(s, now=now, limit=500, lease_seconds=120)
            completions = [
                Completion(
                    delivery_id=c.id,
                    claim=c.claim,
                    state="dead" if done + k >= n else "delivered",
                    attempt=attempt(now),
                )
                for k, c in enumerate(claimed)
            ]
            complete_many(s, completions, now=now)
            return len(claimed)

        got = db.run_sync(finish)
        if not got:
            raise RuntimeError("nothing left to claim")
        done += got


def size_mb(db: Database) -> float:
    def work(s: Session) -> float:
        if db.is_sqlite:
            pages = s.execute(text("PRAGMA page_count")).scalar_one()
            free = s.execute(text("PRAGMA freelist_count")).scalar_one()
            return float((pages - free) * 4096) / 1e6
        return float(s.execute(text("SELECT pg_database_size(current_database())")).scalar_one()) / 1e6

    return round(db.run_sync(work), 1)


class Later:
    """The clock 31 days on: with 30 days kept, everything stored is old."""

    def __init__(self) -> None:
        self.at = datetime.now(UTC) + timedelta(days=31)

    def now(self) -> datetime:
        return self.at

    def monotonic(self) -> float:
        return time.monotonic()


def one_pass(retention: Retention) -> tuple[Pruned, list[float], float]:
    """One pass of the retention job's own batches, without its pause between them: what they
    deleted, each one's seconds, the whole pass's seconds."""

    async def run() -> tuple[Pruned, list[float], float]:
        total, times = Pruned(), []
        t0 = t = time.perf_counter()
        async for batch in retention.batches():
            times.append(time.perf_counter() - t)
            total += batch
            t = time.perf_counter()
        return total, times, time.perf_counter() - t0

    return asyncio.run(run())


def measure(url: str, n: int) -> dict[str, Any]:
    engine = make_engine(url)
    migrate.upgrade(engine)
    db = Database(url, engine=engine)
    dead = n // 10
    t0 = time.perf_counter()
    fill(db, n, dead)
    out: dict[str, Any] = {"events": n, "dead_kept": dead, "fill_seconds": round(time.perf_counter() - t0, 1)}
    out["size_mb_before"] = size_mb(db)
    settings = Settings(retention_days=30)  # Retention reads only its own settings
    retention = Retention(db, settings, Later())
    retention.pause = 0.0
    pruned, times, seconds = one_pass(retention)
    rows = pruned.total
    times.sort()
    out.update(
        rows_deleted=rows,
        deliveries_deleted=pruned.deliveries,
        events_deleted=pruned.events,
        batches=len(times),
        rows_per_s=round(rows / seconds),
        batch_ms_p50=round(percentile(times, 0.5) * 1000, 1),
        batch_ms_p99=round(percentile(times, 0.99) * 1000, 1),
        batch_ms_max=round(times[-1] * 1000, 1),
        size_mb_after=size_mb(db),
    )
    _, times, seconds = one_pass(retention)  # the walk goes on where it stopped
    out["pass_nothing_to_do_ms"] = round(seconds * 1000, 1)
    restarted = Retention(db, settings, retention.clock)  # a new process: the walk starts over
    restarted.pause = 0.0
    _, times, seconds = one_pass(restarted)
    out["pass_after_restart_ms"] = round(seconds * 1000, 1)
    out["pass_after_restart_batches"] = len(times)
    db.dispose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--events", type=int, default=20000)
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    if args.db in ("sqlite", "both"):
        tmp = Path(tempfile.mkdtemp(prefix="cti-retention-"))
        try:
            results["sqlite"] = measure(f"sqlite:///{tmp / 'r.db'}", args.events)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.db in ("postgresql", "both"):
        try:
            name, url = create_pg_database()
        except Exception as exc:  # the benchmark runs on machines without PostgreSQL too
            print(f"postgresql: skipped ({exc})")
        else:
            try:
                results["postgresql"] = measure(url, args.events)
            finally:
                drop_pg_database(name)
    print(f"retention pass (store/retention.py, batches of {BATCH} rows)")
    for db_name, r in results.items():
        print(f"  {db_name}")
        for key, value in r.items():
            print(f"    {key:32} {value:>12,}" if isinstance(value, int) else f"    {key:32} {value:>12}")


if __name__ == "__main__":
    main()
