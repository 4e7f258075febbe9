"""Two replicas of one tenant on one PostgreSQL database (DESIGN.md §5, xelion/ownership.py), both
whole daemons with their admin APIs, against one Xelion simulator and one CRM simulator.

What an operator of replicas relies on: one websocket and one Xelion session per integration however
many replicas run, every event delivered once, the standby taking over (with the gap recorded) when
the owner stops or loses its database connection, and a change made through one replica's admin API
applied by the replica that owns the websocket."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from cti_bridge.app import Daemon, build, serve
from cti_bridge.clock import xelion_time
from cti_bridge.config import load_settings
from cti_bridge.sim.xelion import XelionSimulator
from tests.e2e.stack import CLIENT_ID, Bridge, TrackingCrmSimulator, settings_for, simulators
from tests.pg_locks import holder_pids, terminate

POLL = 0.2  # replica_poll_seconds of these replicas


@dataclass
class Replica:
    name: str
    daemon: Daemon
    api: httpx.AsyncClient
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def source_state(self, xelion_context_id: int) -> str | None:
        """This replica's own view (api/ready): subscribed, standby, ..."""
        resp = await self.api.get("/api/ready")
        return (resp.json().get("sources") or {}).get(str(xelion_context_id))

    async def halt(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)


@asynccontextmanager
async def replica(
    name: str, db_url: str, xelion: XelionSimulator, admin_token: str
) -> AsyncIterator[Replica]:
    settings = load_settings(
        None,
        **settings_for(
            db_url,
            xelion,
            admin_token,
            replica_poll_seconds=POLL,
            xelion_backoff_min=0.05,
            xelion_backoff_max=0.2,
        ),
    )
    daemon = build(settings)
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(daemon, stop, on_started=port.set_result))
    api = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{await asyncio.wait_for(port, 20)}",
        headers={"Authorization": f"xelion {admin_token}"},
        timeout=10,
    )
    r = Replica(name, daemon, api, stop, task)
    try:
        yield r
    finally:
        await api.aclose()
        if not task.done():
            await r.halt()


@dataclass
class World:
    xelion: XelionSimulator
    crm: TrackingCrmSimulator
    a: Replica
    b: Replica
    bridge: ReplicaBridge  # the operator, talking to replica a

    @property
    def ctx(self) -> int:
        return self.bridge.xelion_context_id

    def user_space_sessions(self) -> int:
        return self.xelion.sessions_by_user_space().get(f"cti-bridge-{self.ctx}", 0)

    async def states(self) -> tuple[str | None, str | None]:
        return await self.a.source_state(self.ctx), await self.b.source_state(self.ctx)

    async def integration(self, via: Replica) -> dict[str, Any]:
        resp = await via.api.get(
            "/api/crm-integrations",
            params={"xelionHost": f"127.0.0.1:{self.xelion.port}", "xelionTenant": "master"},
        )
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    async def one_owner(self, timeout: float = 10.0) -> Replica:
        """Wait until one replica is subscribed and the other stands by; return the owner."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            states = await self.states()
            if sorted(s or "" for s in states) == ["standby", "subscribed"] and self.xelion.open_sockets == 1:
                return self.a if states[0] == "subscribed" else self.b
            await asyncio.sleep(0.02)
        raise AssertionError(f"never one owner: {await self.states()}, {self.xelion.open_sockets} sockets")


@dataclass(kw_only=True)
class ReplicaBridge(Bridge):
    """The operator's view through replica a, where either replica may end up owning the socket
    (whichever asks first: a's supervisor, or b's reading of the new integration)."""

    replicas: tuple[Replica, ...] = ()

    async def wait_subscribed(self, timeout: float = 10.0, xelion_context_id: int | None = None) -> None:
        ctx = xelion_context_id if xelion_context_id is not None else self.xelion_context_id

        async def subscribed() -> bool:
            return any([await r.source_state(ctx) == "subscribed" for r in self.replicas])

        await self.wait_until(subscribed, timeout=timeout, what="a replica to subscribe")


@asynccontextmanager
async def two_replicas(pg_url: str) -> AsyncIterator[World]:
    async with AsyncExitStack() as stack:
        xelion, crm = await stack.enter_async_context(simulators())
        token = secrets.token_urlsafe(24)
        a = await stack.enter_async_context(replica("a", pg_url, xelion, token))
        b = await stack.enter_async_context(replica("b", pg_url, xelion, token))
        bridge = ReplicaBridge(xelion=xelion, crm=crm, api=a.api, admin_token=token, replicas=(a, b))
        yield World(xelion, crm, a, b, bridge)


async def steady(world: World, seconds: float) -> None:
    """For ``seconds``: never more than one socket or one session of the integration at Xelion."""
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        assert world.xelion.open_sockets <= 1, f"{world.xelion.open_sockets} websockets open"
        assert world.user_space_sessions() <= 1, world.xelion.sessions_by_user_space()
        await asyncio.sleep(0.01)


async def calls_delivered_once(world: World, calls: int, already: int = 0) -> None:
    """Place ``calls`` incoming calls to anne (3 events each) and check each event made exactly one
    CRM request and was stored once (no duplicate counted)."""
    placed = [await world.xelion.place_call("incoming", callee="anne") for _ in range(calls)]
    expected = already + 3 * calls
    items = await world.bridge.wait_settled(expected)
    assert len(items) == expected and all(d["state"] == "delivered" for d in items), items
    await asyncio.sleep(3 * POLL)  # a second reader would have made its copies by now
    got = [r for r in world.crm.received if r.path.startswith("/calls/")]
    call_ids = {p.call_id for p in placed}
    mine = [r for r in got if r.json().get("callId") in call_ids]
    assert len(mine) == 3 * calls, f"{len(mine)} CRM requests for {3 * calls} events"
    for d in items:
        if d["callId"] in call_ids:
            detail = await world.bridge.delivery(d["id"])
            assert detail["event"]["duplicates"] == 0, detail["event"]


async def test_two_replicas_hold_one_websocket_and_deliver_each_event_once(pg_url: str) -> None:
    async with two_replicas(pg_url) as world:
        await world.bridge.configure(users=("anne",))
        await world.one_owner()
        await steady(world, 1.0)
        assert len(await holder_pids(pg_url, world.ctx)) == 1
        await calls_delivered_once(world, 3)
        # Every replica shows the owner's state of the integration, not its own standby.
        for r in (world.a, world.b):
            assert (await world.integration(r))["source"]["state"] == "subscribed"
            assert (await r.api.get("/api/ready")).status_code == 200
            assert 'cti_bridge_source_up{state="subscribed"' in (await r.api.get("/api/metrics")).text


async def test_the_standby_takes_over_when_the_owner_stops(pg_url: str) -> None:
    async with two_replicas(pg_url) as world:
        await world.bridge.configure(users=("anne",))
        owner = await world.one_owner()
        standby = world.b if owner is world.a else world.a
        await calls_delivered_once(world, 1)
        stopped_at = datetime.now(UTC)
        await owner.halt()  # SIGTERM: logs out of Xelion, lets go of the lock

        async def took_over() -> bool:
            return await standby.source_state(world.ctx) == "subscribed"

        await world.bridge.wait_until(took_over, timeout=10, what="the standby to take over")
        await steady(world, 0.5)
        # The period without a listener is a gap (reliability.md §18), from no later than the stop
        # (the standby last saw the owner hold the lock before it stopped) to the takeover.
        source = (await world.integration(standby))["source"]
        assert source["state"] == "subscribed"
        newest = source["gaps"][0]
        assert newest["end"] is not None
        assert newest["start"] <= xelion_time(stopped_at)
        assert newest["start"] >= xelion_time(stopped_at - timedelta(seconds=5))
        # Events after the takeover reach the CRM once, through the standby.
        world.bridge.api = standby.api
        await calls_delivered_once(world, 2, already=3)


async def test_a_replica_that_loses_its_lock_connection_stops_listening(pg_url: str) -> None:
    async with two_replicas(pg_url) as world:
        await world.bridge.configure(users=("anne",))
        await world.one_owner()
        (pid,) = await holder_pids(pg_url, world.ctx)
        await terminate(pg_url, pid)  # a PostgreSQL failover, or an operator ending the session
        # The owner notices within its check interval and stops its socket; one replica owns it
        # again (whichever asks first) and reads alone.
        await asyncio.sleep(3 * POLL)
        await world.one_owner()
        await steady(world, 1.0)
        new_holders = await holder_pids(pg_url, world.ctx)
        assert len(new_holders) == 1 and new_holders != [pid]
        await calls_delivered_once(world, 2)
        assert (await world.integration(world.a))["source"]["state"] == "subscribed"


async def test_a_change_through_one_replica_reaches_the_owner(pg_url: str) -> None:
    async with two_replicas(pg_url) as world:
        await world.bridge.configure(users=("anne",), events=("newCallEvent",))
        owner = await world.one_owner()
        other = world.b if owner is world.a else world.a
        # The standby's admin API changes the subscription: only its own supervisor hears of it,
        # and the owner holds the socket.
        resp = await other.api.put(
            f"/api/crm-integrations/{world.ctx}/crm-contexts/{world.bridge.crm_context_id}/event-uri-mappings",
            json=[world.bridge.mapping("newCallEvent"), world.bridge.mapping("callHungUpEvent")],
        )
        assert resp.status_code == 200, resp.text

        def resubscribed() -> bool:
            subs = world.xelion.subscriptions()
            return len(subs) == 1 and "callHungUpEvent" in subs[0]

        await world.bridge.wait_until(resubscribed, timeout=5, what="the owner to re-subscribe")
        assert await world.one_owner() is owner  # re-subscribed on the live socket, no handover
        # The standby's admin API deletes the integration: the owner's socket closes, it logs out.
        resp = await other.api.delete(f"/api/crm-integrations/{world.ctx}")
        assert resp.status_code in (200, 204), resp.text
        await world.bridge.wait_until(
            lambda: world.xelion.open_sockets == 0 and world.user_space_sessions() == 0,
            timeout=5,
            what="the owner to stop the deleted integration's source",
        )
        for r in (world.a, world.b):
            assert await r.source_state(world.ctx) is None


async def test_a_second_takeover_reports_only_the_time_nobody_listened(pg_url: str) -> None:
    """Found in review: a replica taking the websocket back started its gap where it had lost it
    the first time, over the whole time the other replica was listening."""
    async with two_replicas(pg_url) as world:
        await world.bridge.configure(users=("anne",))
        first = await world.one_owner()
        for _ in range(20):  # make the other replica take over (whichever asks first wins)
            (pid,) = await holder_pids(pg_url, world.ctx)
            await terminate(pg_url, pid)
            await asyncio.sleep(0.6)
            if await world.one_owner() is not first:
                break
        second = await world.one_owner()
        assert second is not first
        await asyncio.sleep(4)  # second listens, subscribed, for 4 s
        halted_at = datetime.now(UTC)
        await second.halt()

        async def took_over() -> bool:
            return await first.source_state(world.ctx) == "subscribed"

        await world.bridge.wait_until(took_over, timeout=10, what="first to take over again")
        gaps = (await world.integration(first))["source"]["gaps"]
        newest = gaps[0]
        # The listener-less period began when `second` stopped (first saw it hold the lock <= 0.2 s before).
        assert newest["start"] >= xelion_time(halted_at - timedelta(seconds=1)), (
            f"gap starts {newest['start']}, second stopped listening at {xelion_time(halted_at)}"
        )


async def test_a_new_grant_set_through_one_replica_replaces_the_owners_cached_token(pg_url: str) -> None:
    async with two_replicas(pg_url) as world:
        await world.bridge.configure(users=("anne",))
        owner = await world.one_owner()
        other = world.b if owner is world.a else world.a
        await calls_delivered_once(world, 1)
        cred = await world.bridge.credential_id("anne")
        assert owner.daemon.tokens.peek(cred) is not None  # the owner delivered: it holds a token
        old = {r.headers.get("Authorization") for r in world.crm.received if r.path.startswith("/calls/")}

        # The operator moves anne to a new grant through the standby's admin API; the CRM revokes
        # the old refresh token, and the old grant's access tokens still work (as most CRMs do).
        new_refresh_token = world.crm.issue_refresh_token(CLIENT_ID)
        for token in world.crm.current_refresh_tokens(CLIENT_ID):
            if token != new_refresh_token:
                world.crm.revoke_refresh_token(token)
        update = f"/api/users/{cred}/refreshtoken/update"
        resp = await other.api.post(update, json={"value": new_refresh_token})
        assert resp.status_code == 200, resp.text
        await world.bridge.wait_until(
            lambda: owner.daemon.tokens.peek(cred) is None,
            timeout=5,
            what="the owner to drop the old grant's cached token",
        )

        await calls_delivered_once(world, 1, already=3)
        later = [r for r in world.crm.received if r.path.startswith("/calls/")][3:]
        assert len(later) == 3
        assert not {r.headers.get("Authorization") for r in later} & old
        assert world.crm.token_counts["refresh_token"] == 2  # the first grant once, the new one once
