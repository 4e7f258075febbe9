"""Which replica listens on an integration's websocket (xelion/ownership.py, DESIGN.md §5), on a real
PostgreSQL: one owner at a time, the standby takes over when the owner lets go or its connection
dies, a restart keeps the ownership, a cancelled wait holds nothing. SQLite has one process, and
``LocalOwnership`` grants everything at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy.engine import make_url
from xelion_helpers import RecordingHooks as _Recording
from xelion_helpers import client, config_for, fast_options, sim, wait_for  # noqa: F401

from cti_bridge.ports import SourceState
from cti_bridge.sim.xelion import XelionSimulator
from cti_bridge.xelion.ownership import LocalOwnership, PostgresOwnership
from cti_bridge.xelion.source import SourceManager, _TermHooks
from tests.pg_locks import holder_pids, terminate_holder

POLL = 0.05


@pytest.fixture
async def replicas(pg_url: str) -> AsyncIterator[list[PostgresOwnership]]:
    owners = [PostgresOwnership(pg_url, poll_seconds=POLL) for _ in range(3)]
    try:
        yield owners
    finally:
        for owner in owners:
            await owner.aclose()


async def not_done_after(task: asyncio.Task[object], seconds: float) -> bool:
    await asyncio.wait({task}, timeout=seconds)
    return not task.done()


async def test_a_hung_owner_loses_its_lock_to_the_servers_idle_timeout(pg_url: str) -> None:
    """A hung owner (SIGSTOP, a frozen VM) keeps its connection: its kernel answers the keepalives,
    so the server kept the lock, and nobody listened for as long as it hung. Its connection now has
    an idle timeout, longer than the owner's own check interval: a hung owner, which runs no check,
    loses the lock, and a standby takes over."""
    hung = PostgresOwnership(pg_url, poll_seconds=POLL, idle_timeout=1.0)
    standby = PostgresOwnership(pg_url, poll_seconds=POLL, idle_timeout=1.0)
    try:
        held = await asyncio.wait_for(hung.acquire(7), 5)
        await asyncio.sleep(2.5)  # alive: its check runs every POLL seconds, the lock stays
        assert not held.lost.is_set() and await held.confirm()
        assert await holder_pids(pg_url, 7)
        assert hung._guard is not None
        hung._guard.cancel()  # from here it runs no statement, as a stopped process would
        taken = await asyncio.wait_for(standby.acquire(7), 10)
        assert taken.since is not None  # it saw the hung one hold it first
        assert not await held.confirm()  # the hung one's lock went with its session
    finally:
        await hung.aclose()
        await standby.aclose()


async def test_one_owner_at_a_time_and_the_standby_takes_over_when_released(
    pg_url: str, replicas: list[PostgresOwnership]
) -> None:
    a, b, _ = replicas
    held_a = await asyncio.wait_for(a.acquire(1), 5)
    assert held_a.since is None  # nobody else held it: a takeover gap has no earlier start
    assert a.held == {1}
    waiting = asyncio.create_task(b.acquire(1))
    assert await not_done_after(waiting, 10 * POLL), "two replicas own integration 1"
    # Another integration is free for another replica.
    held_b2 = await asyncio.wait_for(b.acquire(2), 5)
    assert len(await holder_pids(pg_url, 1)) == 1
    assert await held_a.confirm()

    await a.release(held_a)
    held_b = await asyncio.wait_for(waiting, 5)
    assert held_b.since is not None  # b saw a hold it: the takeover gap starts there
    assert a.held == frozenset() and b.held == {1, 2}
    assert await held_b.confirm() and await held_b2.confirm()
    assert not await held_a.confirm()  # released: no longer a's


async def test_a_dead_lock_connection_tells_the_holder_and_frees_the_lock(
    pg_url: str, replicas: list[PostgresOwnership]
) -> None:
    a, b, _ = replicas
    held_a = await asyncio.wait_for(a.acquire(7), 5)
    waiting = asyncio.create_task(b.acquire(7))
    assert await not_done_after(waiting, 5 * POLL)
    # The server ends a's session (a restart, a failover, an operator): its lock goes with it.
    await terminate_holder(pg_url, 7)
    await asyncio.wait_for(held_a.lost.wait(), 5)  # a's check noticed
    assert not await held_a.confirm()
    held_b = await asyncio.wait_for(waiting, 5)
    assert await held_b.confirm()
    # a may stand by again; it gets the lock only once b lets go.
    again = asyncio.create_task(a.acquire(7))
    assert await not_done_after(again, 5 * POLL)
    await b.release(held_b)
    assert (await asyncio.wait_for(again, 5)).since is not None


async def test_a_restart_keeps_the_ownership(pg_url: str, replicas: list[PostgresOwnership]) -> None:
    a, b, _ = replicas
    first = await a.acquire(3)
    second = a.retain(3)  # what SourceManager does before stopping the old source
    assert second is not None
    assert b.retain(3) is None  # b does not own it
    await a.release(first)  # the old source has stopped
    waiting = asyncio.create_task(b.acquire(3))
    assert await not_done_after(waiting, 10 * POLL), "the lock went between two sources of a restart"
    await a.release(second)
    await asyncio.wait_for(waiting, 5)
    # Releasing a hold twice changes nothing (b keeps it).
    await a.release(second)
    assert len(await holder_pids(pg_url, 3)) == 1 and b.held == {3}


async def test_a_cancelled_wait_holds_nothing(pg_url: str, replicas: list[PostgresOwnership]) -> None:
    a, b, c = replicas
    held_a = await a.acquire(4)
    waiting = asyncio.create_task(b.acquire(4))
    assert await not_done_after(waiting, 5 * POLL)
    waiting.cancel()
    await asyncio.wait({waiting})
    await a.release(held_a)
    # b stopped waiting: the lock is free for c, and b holds nothing.
    await asyncio.wait_for(c.acquire(4), 5)
    assert b.held == frozenset()
    assert len(await holder_pids(pg_url, 4)) == 1


class SlowProxy:
    """TCP proxy to PostgreSQL; server->client bytes are delayed by ``delay`` seconds (a slow link)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port, self.delay = host, port, 0.0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(self.host, self.port)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, slow: bool) -> None:
            try:
                while data := await r.read(65536):
                    if slow and self.delay:
                        await asyncio.sleep(self.delay)
                    w.write(data)
                    await w.drain()
            except Exception:
                pass
            finally:
                w.close()

        await asyncio.gather(pump(cr, sw, False), pump(sr, cw, True))


async def test_a_wait_cancelled_while_the_server_grants_the_lock_leaves_nothing_held(pg_url: str) -> None:
    """Found in review: the lock granted in the server while the waiter was cancelled (a standby
    restarted or stopped) was held by nobody, and no replica could take the integration again."""
    url = make_url(pg_url)
    proxy = SlowProxy(url.host or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    via_proxy = url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    a = PostgresOwnership(via_proxy, poll_seconds=5.0)
    b = PostgresOwnership(pg_url, poll_seconds=0.05)
    try:
        await a.release(await a.acquire(99))  # a's lock connection is open
        proxy.delay = 0.5  # answers take 0.5 s (a slow link)
        standby = asyncio.create_task(a.acquire(1))  # e.g. a standby that is being restarted
        await asyncio.sleep(0.1)  # pg_try_advisory_lock has run on the server, answer on its way
        standby.cancel()  # SourceManager.stop/restart cancels the standby's _run_owned
        await asyncio.wait({standby})
        assert standby.cancelled()
        assert a.held == frozenset()  # a believes it holds nothing ...
        pids = await holder_pids(pg_url, 1)
        # ... but its lock connection holds the lock: no replica can ever take integration 1.
        other = asyncio.create_task(b.acquire(1))
        await asyncio.wait({other}, timeout=2)
        assert other.done(), f"lock leaked: held by backend(s) {pids}, a.held={set(a.held)}"
    finally:
        await a.aclose()
        await b.aclose()


async def test_closing_lets_go_of_everything(pg_url: str, replicas: list[PostgresOwnership]) -> None:
    a, b, _ = replicas
    held = [await a.acquire(i) for i in (1, 2)]
    await a.aclose()
    assert all(h.lost.is_set() for h in held)
    await asyncio.wait_for(b.acquire(1), 5)
    await asyncio.wait_for(b.acquire(2), 5)
    with pytest.raises(RuntimeError):
        await a.acquire(3)


async def test_local_ownership_grants_everything_at_once() -> None:
    local = LocalOwnership()
    held = await local.acquire(1)
    assert held.since is None and await held.confirm()
    assert local.retain(1) is not None
    await local.release(held)
    assert await held.confirm()  # one process: nothing can take it


class RecordingHooks:
    """The daemon's side of a source, recording what reaches it (what the store would write)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    async def on_event(
        self, xelion_context_id: int, notification_type: str, fields: dict[str, object]
    ) -> None:
        self.calls.append(("event", notification_type))

    async def on_state(self, xelion_context_id: int, state: SourceState, error: str | None) -> None:
        self.calls.append(("state", state))

    async def gap_opened(self, xelion_context_id: int, started_at: datetime, reason: str) -> None:
        self.calls.append(("gap_opened", started_at))

    async def gap_closed(self, xelion_context_id: int, ended_at: datetime) -> None:
        self.calls.append(("gap_closed", ended_at))

    async def gap_extended(self, xelion_context_id: int, started_at: datetime, reason: str) -> None:
        self.calls.append(("gap_extended", started_at))

    async def heartbeat(self, xelion_context_id: int, at: datetime) -> None:
        self.calls.append(("heartbeat", at))

    async def load_session_token(self, xelion_context_id: int) -> str | None:
        return "stored"

    async def load_state(self, xelion_context_id: int) -> tuple[str | None, datetime | None]:
        return "subscribed", None

    async def save_session_token(self, xelion_context_id: int, token: str | None) -> None:
        self.calls.append(("token", token))


async def test_a_source_that_lost_its_websocket_writes_no_shared_state(
    pg_url: str, replicas: list[PostgresOwnership]
) -> None:
    a, b, _ = replicas
    first = await a.acquire(5)
    seen = datetime(2026, 1, 1, tzinfo=UTC)
    recorded = RecordingHooks()
    hooks = _TermHooks(recorded, first, gap_since=seen)
    # While a owns it: everything goes through, and the takeover gap starts where the previous owner
    # was last seen, not when this source started.
    later = seen + timedelta(seconds=7)
    await hooks.gap_opened(5, later, "starting")
    await hooks.on_state(5, SourceState.SUBSCRIBED, None)
    await hooks.save_session_token(5, "t1")
    await hooks.heartbeat(5, later)
    assert recorded.calls == [
        ("gap_opened", seen),
        ("state", SourceState.SUBSCRIBED),
        ("token", "t1"),
        ("heartbeat", later),
    ]
    await hooks.gap_opened(5, later, "dropped")  # only the first gap of a term moves
    assert recorded.calls[-1] == ("gap_opened", later)

    # The server ends a's session and b takes over before a's source has stopped.
    await terminate_holder(pg_url, 5)
    await asyncio.wait_for(b.acquire(5), 5)
    recorded.calls.clear()
    await hooks.on_state(5, SourceState.STOPPED, None)  # a's source stopping
    await hooks.gap_opened(5, later, "websocket closed")
    await hooks.gap_closed(5, later)
    await hooks.save_session_token(5, None)  # its logout would forget b's session token
    await hooks.heartbeat(5, later)  # it no longer listens for the integration: b does
    await hooks.on_event(5, "callHungUpEvent", {})  # an event still read: the dedupe key copes
    assert recorded.calls == [("event", "callHungUpEvent")]
    assert first.lost.is_set()
    assert await hooks.load_session_token(5) == "stored"


class StoredStateHooks(_Recording):
    """What the store would say of the previous owner (``load_state``): its last state and the last
    moment it is known to have listened (its last event less a second, its subscription, its last
    heartbeat)."""

    def __init__(self, state: str, listened_at: datetime | None) -> None:
        super().__init__()
        self.stored = (state, listened_at)

    async def load_state(self, xelion_context_id: int) -> tuple[str | None, datetime | None]:
        return self.stored


@pytest.mark.parametrize(
    "stored_state",
    ["stopped", "subscribed", "subscribed, listened 3 s ago", "subscribed, hung 10 min ago"],
)
async def test_a_takeovers_gap_starts_no_later_than_the_previous_owner_stopped_listening(
    pg_url: str,
    replicas: list[PostgresOwnership],
    sim: XelionSimulator,  # noqa: F811 (a fixture)
    client: httpx.AsyncClient,  # noqa: F811 (a fixture)
    stored_state: str,
) -> None:
    """reliability.md §18 for a takeover: the previous owner stopped cleanly (stored 'stopped'), so
    the gap starts where the standby last saw it hold the lock; or it did not (stored 'subscribed':
    it crashed, hung, vanished or lost the lock), and the gap starts at the last moment it is known
    to have listened. Only when nothing is known (a database of an older version) is it assumed to
    have read until ``silent_loss`` before the server let go. A hung owner (SIGSTOP) kept its lock
    for as long as it hung, and its gap started ``silent_loss`` before the takeover: the calls of
    the time before were lost outside any gap."""
    other, mine, _ = replicas
    held_by_other = await other.acquire(1)
    ago = {"3 s": timedelta(seconds=3), "10 min": timedelta(minutes=10)}
    last_listened = next(
        (datetime.now(UTC) - d for k, d in ago.items() if k in stored_state), None
    )  # fmt: skip
    hooks = StoredStateHooks(stored_state.split(",")[0], last_listened)
    manager = SourceManager(hooks, client, fast_options(), mine)
    await manager.start(config_for(sim))
    try:
        await wait_for(lambda: manager.status(1).state is SourceState.STANDBY, what="standing by")
        await other.release(held_by_other)
        let_go_at = datetime.now(UTC)  # the standby saw it held last before this
        await wait_for(lambda: manager.status(1).state is SourceState.SUBSCRIBED, what="the takeover")
        (start,) = [at for kind, _, at, _ in hooks.gaps if kind == "open"]
        seen = let_go_at - timedelta(seconds=1)  # no earlier than this (it looks every 0.05 s)
        if stored_state == "stopped":
            assert seen <= start <= let_go_at
        elif last_listened is None:
            assert seen - mine.silent_loss <= start <= let_go_at - mine.silent_loss
        else:
            assert start == last_listened
    finally:
        await manager.stop_all()
