"""The wall clock stepping under a running daemon (a VM resumed after a suspend, an NTP step), on
SQLite and PostgreSQL: leases are stored as wall-clock times, while the worker times its own lease
by the monotonic clock, which a step leaves alone (a review of the daemon under clock steps)."""

from __future__ import annotations

import asyncio

from cti_bridge.sim.crm import Failure
from tests.e2e.stack import running_stack
from tests.integration.oauth_helpers import SteppedClock


async def test_a_forward_step_does_not_send_an_inflight_delivery_again(db_url: str) -> None:
    """An hour's step forward ends, by the wall clock, the lease of a request under way: the
    worker's next claim used to take it again and send it a second time, from the same process."""
    clock = SteppedClock()
    async with running_stack(db_url, clock=clock) as st:
        await st.configure(users=("anne",), mappings=[st.mapping("newCallEvent", path="calls/new")])
        st.crm.add_rule("/calls/new", Failure.slow(2.0), times=2)
        await st.xelion.place_call("incoming", callee="anne")
        await st.wait_until(lambda: any(r.path == "/calls/new" for r in st.crm.received), what="the request")
        clock.step(3600)
        st.daemon.worker.wake()  # claim at once, while the slow request is still under way
        (item,) = await st.wait_settled(1, timeout=15)
        await asyncio.sleep(1.0)  # a second request would have been sent by now
        keys = [r.headers["Idempotency-Key"] for r in st.crm.received if r.path == "/calls/new"]
        assert keys == [item["id"]]
        assert item["state"] == "delivered"
        assert (await st.delivery(item["id"]))["attempts"] == 1
