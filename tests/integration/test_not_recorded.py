"""How a failed commit reaches its source (app.StoreSourceHooks -> SourceManager ->
XelionSource.not_recorded), beyond the end-to-end test in tests/e2e/test_reliability_db_faults.py:
one failed batch is told once, not once per event; a source that cannot act (starting, stopping)
says so, and the failure waits for its next event; a source without a socket moves its open gap
back instead of opening another (a review of the first version found each of these)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
from xelion_helpers import RecordingHooks, config_for, fast_options, hooks, sim

from cti_bridge.app import StoreSourceHooks
from cti_bridge.pipeline import IngestResult
from cti_bridge.ports import EventsNotRecorded
from cti_bridge.sim.xelion import XelionSimulator
from cti_bridge.xelion.source import XelionSource

__all__ = ["hooks", "sim"]


class FailingBatch:
    """A pipeline whose next batch fails: every event handed over is one future, failed together."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[IngestResult]] = []

    def submit(self, ctx: int, kind: str, fields: dict[str, object]) -> asyncio.Future[IngestResult]:
        future: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future

    def fail_all(self) -> None:
        for f in self.futures:
            f.set_exception(RuntimeError("disk full"))
        self.futures.clear()

    def commit_all(self) -> None:
        for f in self.futures:
            f.set_result(IngestResult(None, ()))
        self.futures.clear()


class _Metrics:
    def event(self, duplicate: bool) -> None:
        return None


async def test_one_failed_batch_is_told_once_and_the_next_failure_after_a_commit_again() -> None:
    pipeline = FailingBatch()
    store_hooks = StoreSourceHooks(None, None, pipeline, _Metrics(), max_uncommitted=1000)  # type: ignore[arg-type]
    told: list[EventsNotRecorded] = []
    store_hooks.on_not_recorded = lambda ctx, failure: told.append(failure) is None
    for n in range(200):
        await store_hooks.on_event(1, "callHungUpEvent", {"callId": f"c{n}"})
    pipeline.fail_all()
    await asyncio.sleep(0)
    assert len(told) == 1  # was 200: a gap write and a traceback each
    await store_hooks.on_event(1, "callHungUpEvent", {"callId": "ok"})
    pipeline.commit_all()
    await store_hooks.on_event(1, "callHungUpEvent", {"callId": "again"})
    pipeline.fail_all()
    await asyncio.sleep(0)
    assert len(told) == 2  # a new failure after a successful commit is told


async def test_a_source_that_cannot_act_says_so_and_one_without_a_socket_moves_its_gap_back(
    sim: XelionSimulator, hooks: RecordingHooks
) -> None:
    failure = EventsNotRecorded(RuntimeError("disk full"), datetime.now(UTC) - timedelta(seconds=5))
    async with httpx.AsyncClient() as client:
        source = XelionSource(config_for(sim), hooks, client, fast_options(heartbeat_interval=None))
        # Not started: no socket and no gap open (it opens "starting" when it runs): it cannot act
        # now, and the hooks keep the failure for its next event.
        assert source.not_recorded(failure) is False
        # Without a socket and with its gap open: the gap is moved back, never another opened.
        source._gap_open = True
        assert source.not_recorded(failure) is True
        await asyncio.sleep(0.05)
    assert hooks.gaps == [("extend", 1, failure.since, "an event could not be recorded: RuntimeError")]
