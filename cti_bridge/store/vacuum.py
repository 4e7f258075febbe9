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
statistics from ``pg_stat_user_tables`` (one small query) and runs ``VACUUM (ANALYZE)`` when the
dead versions reach ``pg_vacuum_dead_rows`` (0: never), unless somebody vacuumed the table within
the check interval or nine times the last VACUUM's duration, whichever is longer (another replica,
or autovacuum): with several replicas the table is vacuumed about as often as with one, and a
VACUUM is followed by a pause of nine times its duration, so upkeep takes at most about a tenth of
the time whatever the table's size. SQLite needs none of this: it reuses a row's space at once.

What the server does not do is noticed: a VACUUM it skipped (``SKIP_LOCKED`` found another VACUUM
holding the table, or the database user does not own it: a notice, no error) leaves the table's
VACUUM count where it was; it is logged at WARNING (at most once an hour) and tried again after a
minute. A VACUUM that left the dead versions above the threshold could not remove them (a
transaction older than they are still sees them): the next waits twice as long each time, up to five
minutes, instead of scanning the table again for nothing. A stop cancels a running VACUUM in the
server (``Database.run_outside_transaction``), so it never waits for one to finish.

A failed check or VACUUM is logged and tried again at the next check; it never stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from sqlalchemy import text
from sqlmodel import Session

from cti_bridge.config import Settings
from cti_bridge.logs import FailureStreak
from cti_bridge.store.db import Database

log = logging.getLogger(__name__)

TABLE = "delivery"
VACUUM_SQL = f"VACUUM (SKIP_LOCKED, ANALYZE) {TABLE}"
#: After a VACUUM that took d seconds, the next one (of any replica) waits at least PAUSE_FACTOR * d.
PAUSE_FACTOR = 9.0
#: After a VACUUM the server skipped (another holds the table, or this user does not own it).
SKIPPED_PAUSE = 60.0
#: The longest wait while VACUUMs remove nothing (an old snapshot or a long transaction holds the
#: dead versions); it doubles from the check interval up to this.
MAX_BACKOFF = 300.0
#: A skipped VACUUM is logged at WARNING at most this often.
WARN_EVERY = 3600.0


@dataclass(frozen=True)
class TableStats:
    """What ``pg_stat_user_tables`` says of ``delivery`` now."""

    dead: int  # dead row versions
    vacuums: int  # manual VACUUMs completed (any replica's)
    since_last: float | None  # seconds since the last VACUUM, manual or auto, of anyone (None: never)


def table_stats(session: Session) -> TableStats:
    row = session.execute(
        text(
            "SELECT n_dead_tup, vacuum_count, "
            "EXTRACT(EPOCH FROM now() - GREATEST(last_vacuum, last_autovacuum)) "
            "FROM pg_stat_user_tables WHERE relid = CAST(:t AS regclass)"
        ),
        {"t": TABLE},
    ).one()
    return TableStats(int(row[0] or 0), int(row[1] or 0), None if row[2] is None else float(row[2]))


class Vacuum:
    """The check loop (PostgreSQL only; on SQLite ``run`` returns at once)."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.threshold = settings.pg_vacuum_dead_rows
        self.interval = settings.pg_vacuum_check_seconds
        self.enabled = not db.is_sqlite and self.threshold > 0
        self.vacuums = 0  # VACUUMs this process ran that the server counted (for tests and logs)
        self.backoff = 0.0  # the current wait while VACUUMs remove nothing
        self._took = 0.0  # how long the last VACUUM took
        self._not_before = 0.0  # monotonic time before which this process starts none
        self._warned_at = -WARN_EVERY

    async def run(self, stop: asyncio.Event) -> None:
        if not self.enabled:
            return
        failures = FailureStreak(log, f"vacuuming {TABLE}", level=logging.WARNING)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
            if stop.is_set():
                return
            try:
                await self.check()
                failures.recovered()
            except Exception as exc:
                failures.failed(exc, "trying again later")

    async def check(self) -> bool:
        """VACUUM the table if its dead versions reached the threshold and nobody vacuumed it
        lately; whether a VACUUM ran (and the server counted it)."""
        if not self.enabled or time.monotonic() < self._not_before:
            return False
        before = await self.db.run(table_stats)
        if before.dead < self.threshold:
            return False
        gap = max(self.interval, PAUSE_FACTOR * self._took)
        if before.since_last is not None and before.since_last < gap:
            # Another replica (or autovacuum) has just vacuumed: what it left shows at a later check.
            return False
        started = time.monotonic()
        await self.db.run_outside_transaction(VACUUM_SQL)
        took = time.monotonic() - started
        after = await self._counted(before.vacuums)
        now = time.monotonic()
        if after is None:
            # The server skipped it with a notice: another VACUUM holds the table (SKIP_LOCKED), or
            # the database user does not own it. The first is gone by the next try; the second
            # needs the operator, who must hear of it.
            self._not_before = now + SKIPPED_PAUSE
            if now - self._warned_at >= WARN_EVERY:
                self._warned_at = now
                log.warning(
                    "the VACUUM of %s was skipped: another VACUUM holds the table, or the database "
                    "user does not own it (then autovacuum must keep it, see README 'PostgreSQL "
                    "upkeep'); trying again in %.0f s",
                    TABLE,
                    SKIPPED_PAUSE,
                )
            return False
        self._took = took
        self.vacuums += 1
        if after.dead >= self.threshold:
            # It could not remove them: a transaction older than they are still sees them. Trying
            # again at once would scan the table for nothing; back off until that transaction ends.
            self.backoff = min(max(2 * self.backoff, self.interval), MAX_BACKOFF)
            log.info(
                "vacuumed %s, but %d dead row versions remain (an old transaction still sees them); "
                "next try in %.0f s or later",
                TABLE,
                after.dead,
                self.backoff,
            )
        else:
            self.backoff = 0.0
        self._not_before = now + max(PAUSE_FACTOR * took, self.backoff)
        log.debug(
            "vacuumed %s: %d -> %d dead row versions, %.0f ms", TABLE, before.dead, after.dead, took * 1000
        )
        return True

    async def _counted(self, vacuums_before: int) -> TableStats | None:
        """The table's statistics once the server counted the VACUUM just run; None if it did not
        (it skipped it). PostgreSQL 15 counts it before the statement returns; older servers
        report through the statistics collector, a moment later."""
        for attempt in range(4):
            stats = await self.db.run(table_stats)
            if stats.vacuums > vacuums_before:
                return stats
            if attempt < 3:
                await asyncio.sleep(0.25)
        return None
