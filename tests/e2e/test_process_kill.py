"""``kill -9`` loses nothing (reliability.md §1), on the real process, on SQLite and PostgreSQL.

A stream of calls is placed on the Xelion simulator; at a seeded random moment, while CRM requests
are in flight (a slow CRM path makes sure of it), the daemon gets SIGKILL and is started again on the
same database with the same key while the stream goes on. Events Xelion pushes while the daemon is
down are not sent again (a gap, reliability.md §18), so the promise is about what the daemon
acknowledged: every event it committed has all its deliveries, and every one ends delivered; at the
CRM every delivered id arrived (answered 2xx), and only the deliveries in flight at the kill may have
arrived twice (with the same Idempotency-Key).
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cti_bridge.sim.crm import Failure
from tests.e2e.process_helpers import (
    in_progress,
    keys_of,
    process_world,
    read_db_async,
)

pytestmark = pytest.mark.slow

CALLS = 40
RESERVED = 10  # the last calls are placed only once the restarted daemon is ready
CREDENTIALED = ("anne", "bob")
# (kind, caller, callee): carol has no credentials, so her parties make no deliveries.
CALL_SHAPES = (
    ("internal", "anne", "bob"),
    ("internal", "carol", "anne"),
    ("incoming", None, "anne"),
    ("incoming", None, "carol"),
    ("outgoing", "bob", None),
)
# Mappings per event type: the hang-up makes two requests, one of them to a slow CRM path.
MAPPINGS = {"newCallEvent": 1, "callConnectedEvent": 1, "callHungUpEvent": 2}


@dataclass(frozen=True)
class Placed:
    call_id: str
    users: frozenset[str]  # the parties with credentials
    after_restart: bool


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_kill_9_loses_nothing(tmp_path: Path, db_url: str, seed: int) -> None:
    shapes = random.Random(seed)  # which calls (used by the stream task only)
    timing = random.Random(seed + 1000)  # when the kill comes
    placed: list[Placed] = []
    restarted = asyncio.Event()

    async with process_world(tmp_path, db_url, per_host_concurrency="32") as world:
        world.crm.add_rule("/slow/", Failure.slow(0.4))
        mappings = [
            world.mapping("newCallEvent", "calls/new"),
            world.mapping("callConnectedEvent", "calls/connected"),
            world.mapping("callHungUpEvent", "calls/hungup"),
            world.mapping("callHungUpEvent", "slow/hungup"),
        ]
        await world.configure(CREDENTIALED, mappings)

        async def stream() -> None:
            for i in range(CALLS):
                if i >= CALLS - RESERVED:
                    await restarted.wait()
                last = i == CALLS - 1
                kind, caller, callee = CALL_SHAPES[0] if last else shapes.choice(CALL_SHAPES)
                after = restarted.is_set()
                call = await world.xelion.place_call(kind, caller=caller, callee=callee, pace=0.01)
                users = frozenset(u for u in (caller, callee) if u in CREDENTIALED)
                placed.append(Placed(call.call_id, users, after))
                await asyncio.sleep(0.05)

        streaming = asyncio.create_task(stream())
        try:
            kill_after = timing.randint(6, CALLS - RESERVED - 10)
            while len(placed) < kill_after:
                await asyncio.sleep(0.01)
            await asyncio.sleep(timing.uniform(0.0, 0.3))
            deadline = time.monotonic() + 5
            while not in_progress(world.crm) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert in_progress(world.crm), "no CRM request in flight to kill the daemon in"
            await world.daemon.kill()
            killed_after = len(placed)
            at_kill = await read_db_async(world.db_url)
            in_flight = {d.id for d in at_kill.deliveries if d.state == "sending"}

            await world.restart()
            await world.wait_ready()
            restarted.set()
            await asyncio.wait_for(streaming, 30)
        finally:
            streaming.cancel()

        # Events of one socket are recorded in order: once the last call's last delivery exists,
        # every event before it was recorded too.
        last_call = placed[-1].call_id
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            resp = await world.api.get("/api/deliveries", params={"callId": last_call, "limit": 1})
            if resp.json()["total"] == 2 * 4:
                break
            await asyncio.sleep(0.05)
        await world.wait_settled(world.lease_seconds + 20)
        code, _ = await world.daemon.terminate()
        assert code == 0, world.daemon.logs(4000)
        db = await read_db_async(world.db_url)

    calls = {p.call_id: p for p in placed}
    deliveries_of: dict[int, list[str]] = collections.defaultdict(list)
    for d in db.deliveries:
        deliveries_of[d.event_id].append(d.xelion_username)
    events_of: dict[str, list[str]] = collections.defaultdict(list)
    for event in db.events:
        events_of[event.call_id].append(event.notification_type)
        users = calls[event.call_id].users
        # Every committed event has exactly its deliveries: matching users x mappings.
        got = collections.Counter(deliveries_of[event.id])
        assert got == {u: MAPPINGS[event.notification_type] for u in users}, (event.call_id, got)

    # The kill happened mid-stream with work committed before it; calls placed once the restarted
    # daemon was ready were all recorded.
    assert at_kill.events, "nothing was committed before the kill"
    after = [p for p in placed if p.after_restart]
    assert len(after) >= RESERVED
    for p in after:
        assert sorted(events_of[p.call_id]) == sorted(MAPPINGS), p.call_id

    # None missing, none stuck: every delivery ends delivered.
    assert db.states() == {"delivered": len(db.deliveries)}, db.states()
    # At the CRM every delivered id arrived and was answered 2xx; only those in flight at the kill
    # may have arrived twice, with the same Idempotency-Key.
    received = collections.Counter(keys_of(world.crm.received))
    assert set(db.by_id()) <= set(keys_of(world.crm.received, answered_ok=True))
    twice = {k for k, n in received.items() if n > 1}
    assert twice <= in_flight, twice - in_flight
    assert set(received) <= set(db.by_id()), "the CRM got a request for no committed delivery"
    for r in world.crm.received:
        assert r.json()["deliveryId"] == r.headers["Idempotency-Key"]
    print(
        f"seed {seed}: killed after {killed_after} calls with {len(in_flight)} in flight; "
        f"{len(db.events)} events, {len(db.deliveries)} deliveries, {len(twice)} sent twice"
    )
