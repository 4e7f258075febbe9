"""How a failed commit reaches its source (app.StoreSourceHooks -> SourceManager ->
XelionSource.not_recorded), beyond the end-to-end test in tests/e2e/test_reliability_db_faults.py:
one failed batch is told once, not once per event; a source that cannot act (starting, stopping)
says so, and the failure waits for its next event; a source without a socket moves its open gap
back instead of opening another (a review of the first version found each of these)."""

from __future__ import annotations

import asyncio
import threading
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


def test_a_full_queue_whose_oldest_commit_is_done_but_not_yet_taken_off_does_not_spin() -> None:
    """More than max_uncommitted events waiting, the oldest committed with its done-callback still
    queued: on_event found it done, returned from the wait without yielding, found the same oldest
    first again, and spun for ever with the loop frozen (an independent event source's burst with no
    flow control: SIGTERM unanswered, only SIGKILL). Run in a thread of its own, so that the spin of
    the old code fails this test instead of hanging the suite."""
    returned: list[bool] = []

    async def scenario() -> None:
        pipeline = FailingBatch()
        store_hooks = StoreSourceHooks(None, None, pipeline, _Metrics(), max_uncommitted=2)  # type: ignore[arg-type]
        await store_hooks.on_event(1, "newCallEvent", {"callId": "c0"})
        await store_hooks.on_event(1, "newCallEvent", {"callId": "c1"})
        # Committed; its done-callback is queued behind this coroutine, not run yet.
        pipeline.futures.pop(0).set_result(IngestResult(None, ()))
        await store_hooks.on_event(1, "newCallEvent", {"callId": "c2"})  # three waiting: over the bound
        returned.append(True)
        # The bound still holds: with two uncommitted, a fourth event waits for the oldest's commit.
        fourth = asyncio.ensure_future(store_hooks.on_event(1, "newCallEvent", {"callId": "c3"}))
        await asyncio.sleep(0.05)
        assert not fourth.done()
        pipeline.commit_all()
        await asyncio.wait_for(fourth, 5)
        returned.append(True)

    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(scenario())
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "on_event spun without yielding: the event loop is frozen"
    assert not errors, errors
    assert returned == [True, True]


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
