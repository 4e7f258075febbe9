"""The retention job: where an event's history ends. Once at start and then every
``retention_interval_seconds``, it deletes what ``store/retention.py`` says has expired, a small
batch per transaction with a pause between batches, so a daemon that runs for a year keeps a
database the size of its retention window rather than of its whole life.

Settings (README "Retention"): ``retention_days`` for delivered deliveries, their attempts, events
no delivery needs any more and ended gaps (0 keeps them for ever); ``dead_retention_days`` for
dead and dismissed deliveries (0, the default, keeps them until an operator replays or deletes
them: what failed stays visible). A failed pass is logged and tried again at the next interval:
it must never stop the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict
from datetime import datetime, timedelta
from functools import partial

from cti_bridge.clock import Clock
from cti_bridge.config import Settings
from cti_bridge.metrics import Metrics
from cti_bridge.store.db import Database
from cti_bridge.store.retention import EventCursor, Pruned, prune_batch

log = logging.getLogger(__name__)

#: Rows of each kind per transaction: a few milliseconds of write lock on SQLite.
BATCH = 200
#: Seconds between two batches of one pass, so ingest and completions get the lock in between.
BATCH_PAUSE = 0.05
#: Seconds after which a pass walks the events from the start again rather than from where the
#: last one stopped: an event left behind the walk without a delivery (a wall clock set back,
#: say) is then found within a day instead of at the next start.
WALK_AGAIN_AFTER = 86400.0


def _cutoff(now: datetime, days: float) -> datetime | None:
    return now - timedelta(days=days) if days > 0 else None


class Retention:
    """Runs the passes; ``prune`` is one pass, callable on its own (tests, an operator's trigger)."""

    def __init__(
        self, db: Database, settings: Settings, clock: Clock, metrics: Metrics | None = None
    ) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.batch = BATCH
        self.pause = BATCH_PAUSE
        # Where the walk over events stopped (store/retention.py): kept across passes.
        self.events_after: EventCursor | None = None
        self._walk_started: float | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Pass after pass until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.prune(stop)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention: the pass failed; trying again at the next interval")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.retention_interval_seconds)

    async def prune(self, stop: asyncio.Event | None = None) -> Pruned:
        """One pass: batches until nothing more has expired (or ``stop`` is set)."""
        total = Pruned()
        async for batch in self.batches(stop):
            total += batch
        if total.total:
            log.info(
                "retention: deleted %d deliveries (%d attempts), %d events and %d gaps past their time",
                total.deliveries,
                total.attempts,
                total.events,
                total.gaps,
            )
        return total

    async def batches(self, stop: asyncio.Event | None = None) -> AsyncIterator[Pruned]:
        """The batches of one pass, each one's deletions as it committed (``prune`` adds them up;
        bench/bench_retention.py times them)."""
        now = self.clock.now()
        delivered_before = _cutoff(now, self.settings.retention_days)
        dead_before = _cutoff(now, self.settings.dead_retention_days)
        if delivered_before is None and dead_before is None:
            return
        started = self.clock.monotonic()
        if self._walk_started is None or started - self._walk_started >= WALK_AGAIN_AFTER:
            self.events_after, self._walk_started = None, started
        while stop is None or not stop.is_set():
            batch, self.events_after, more = await self.db.run(
                partial(
                    prune_batch,
                    delivered_before=delivered_before,
                    dead_before=dead_before,
                    limit=self.batch,
                    events_after=self.events_after,
                )
            )
            if self.metrics is not None:
                for kind, count in asdict(batch).items():
                    self.metrics.pruned.labels(kind).inc(count)
            yield batch
            if not more and max(batch.deliveries, batch.gaps) < self.batch:
                return
            await asyncio.sleep(self.pause)
