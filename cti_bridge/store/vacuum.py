"""PostgreSQL: keeping the dead row versions of ``delivery`` few, so claims stay fast as work grows.

Every delivery is written up to three times (inserted, claimed, completed), and on PostgreSQL each
UPDATE leaves a dead row version behind, with dead entries in every index whose columns changed,
``ix_delivery_due`` among them. A claim walks that index from the start of the ``pending`` range,
where every delivery ever made once stood, past each dead entry until VACUUM removes them. Measured
with ``bench/bench_e2e.py --db postgresql --ratio-rounds 4`` (this machine's server runs with
autovacuum off): 1,457 events/s over the first 5,000 events, then 880, 757, 564 and 483 over four
more runs of 5,000 while the dead versions grew to 47,000 beside 26,700 live rows; with a VACUUM of
the table every two seconds, 1,333 and then 1,499, 1,604, 1,424 and 1,529.

Autovacuum's defaults wait until a fifth of a table is dead (for a month of history, hundreds of
thousands of versions), check once a minute, and may be switched off on the operator's server. So
the daemon looks after its own queue table: every ``pg_vacuum_check_seconds`` it reads the table's
dead versions from ``pg_stat_user_tables`` (one small query) and runs ``VACUUM (ANALYZE)`` when they
reach ``pg_vacuum_dead_rows`` (0: never). ``SKIP_LOCKED``: a VACUUM of another replica's, or
autovacuum's, is not waited for. Each VACUUM is followed by a pause of at least nine times its
duration, so maintenance never takes more than a tenth of the time, whatever the table's size.
SQLite needs none of this: it reuses a row's space at once.

A failed check or VACUUM is logged and tried again at the next check; it never stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from sqlalchemy import text
from sqlmodel import Session

from cti_bridge.config import Settings
from cti_bridge.store.db import Database

log = logging.getLogger(__name__)

TABLE = "delivery"
#: After a VACUUM that took d seconds, the next one waits at least PAUSE_FACTOR * d.
PAUSE_FACTOR = 9.0


def dead_rows(session: Session) -> int:
    """Dead row versions of ``delivery`` as the statistics collector last counted them."""
    found = session.execute(
        text("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = CAST(:t AS regclass)"), {"t": TABLE}
    ).scalar()
    return int(found or 0)


class Vacuum:
    """The check loop (PostgreSQL only; on SQLite ``run`` returns at once)."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.threshold = settings.pg_vacuum_dead_rows
        self.interval = settings.pg_vacuum_check_seconds
        self.enabled = not db.is_sqlite and self.threshold > 0
        self.vacuums = 0  # VACUUMs run (for tests and logs)
        self._not_before = 0.0  # monotonic time before which no VACUUM starts (PAUSE_FACTOR)

    async def run(self, stop: asyncio.Event) -> None:
        if not self.enabled:
            return
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
            if stop.is_set():
                return
            try:
                await self.check()
            except Exception as exc:
                log.warning(
                    "vacuuming %s failed (%s: %s); trying again later", TABLE, type(exc).__name__, exc
                )

    async def check(self) -> bool:
        """VACUUM the table if its dead versions reached the threshold; whether it did."""
        if not self.enabled or time.monotonic() < self._not_before:
            return False
        dead = await self.db.run(dead_rows)
        if dead < self.threshold:
            return False
        started = time.monotonic()
        await self.db.run_outside_transaction(f"VACUUM (SKIP_LOCKED, ANALYZE) {TABLE}")
        took = time.monotonic() - started
        self._not_before = time.monotonic() + PAUSE_FACTOR * took
        self.vacuums += 1
        log.debug("vacuumed %s: %d dead row versions, %.0f ms", TABLE, dead, took * 1000)
        return True
