"""Restarting the real process after ``kill -9``: due deliveries move again within 5 s of the restart
(reliability.md §4), and the Xelion session is taken over cleanly with the stored token
(xelion-protocol.md §2) instead of running into 10005."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cti_bridge.sim.crm import Failure
from tests.e2e.process_helpers import (
    as_utc,
    in_progress,
    keys_of,
    process_world,
    read_db_async,
)

pytestmark = pytest.mark.slow

EVENTS = ("newCallEvent", "callConnectedEvent", "callHungUpEvent")
PROMPT = 5.0  # reliability.md §4


async def test_due_deliveries_move_within_5_s_of_a_restart(tmp_path: Path, db_url: str) -> None:
    # Few claims at a time, and a CRM that holds every request: at the kill a few deliveries are in
    # flight ('sending', leased) and the rest are due and 'pending'.
    async with process_world(tmp_path, db_url, worker_concurrency="4") as world:
        world.crm.add_rule("/slow/", Failure.slow(60.0))
        await world.configure(("anne", "bob"), [world.mapping(e, f"slow/{e}") for e in EVENTS])
        for _ in range(8):
            await world.xelion.place_call("internal", caller="anne", callee="bob")
        await world.wait_deliveries(8 * 3 * 2)
        # Wait until the worker has every place it takes busy: the requests in progress at the CRM
        # stop changing (each is held for a minute).
        in_flight: set[str] = set()
        stable_since = time.monotonic()
        deadline = stable_since + 10
        while time.monotonic() < deadline:
            now_in_flight = set(keys_of(in_progress(world.crm)))
            if now_in_flight != in_flight:
                in_flight, stable_since = now_in_flight, time.monotonic()
            elif in_flight and time.monotonic() - stable_since > 0.3:
                break
            await asyncio.sleep(0.02)
        assert 1 <= len(in_flight) <= 4
        await world.daemon.kill()

        at_kill = await read_db_async(world.db_url)
        sending = {d.id for d in at_kill.deliveries if d.state == "sending"}
        pending = {d.id for d in at_kill.deliveries if d.state == "pending"}
        assert sending == in_flight
        assert len(pending) == 48 - len(sending)
        # Pending deliveries queued behind an in-flight one (same call and user) cannot go before it.
        held_keys = {d.ordering_key for d in at_kill.deliveries if d.id in sending}
        behind = {d.id for d in at_kill.deliveries if d.id in pending and d.ordering_key in held_keys}

        world.crm.clear_rules()  # the CRM answers at once from now on
        healthy_at = datetime.fromtimestamp(await world.restart(), UTC)
        await world.wait_settled(world.lease_seconds + 15)
        code, _ = await world.daemon.terminate()
        assert code == 0, world.daemon.logs(4000)
        db = await read_db_async(world.db_url)

    assert db.states() == {"delivered": 48}, db.states()
    took = {
        d.id: (as_utc(d.delivered_at) - healthy_at).total_seconds() for d in db.deliveries if d.delivered_at
    }
    if db_url.startswith("sqlite"):
        # The sole owner of an embedded database releases the dead process' leases at start.
        prompt, after_lease = pending | sending, set()
    else:
        # On PostgreSQL another replica may still hold a lease: in-flight claims wait for it to end.
        prompt, after_lease = pending - behind, sending | behind
    slowest = max(took[i] for i in prompt)
    print(f"due deliveries done {slowest:.2f} s after healthy; leased ones {max(took.values()):.2f} s")
    assert slowest <= PROMPT, f"due deliveries finished {slowest:.2f} s after the restart was healthy"
    if after_lease:
        slowest_leased = max(took[i] for i in after_lease)
        assert slowest_leased <= world.lease_seconds + PROMPT, (
            f"leased deliveries finished {slowest_leased:.2f} s after the restart was healthy"
        )
    # The requests cut off by the kill were sent again with the same Idempotency-Key.
    assert in_flight <= set(keys_of(world.crm.received, answered_ok=True))


async def test_restart_after_kill_takes_over_the_xelion_session(tmp_path: Path, db_url: str) -> None:
    async with process_world(tmp_path, db_url) as world:
        await world.configure(("anne",), [world.mapping("newCallEvent", "calls/new")])
        space = world.user_space
        assert world.xelion.active_sessions(space) == 1
        logouts = world.xelion.stats.logouts
        await world.daemon.kill()
        # No logout on kill -9: the old session lives on in Xelion.
        assert world.xelion.stats.logouts == logouts
        assert world.xelion.active_sessions(space) == 1

        attempts, logins = world.xelion.stats.login_attempts, world.xelion.stats.logins
        await world.restart()
        await world.wait_ready()
        # One login, presenting the stored token, which ended the old session: no 10005, no
        # suffixed userSpace.
        assert world.xelion.stats.login_attempts - attempts == 1
        assert world.xelion.stats.logins - logins == 1
        assert world.xelion.sessions_by_user_space() == {space: 1}

        # The new subscription carries events.
        await world.xelion.place_call("incoming", callee="anne")
        await world.wait_deliveries(1)
        await world.wait_settled(10)
        code, _ = await world.daemon.terminate()
        assert code == 0, world.daemon.logs(4000)
        db = await read_db_async(world.db_url)
    assert db.states() == {"delivered": 1}
