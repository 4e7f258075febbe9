"""PostgreSQL: keeping the dead row versions of ``delivery``, ``delivery_attempt`` and ``call_event``
few, so claims stay fast as work grows and the space retention frees is used again.

Every delivery is written up to three times (inserted, claimed, completed), and on PostgreSQL each
UPDATE leaves a dead row version behind, with dead entries in every index whose columns changed,
``ix_delivery_due`` among them. A claim walks that index from the start of the ``pending`` range,
where every delivery ever made once stood, past each dead entry until VACUUM removes them. Measured
with ``bench/bench_e2e.py --db postgresql --ratio-rounds 4`` (this machine's server runs with
autovacuum off): 1,457 events/s over the first 5,000 events, then 880, 757, 564 and 483 over four
more runs of 5,000 while the dead versions grew to 47,000 beside 26,700 live rows; with a VACUUM of
the table every two seconds, 1,333 and then 1,499, 1,604, 1,424 and 1,529.

``delivery_attempt`` and ``call_event`` are only inserted into, and deleted from by retention. The
space of a deleted row is used again only once VACUUM has entered it in the table's free space map;
until then new rows go to the end of the file. Without VACUUM (measured with psql, autovacuum off),
``call_event`` grew by its whole size each time its rows were replaced (20,000 rows, all deleted and
20,000 new ones written, twice: 12.7, 25.4, 38.0 MB): the tables grew for a year of history while
retention kept 30 days. VACUUM does not shrink the files (but for empty pages at their end); it
lets them stop growing.

Autovacuum's defaults wait until a fifth of a table is dead (for a month of history, hundreds of
thousands of versions), check once a minute, and may be switched off on the operator's server. So
the daemon looks after these tables (``TABLES``) itself, each on its own: every
``pg_vacuum_check_seconds`` it reads each table's statistics from ``pg_stat_user_tables`` (one small
query per table) and runs ``VACUUM (SKIP_LOCKED, ANALYZE)`` of a table when its dead versions reach
``pg_vacuum_dead_rows`` (0: never), unless somebody vacuumed that table within the check interval or
nine times its last VACUUM's duration, whichever is longer (another replica, or autovacuum): with
several replicas a table is vacuumed about as often as with one, and a table's VACUUM is followed by
a pause of nine times its duration before its next, so each table's upkeep takes at most about a
tenth of the time whatever its size. The tables are checked one after another, ``delivery`` first:
this process never runs two VACUUMs at once. The history tables gather dead versions (nearly) only
through retention's deletions, so they are vacuumed once retention has deleted
``pg_vacuum_dead_rows`` of their rows, not every few seconds as ``delivery`` can be. SQLite needs
none of this: it reuses a row's space at once.

What the server does not do is noticed, for each table on its own: a VACUUM it skipped
(``SKIP_LOCKED`` found another VACUUM holding the table, or the database user does not own it: a
notice, no error) leaves the table's VACUUM count where it was; it is logged at WARNING (at most once
an hour per table) and tried again after a minute. A VACUUM that left the dead versions above the
threshold could not remove them (a transaction older than they are still sees them): the table's
next waits twice as long each time, up to five minutes, instead of scanning it again for nothing. A
stop cancels a running VACUUM in the server (``Database.run_outside_transaction``), so it never waits
for one to finish.

A failed check or VACUUM is logged (as ``vacuuming <table> failed``) and tried again at the next
check; it never stops the daemon, nor the checks of the other tables.
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

#: The tables the daemon vacuums, in the order of each check: the queue, then the history that
#: retention deletes from (``delivery_attempt`` and ``call_event`` are only inserted and deleted).
TABLES = ("delivery", "delivery_attempt", "call_event")
#: After a VACUUM that took d seconds, the next one of that table (of any replica) waits at least
#: PAUSE_FACTOR * d.
PAUSE_FACTOR = 9.0
#: After a VACUUM the server skipped (another holds the table, or this user does not own it).
SKIPPED_PAUSE = 60.0
#: The longest wait while VACUUMs remove nothing (an old snapshot or a long transaction holds the
#: dead versions); it doubles from the check interval up to this.
MAX_BACKOFF = 300.0
#: A skipped VACUUM is logged at WARNING at most this often (for each table).
WARN_EVERY = 3600.0


def vacuum_sql(table: str) -> str:
    """The statement for one of ``TABLES`` (constant SQL: the names are this module's)."""
    return f"VACUUM (SKIP_LOCKED, ANALYZE) {table}"


@dataclass(frozen=True)
class TableStats:
    """What ``pg_stat_user_tables`` says of a table now."""

    dead: int  # dead row versions
    vacuums: int  # manual VACUUMs completed (any replica's)
    since_last: float | None  # seconds since the last VACUUM, manual or auto, of anyone (None: never)


def table_stats(session: Session, table: str) -> TableStats:
    row = session.execute(
        text(
            "SELECT n_dead_tup, vacuum_count, "
            "EXTRACT(EPOCH FROM now() - GREATEST(last_vacuum, last_autovacuum)) "
            "FROM pg_stat_user_tables WHERE relid = CAST(:t AS regclass)"
        ),
        {"t": table},
    ).one()
    return TableStats(int(row[0] or 0), int(row[1] or 0), None if row[2] is None else float(row[2]))


@dataclass
class TableState:
    """What the loop remembers of one table between checks."""

    name: str
    vacuums: int = 0  # VACUUMs this process ran that the server counted (for tests and logs)
    backoff: float = 0.0  # the current wait while VACUUMs remove nothing
    took: float = 0.0  # how long the last VACUUM took
    not_before: float = 0.0  # monotonic time before which this process starts none
    warned_at: float = -WARN_EVERY


class Vacuum:
    """The check loop over ``TABLES`` (PostgreSQL only; on SQLite ``run`` returns at once)."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.threshold = settings.pg_vacuum_dead_rows
        self.interval = settings.pg_vacuum_check_seconds
        self.enabled = not db.is_sqlite and self.threshold > 0
        self.tables = {name: TableState(name) for name in TABLES}

    async def run(self, stop: asyncio.Event) -> None:
        if not self.enabled:
            return
        failures = {
            name: FailureStreak(log, f"vacuuming {name}", level=logging.WARNING) for name in self.tables
        }
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
            # One table after another: never more than one VACUUM of this process at a time.
            for name in self.tables:
                if stop.is_set():
                    return
                try:
                    await self.check(name)
                    failures[name].recovered()
                except Exception as exc:
                    failures[name].failed(exc, "trying again later")

    async def check(self, table: str) -> bool:
        """VACUUM ``table`` if its dead versions reached the threshold and nobody vacuumed it
        lately; whether a VACUUM ran (and the server counted it)."""
        state = self.tables[table]
        if not self.enabled or time.monotonic() < state.not_before:
            return False
        before = await self.db.run(lambda s: table_stats(s, table))
        if before.dead < self.threshold:
            return False
        gap = max(self.interval, PAUSE_FACTOR * state.took)
        if before.since_last is not None and before.since_last < gap:
            # Another replica (or autovacuum) has just vacuumed: what it left shows at a later check.
            return False
        started = time.monotonic()
        await self.db.run_outside_transaction(vacuum_sql(table))
        took = time.monotonic() - started
        after = await self._counted(table, before.vacuums)
        now = time.monotonic()
        if after is None:
            # The server skipped it with a notice: another VACUUM holds the table (SKIP_LOCKED), or
            # the database user does not own it. The first is gone by the next try; the second
            # needs the operator, who must hear of it.
            state.not_before = now + SKIPPED_PAUSE
            if now - state.warned_at >= WARN_EVERY:
                state.warned_at = now
                log.warning(
                    "the VACUUM of %s was skipped: another VACUUM holds the table, or the database "
                    "user does not own it (then autovacuum must keep it, see README 'PostgreSQL "
                    "upkeep'); trying again in %.0f s",
                    table,
                    SKIPPED_PAUSE,
                )
            return False
        state.took = took
        state.vacuums += 1
        if after.dead >= self.threshold:
            # It could not remove them: a transaction older than they are still sees them. Trying
            # again at once would scan the table for nothing; back off until that transaction ends.
            state.backoff = min(max(2 * state.backoff, self.interval), MAX_BACKOFF)
            log.info(
                "vacuumed %s, but %d dead row versions remain (an old transaction still sees them); "
                "next try in %.0f s or later",
                table,
                after.dead,
                state.backoff,
            )
        else:
            state.backoff = 0.0
        state.not_before = now + max(PAUSE_FACTOR * took, state.backoff)
        log.debug(
            "vacuumed %s: %d -> %d dead row versions, %.0f ms", table, before.dead, after.dead, took * 1000
        )
        return True

    async def _counted(self, table: str, vacuums_before: int) -> TableStats | None:
        """The table's statistics once the server counted the VACUUM just run; None if it did not
        (it skipped it). PostgreSQL 15 counts it before the statement returns; older servers
        report through the statistics collector, a moment later."""
        for attempt in range(4):
            stats = await self.db.run(lambda s: table_stats(s, table))
            if stats.vacuums > vacuums_before:
                return stats
            if attempt < 3:
                await asyncio.sleep(0.25)
        return None
