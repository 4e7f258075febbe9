"""The notification websocket source and its manager against the simulator (xelion-protocol.md §3-§4,
reliability.md §16-§18, §20). Real sockets on 127.0.0.1, port 0."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from xelion_helpers import RecordingHooks, client, config_for, fast_options, hooks, sim, wait_for

from cti_bridge.events import dedupe_key
from cti_bridge.ports import EventsNotRecorded, SourceState
from cti_bridge.sim.xelion import XelionSimulator, add_demo_tenant
from cti_bridge.xelion.rest import XelionSession
from cti_bridge.xelion.source import SourceManager, SourceOptions, XelionSource
from tests.integration.oauth_helpers import SteppedClock

__all__ = ["client", "hooks", "sim"]  # fixtures

DEFAULT_TYPES = ["callConnectedEvent", "callHungUpEvent", "missedCallEvent", "newCallEvent"]


def subscribed(manager: SourceManager, context_id: int = 1) -> bool:
    return manager.status(context_id).state is SourceState.SUBSCRIBED


async def started(
    sim: XelionSimulator,
    client: httpx.AsyncClient,
    hooks: RecordingHooks,
    options: SourceOptions | None = None,
) -> SourceManager:
    manager = SourceManager(hooks, client, options or fast_options())
    await manager.start(config_for(sim))
    await wait_for(lambda: subscribed(manager), what="the source to subscribe")
    return manager


async def test_subscribes_with_one_multi_notification_request(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    manager = await started(sim, client, hooks)
    await wait_for(lambda: sim.subscriptions() == [frozenset(DEFAULT_TYPES)], what="the subscription")
    assert len(sim.stats.subscription_frames) == 1
    frame = sim.stats.subscription_frames[0]
    assert frame["messageType"] == "multiNotificationRequest"
    assert sorted(frame["notifications"], key=lambda n: n["notificationType"]) == [
        {"notificationType": t, "toggle": True} for t in DEFAULT_TYPES
    ]
    # Logged in as the integration's admin in its fixed userSpace (§2).
    assert sim.sessions_by_user_space() == {"cti-bridge-1": 1}
    await manager.stop_all()


async def test_events_arrive_as_hook_calls_with_every_field(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    manager = await started(sim, client, hooks)
    await wait_for(lambda: bool(sim.subscriptions()), what="subscription on the server")
    call = await sim.place_call("incoming", callee="anne", fields={"customerRef": "K-17", "queue": {"id": 3}})
    await wait_for(lambda: len(hooks.events) == 3, what="three events")
    assert [(cid, t) for cid, t, _ in hooks.events] == [(1, t) for t, _ in call.frames]
    for (_, _, fields), (_, sent) in zip(hooks.events, call.frames, strict=True):
        assert fields == sent  # every field kept, unknown ones too
    assert hooks.events[0][2]["calleeUser"] == "anne"
    assert hooks.events[2][2]["duration"] == 30
    # Not subscribed: never sent by the server, never recorded.
    assert await sim.push("channelHungUpEvent", {"callId": "x"}) == 0
    status = manager.status(1)
    assert status.last_event_at is not None and status.connected_since is not None
    await manager.stop_all()


async def test_object_user_references_and_other_shapes(
    client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    async with XelionSimulator(user_refs="object") as sim:
        sim.add_user("master", "admin", "admin-password", admin=True)
        anne = sim.add_user("master", "anne", "anne-password", common_name="Anne Hunter")
        manager = await started(sim, client, hooks)
        await wait_for(lambda: bool(sim.subscriptions()))
        # Frames of other shapes are ignored, never fatal (§3.4).
        for sock in list(sim._sockets):
            await sock.ws.send_str("not json")
            await sock.ws.send_str('{"messageType": "test", "x": 1}')
            await sock.ws.send_str('{"notificationType": "newCallEvent", "notification": {"date": "x"}}')
        await sim.place_call("missed", callee="anne")
        await wait_for(lambda: len(hooks.events) == 3, what="three events")
        assert [t for _, t, _ in hooks.events] == ["newCallEvent", "missedCallEvent", "callHungUpEvent"]
        assert hooks.events[0][2]["calleeUser"] == {
            "commonName": "Anne Hunter",
            "oid": anne.oid,
            "objectType": "User",
        }
        assert sim.stats.websocket_connects == 1  # the odd frames did not cost a reconnect
        await manager.stop_all()


async def test_reconnect_storm_is_bounded_by_the_backoff(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    # random() == 0 gives the shortest delays the backoff allows: half of 0.1, 0.2, 0.4, 0.8, 0.8, ...
    options = fast_options(backoff_min=0.1, backoff_max=0.8, random=lambda: 0.0)
    window = 2.0
    sim.accept_then_close(window)
    started_at = time.monotonic()
    manager = SourceManager(hooks, client, options)
    await manager.start(config_for(sim))
    await asyncio.sleep(window - (time.monotonic() - started_at))
    connects_in_window = sim.stats.websocket_connects
    # Connect times at the shortest delays: 0, .05, .15, .35, .75, 1.15, 1.55, 1.95 -> at most 8.
    allowed = 0
    t, attempt = 0.0, 0
    while t < window:
        allowed += 1
        t += options.backoff_delay(attempt)
        attempt += 1
    assert allowed == 8
    assert 3 <= connects_in_window <= allowed
    assert sim.stats.login_attempts == 1  # the session outlives the storm
    # No subscription was ever confirmed (no probe echo): the storm is one gap, not a flicker.
    assert [(kind, reason) for kind, _, _, reason in hooks.gaps] == [("open", "starting")]
    assert SourceState.SUBSCRIBED not in [state for _, state, _ in hooks.states]
    # Once the server behaves, the source settles on one subscribed socket.
    await wait_for(lambda: subscribed(manager) and bool(sim.subscriptions()), timeout=3.0, what="recovery")
    assert manager.status(1).reconnects >= connects_in_window - 1
    await manager.stop_all()


async def test_backoff_resets_only_after_a_healthy_connection() -> None:
    options = SourceOptions(backoff_min=1.0, backoff_max=60.0, random=lambda: 1.0 - 1e-12)
    delays = [round(options.backoff_delay(n), 3) for n in range(8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    low = SourceOptions(backoff_min=1.0, backoff_max=60.0, random=lambda: 0.0)
    assert [low.backoff_delay(n) for n in range(3)] == [0.5, 1.0, 2.0]


async def test_backoff_resets_after_the_connection_stayed_up(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    delays: list[float] = []

    async def record_sleep(delay: float) -> None:
        delays.append(delay)

    options = fast_options(
        backoff_min=0.01, backoff_max=10.0, random=lambda: 0.0, healthy_after=0.5, sleep=record_sleep
    )
    manager = await started(sim, client, hooks, options)
    for n in range(1, 4):  # quick drops: the backoff grows
        await wait_for(lambda: bool(sim.subscriptions()))
        await sim.drop_all_sockets()
        await wait_for(lambda: len(delays) == n and sim.stats.websocket_connects == n + 1)
    await wait_for(lambda: subscribed(manager) and bool(sim.subscriptions()))
    await asyncio.sleep(0.6)  # now it stays up longer than healthy_after
    await sim.drop_all_sockets()
    await wait_for(lambda: len(delays) == 4 and subscribed(manager))
    assert delays == [0.005, 0.01, 0.02, 0.005]
    await manager.stop_all()


async def test_half_open_socket_is_noticed_and_replaced(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    options = fast_options(ping_interval=0.5, ping_timeout=0.5, close_timeout=0.3)
    manager = await started(sim, client, hooks, options)
    gaps_before = len(hooks.gaps)
    sim.pause_pongs()
    took = await wait_for(lambda: len(hooks.gaps) > gaps_before, timeout=4.0, what="the dead socket noticed")
    # ping_interval + ping_timeout (+ the close handshake, bounded by close_timeout).
    assert took <= 0.5 + 0.5 + 0.3 + 0.5
    assert hooks.gaps[-1][0] == "open"
    sim.pause_pongs(False)
    await wait_for(
        lambda: sim.stats.websocket_connects == 2 and subscribed(manager) and bool(sim.subscriptions())
    )
    await sim.place_call("incoming", callee="bob")
    await wait_for(lambda: len(hooks.events) == 3, what="events on the new socket")
    await manager.stop_all()


async def test_unconfirmed_subscription_counts_as_a_gap(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    # The source confirms its subscription with a "test" probe (§3.3); unanswered, it is no socket.
    sim.pause_echoes()
    manager = SourceManager(hooks, client, fast_options(open_timeout=0.3))
    await manager.start(config_for(sim))
    await wait_for(lambda: manager.status(1).state is SourceState.BACKOFF, what="backoff")
    assert manager.status(1).last_error == "websocket did not answer the subscription probe"
    assert [kind for kind, *_ in hooks.gaps] == ["open"]
    sim.pause_echoes(False)
    await wait_for(lambda: subscribed(manager), what="subscribed once echoes return")
    assert [kind for kind, *_ in hooks.gaps] == ["open", "close"]
    assert sim.stats.websocket_connects >= 2
    await manager.stop_all()


async def test_bad_admin_credentials_fail_without_hammering(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    manager = SourceManager(hooks, client, fast_options())
    await manager.start(config_for(sim, admin_password="wrong"))
    await wait_for(lambda: manager.status(1).state is SourceState.FAILED, what="FAILED")
    await asyncio.sleep(0.5)  # many backoff periods at the test's scale
    assert sim.stats.login_attempts == 1
    assert sim.stats.websocket_urls == 0
    status = manager.status(1)
    assert status.state is SourceState.FAILED
    assert status.last_error is not None and "10004" in status.last_error
    assert hooks.states[-1][1] is SourceState.FAILED and hooks.states[-1][2] == status.last_error
    assert "wrong" not in status.last_error
    # The same configuration again changes nothing (the replicas' periodic pass); new credentials
    # start it (§3.6); an operator's change through the API (``retry_failed``) tries once more.
    await manager.update(config_for(sim, admin_password="wrong"))
    await asyncio.sleep(0.1)
    assert sim.stats.login_attempts == 1
    await manager.update(config_for(sim, admin_password="wrong"), retry_failed=True)
    await wait_for(lambda: sim.stats.login_attempts == 2, what="one more login")
    await wait_for(lambda: manager.status(1).state is SourceState.FAILED, what="FAILED again")
    await asyncio.sleep(0.3)
    assert sim.stats.login_attempts == 2  # once, not again and again
    await manager.update(config_for(sim))
    await wait_for(lambda: subscribed(manager), what="subscribed with the right password")
    await manager.stop_all()


async def test_a_disabled_admin_account_is_tried_again_slowly_until_enabled(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    """10006 is not 10004: a Xelion admin may enable the account again without knowing that
    cti-bridge waits for it. The source shows as failed meanwhile, tries a login every
    ``disabled_retry`` (not at the reconnect backoff's pace), and subscribes once it is enabled."""
    admin = sim.tenants["master"].users["admin"]
    admin.active = False
    manager = SourceManager(hooks, client, fast_options(disabled_retry=0.4))
    await manager.start(config_for(sim))
    await wait_for(lambda: manager.status(1).state is SourceState.FAILED, what="FAILED")
    status = manager.status(1)
    assert status.last_error is not None and "10006" in status.last_error
    await asyncio.sleep(0.6)  # a dozen reconnect backoffs at the test's scale, one retry period
    assert 1 <= sim.stats.login_attempts <= 3
    assert manager.status(1).state is SourceState.FAILED
    assert sim.stats.websocket_urls == 0
    admin.active = True
    await wait_for(lambda: subscribed(manager), what="subscribed once the account is enabled")
    # The time it could not listen is one gap, from the start until it subscribed.
    assert [kind for kind, *_ in hooks.gaps] == ["open", "close"]
    await manager.stop_all()


async def test_a_session_whose_account_is_disabled_stops_renewing_while_it_waits(
    client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    """Disabled while subscribed: the session's renewer, left running, renewed when due, was
    refused, logged in (10006) and tried again every renew_retry_delay, whatever disabled_retry
    said (a review's finding). The wait is the only thing that logs in now."""
    async with XelionSimulator(port=0, token_lifetime=2.0) as sim:
        add_demo_tenant(sim)
        manager = SourceManager(hooks, client, fast_options(disabled_retry=30.0, renew_retry_delay=0.1))
        await manager.start(config_for(sim))
        await wait_for(lambda: subscribed(manager), what="subscribed")
        sim.tenants["master"].users["admin"].active = False
        await sim.expire_all_sessions()
        await sim.drop_all_sockets()
        await wait_for(lambda: manager.status(1).state is SourceState.FAILED, what="FAILED (10006)")
        before = sim.stats.login_attempts
        await asyncio.sleep(3.0)  # a tenth of disabled_retry; renewals were due every second
        assert sim.stats.login_attempts - before <= 1
        await manager.stop_all()


async def test_a_stops_gap_starts_when_the_stop_begins_not_after_the_close_handshake(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop's gap opened after the websocket's close handshake: with a server slow to answer
    the close (up to the close timeout), the events it sent meanwhile, unread, fell before the gap
    (a chaos soak's finding, by milliseconds with the simulator)."""
    from websockets.asyncio.client import ClientConnection

    manager = await started(sim, client, hooks)
    real_close = ClientConnection.close

    async def slow_close(self: ClientConnection, *args: object, **kwargs: object) -> None:
        await asyncio.sleep(0.4)  # a peer slow to answer the close frame
        await real_close(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ClientConnection, "close", slow_close)
    before = datetime.now(UTC)
    await manager.stop_all()
    [stop_gap] = [g for g in hooks.gaps if g[0] == "open" and g[3] == "cti-bridge stopped listening"]
    assert before <= stop_gap[2] < before + timedelta(seconds=0.3), (before, stop_gap)


async def test_gaps_are_recorded_and_resubscribed_after_reconnect(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    manager = await started(sim, client, hooks)
    await wait_for(lambda: bool(sim.subscriptions()))
    assert [(kind, reason) for kind, _, _, reason in hooks.gaps] == [("open", "starting"), ("close", None)]
    await sim.drop_all_sockets()
    await wait_for(lambda: len(hooks.gaps) == 4 and bool(sim.subscriptions()), what="a second gap closed")
    kinds = [kind for kind, *_ in hooks.gaps]
    assert kinds == ["open", "close", "open", "close"]
    assert hooks.gaps[2][3] is not None and "closed" in hooks.gaps[2][3]
    assert hooks.gaps[2][2] <= hooks.gaps[3][2]
    # Re-subscribed on the new socket: a fresh URL, a second frame, events flow again.
    assert sim.stats.websocket_urls == 2
    assert len(sim.stats.subscription_frames) == 2
    assert sim.subscriptions() == [frozenset(DEFAULT_TYPES)]
    await sim.place_call("outgoing", caller="carol")
    await wait_for(lambda: len(hooks.events) == 3)
    states = [state for _, state, _ in hooks.states]
    assert states[:2] == [SourceState.CONNECTING, SourceState.SUBSCRIBED]
    assert SourceState.BACKOFF in states
    await manager.stop_all()


async def test_a_gap_the_wall_clock_stepped_back_in_ends_after_it_started(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    """A gap open while the wall clock steps back an hour was stored ending an hour before it
    started (a clock-step review's finding): it ends no earlier than its start plus how long it
    lasted by the monotonic clock."""
    clock = SteppedClock()
    manager = await started(sim, client, hooks, fast_options(clock=clock))
    sim.refuse_connections(1.0)
    await sim.drop_all_sockets(1011)
    await wait_for(lambda: len(hooks.gaps) == 3, what="the gap to open")
    opened = time.monotonic()
    clock.step(-3600)
    await wait_for(lambda: len(hooks.gaps) == 4, timeout=10, what="the gap to close")
    lasted = time.monotonic() - opened
    (_, _, start, reason), (kind, _, end, _) = hooks.gaps[2:]
    assert reason is not None and kind == "close"
    # It lasted about the second of refused connections; the step does not count, either way.
    assert timedelta(seconds=0.5) <= end - start <= timedelta(seconds=lasted + 1.0)
    await manager.stop_all()


async def test_a_subscribed_source_beats_and_never_within_a_gap(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    """The heartbeat (``listened_at``, reliability.md §18) says the socket is subscribed: it comes
    every ``heartbeat_interval`` from the subscription on, stops when the socket drops and starts
    again with the next subscription, and none falls inside a gap."""
    manager = await started(sim, client, hooks, fast_options(heartbeat_interval=0.05))
    await wait_for(lambda: len(hooks.heartbeats) >= 3, what="three heartbeats")
    await sim.drop_all_sockets()
    await wait_for(lambda: len(hooks.gaps) == 4, what="the second gap closed")
    beats_when_resubscribed = len(hooks.heartbeats)
    await wait_for(lambda: len(hooks.heartbeats) >= beats_when_resubscribed + 3, what="beats after it")
    await manager.stop_all()
    beats = [at for _, at in hooks.heartbeats]
    stopped = len(beats)
    await asyncio.sleep(0.2)
    assert len(hooks.heartbeats) == stopped  # nothing beats once stopped
    assert beats == sorted(beats)
    gaps = [at for _, _, at, _ in hooks.gaps]  # open, close, open, close, open (the stop's)
    assert len(gaps) == 5
    spans = [(gaps[0], gaps[1]), (gaps[2], gaps[3]), (gaps[4], None)]
    for start, end in spans:
        assert not [b for b in beats if b >= start and (end is None or b < end)], (start, end)
    assert any(gaps[1] <= b < gaps[2] for b in beats) and any(gaps[3] <= b < gaps[4] for b in beats)


class HeldHooks(RecordingHooks):
    """on_event waits while ``go`` is clear, as the daemon's does while the database does not
    commit (its backpressure); ``held_at`` is when the first such wait began."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()
        self.go.set()
        self.held_at: datetime | None = None

    async def on_event(
        self, xelion_context_id: int, notification_type: str, fields: dict[str, object]
    ) -> None:
        await super().on_event(xelion_context_id, notification_type, fields)
        if not self.go.is_set():
            self.held_at = self.held_at or datetime.now(UTC)
            await self.go.wait()


async def test_a_socket_that_died_while_an_event_was_held_has_its_gap_from_then(
    sim: XelionSimulator, client: httpx.AsyncClient
) -> None:
    """A stalled database held on_event for a minute: nothing was read, Xelion's pings ended the
    socket, and what the server sent meanwhile was lost; but the gap started when the close was
    noticed, after the wait, so the lost calls fell in no gap (reliability.md §18). It now starts
    when the held event was read."""
    hooks = HeldHooks()
    manager = await started(sim, client, hooks)
    await wait_for(lambda: bool(sim.subscriptions()))
    hooks.go.clear()
    before = datetime.now(UTC)
    await sim.place_call("incoming", callee="anne")
    await wait_for(lambda: hooks.held_at is not None, what="an event held")
    await sim.drop_all_sockets()  # the socket ends while the source reads nothing
    lost_at = datetime.now(UTC)
    await sim.place_call("incoming", callee="bob")  # sent to no socket: lost
    await asyncio.sleep(0.2)
    hooks.go.set()
    await wait_for(lambda: len(hooks.gaps) == 4, what="the drop's gap closed")
    kind, _, start, reason = hooks.gaps[2]
    assert kind == "open" and reason is not None and "closed" in reason
    assert hooks.held_at is not None
    assert before <= start <= hooks.held_at < lost_at  # the lost call falls in the gap
    assert "bob" not in str([f for _, _, f in hooks.events])
    await manager.stop_all()


class LostBatchHooks(RecordingHooks):
    """The daemon's hooks after a batch's commit failed: the next on_event says so, and when the
    first lost event was handed over (``EventsNotRecorded``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lost_since: datetime | None = None

    async def on_event(
        self, xelion_context_id: int, notification_type: str, fields: dict[str, object]
    ) -> None:
        if self.lost_since is not None:
            since, self.lost_since = self.lost_since, None
            raise EventsNotRecorded(RuntimeError("disk full"), since)
        await super().on_event(xelion_context_id, notification_type, fields)


async def test_a_failed_batch_opens_its_gap_where_its_first_event_was_handed_over(
    sim: XelionSimulator, client: httpx.AsyncClient
) -> None:
    """reliability.md §18: the events of a batch whose commit failed were read before the source
    heard of it; the gap starts when the first of them was handed over, so that they fall in it."""
    hooks = LostBatchHooks()
    manager = await started(sim, client, hooks)
    await wait_for(lambda: bool(sim.subscriptions()))
    lost_since = datetime.now(UTC) - timedelta(seconds=30)
    hooks.lost_since = lost_since
    await sim.place_call("incoming", callee="anne")
    await wait_for(lambda: len(hooks.gaps) >= 3, what="the gap of the lost batch")
    kind, _, start, reason = hooks.gaps[2]
    assert (kind, start) == ("open", lost_since)
    assert reason is not None and "RuntimeError" in reason
    await manager.stop_all()


async def test_expired_session_logs_in_again_and_reconnects(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    manager = await started(sim, client, hooks)
    await sim.expire_all_sessions()  # the server closes the session's socket too
    await wait_for(
        lambda: sim.stats.websocket_connects == 2 and subscribed(manager) and bool(sim.subscriptions())
    )
    assert sim.stats.logins == 2
    assert sim.sessions_by_user_space() == {"cti-bridge-1": 1}
    await manager.stop_all()


async def test_stored_token_ends_the_crashed_run_session(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    crashed = XelionSession(client, sim.target("master"), "admin", "admin-password", "cti-bridge-1")
    await crashed.login()  # a previous run killed with -9: no logout
    hooks.tokens[1] = crashed.token
    manager = await started(sim, client, hooks)
    assert sim.sessions_by_user_space() == {"cti-bridge-1": 1}  # no suffix needed
    assert hooks.tokens[1] not in (None, crashed.token)
    await manager.stop_all()
    assert hooks.tokens[1] is None


async def test_failing_event_hook_drops_the_socket_and_records_a_gap(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    manager = await started(sim, client, hooks)
    await wait_for(lambda: bool(sim.subscriptions()))
    hooks.fail_events = True
    await sim.place_call("incoming", callee="anne")
    await wait_for(lambda: hooks.gaps[-1][0] == "open", what="a gap")
    assert "could not be recorded" in str(hooks.gaps[-1][3])
    hooks.fail_events = False
    await wait_for(
        lambda: subscribed(manager) and sim.stats.websocket_connects == 2 and bool(sim.subscriptions())
    )
    await manager.stop_all()


async def test_manager_start_update_stop(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    sim.add_user("master", "admin2", "admin2-password", admin=True)
    manager = await started(sim, client, hooks)
    await wait_for(lambda: bool(sim.subscriptions()))
    assert manager.status(2).state is SourceState.STOPPED  # unknown integration
    # Only the event types change: re-subscribe on the live socket, no reconnect.
    new_types = frozenset({"newCallEvent", "callHungUpEvent", "channelHungUpEvent"})
    await manager.update(config_for(sim, event_types=new_types))
    await wait_for(lambda: sim.subscriptions() == [new_types], what="re-subscription")
    assert sim.stats.websocket_connects == 1
    await sim.place_call("missed", callee="anne")  # missedCallEvent no longer subscribed
    await sim.push("channelHungUpEvent", {"callId": "c-1", "callerPhoneNumber": "+1"})
    await wait_for(lambda: len(hooks.events) == 3)
    assert [t for _, t, _ in hooks.events] == ["newCallEvent", "callHungUpEvent", "channelHungUpEvent"]
    # The same configuration again: nothing happens.
    await manager.update(config_for(sim, event_types=new_types))
    assert sim.stats.websocket_connects == 1 and sim.stats.logins == 1
    # Other admin credentials: restart (old session logged out, new one in the same userSpace).
    await manager.update(config_for(sim, admin_username="admin2", admin_password="admin2-password"))
    await wait_for(lambda: subscribed(manager) and sim.stats.websocket_connects == 2)
    assert sim.stats.logouts == 1 and sim.stats.logins == 2
    assert sim.sessions_by_user_space() == {"cti-bridge-1": 1}
    # restart(): a fresh source, counters reset.
    await manager.restart(config_for(sim, admin_username="admin2", admin_password="admin2-password"))
    await wait_for(lambda: subscribed(manager) and sim.stats.websocket_connects == 3)
    assert manager.status(1).reconnects == 0
    assert set(manager.statuses()) == {1}
    await manager.stop(1)
    assert manager.status(1).state is SourceState.STOPPED
    assert hooks.state_of(1) is SourceState.STOPPED
    assert sim.stats.logouts == 3 and sim.active_sessions() == 0
    assert manager.statuses() == {}
    await manager.stop(1)  # a no-op


async def test_stop_all_logs_out_every_source(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    """What SIGTERM triggers (reliability.md §20): every source closes its socket and logs out."""
    manager = SourceManager(hooks, client, fast_options())
    await manager.start(config_for(sim, 1))
    await manager.start(config_for(sim, 2))
    await wait_for(lambda: subscribed(manager, 1) and subscribed(manager, 2))
    assert sim.sessions_by_user_space() == {"cti-bridge-1": 1, "cti-bridge-2": 1}
    await manager.stop_all()
    assert sim.stats.logouts == 2
    assert sim.active_sessions() == 0
    await wait_for(lambda: sim.open_sockets == 0, what="sockets closed")
    assert hooks.state_of(1) is SourceState.STOPPED and hooks.state_of(2) is SourceState.STOPPED
    assert hooks.tokens == {1: None, 2: None}


async def test_source_stop_and_cancellation(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    source = XelionSource(config_for(sim), hooks, client, fast_options())
    task = asyncio.create_task(source.run())
    await wait_for(lambda: source.state is SourceState.SUBSCRIBED)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.state is SourceState.STOPPED
    assert sim.stats.logouts == 1
    source2 = XelionSource(config_for(sim), hooks, client, fast_options())
    task2 = asyncio.create_task(source2.run())
    await wait_for(lambda: source2.state is SourceState.SUBSCRIBED)
    await source2.stop()
    assert task2.cancelled() and sim.stats.logouts == 2
    # Each stop said "going away" (1001): it closed with 1011, an internal error, which the server
    # logs as the client's fault (an independent simulator's finding).
    await wait_for(lambda: len(sim.stats.close_codes) == 2)
    assert sim.stats.close_codes == [1001, 1001]


async def test_hundred_calls_arrive_with_the_right_dedupe_keys(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    manager = await started(sim, client, hooks)
    await wait_for(lambda: bool(sim.subscriptions()))
    kinds = ["incoming", "outgoing", "internal", "missed", "attended_transfer"]
    sent = []
    for n in range(100):
        kind = kinds[n % len(kinds)]
        if kind == "outgoing":
            call = await sim.place_call(kind, caller="anne", callee=f"+3161234{n:04d}")
        elif kind == "internal":
            call = await sim.place_call(kind, caller="carol", callee="anne")
        else:
            call = await sim.place_call(kind, caller=f"+3161234{n:04d}", callee="anne", transfer_to="bob")
        sent += call.frames
    await wait_for(lambda: len(hooks.events) == len(sent), timeout=10.0, what="every event")
    assert len({fields["callId"] for _, _, fields in hooks.events}) == 100
    for (context_id, event_type, fields), (sent_type, sent_fields) in zip(hooks.events, sent, strict=True):
        assert (event_type, fields) == (sent_type, sent_fields)
    keys = [dedupe_key(cid, t, f) for cid, t, f in hooks.events]
    expected = [dedupe_key(1, t, f) for t, f in sent]
    assert keys == expected
    # Each attended transfer's A-B hang-up arrives twice with one key; everything else is unique.
    transfers = sum(1 for n in range(100) if kinds[n % len(kinds)] == "attended_transfer")
    assert transfers == 20
    assert len(set(keys)) == len(keys) - transfers
    for n in range(len(hooks.events) - 1):
        if keys[n] == keys[n + 1]:
            assert hooks.events[n][1] == "callHungUpEvent"
            assert hooks.events[n][2]["callerUser"] == "anne" and hooks.events[n][2]["calleeUser"] == "bob"
    await manager.stop_all()


def test_options_are_frozen() -> None:
    options = SourceOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.backoff_min = 5  # type: ignore[misc]
    assert (options.ping_interval, options.ping_timeout, options.backoff_max, options.healthy_after) == (
        20.0,
        20.0,
        60.0,
        30.0,
    )


class SlowStopHooks(RecordingHooks):
    async def on_state(self, xelion_context_id: int, state: SourceState, error: str | None) -> None:
        if state is SourceState.STOPPED:
            await asyncio.sleep(1.0)  # the STOPPED write of the old source is slow (a busy database)
        await super().on_state(xelion_context_id, state, error)


async def test_a_restart_never_shows_standby_without_replicas(
    sim: XelionSimulator, client: httpx.AsyncClient
) -> None:
    """Found in review: between the two sources of a restart the integration showed ``standby``,
    which readiness counts as ready; one process has no other replica listening meanwhile."""
    manager = SourceManager(SlowStopHooks(), client, fast_options())  # default LocalOwnership = SQLite
    await manager.start(config_for(sim))
    await wait_for(lambda: manager.status(1).state is SourceState.SUBSCRIBED)
    restart = asyncio.create_task(manager.restart(config_for(sim)))
    seen: set[SourceState] = set()
    while not restart.done():
        seen.add(manager.status(1).state)
        await asyncio.sleep(0.01)
    await manager.stop_all()
    # readiness() counts STANDBY as ready, and it is documented as a PostgreSQL-replica state only
    assert SourceState.STANDBY not in seen, seen


class FreezableProxy:
    """A TCP proxy in front of the simulator; ``freeze`` silently drops every byte of the websocket
    connections open then, both ways (a half-open path: a NAT or firewall that lost its state, a
    VPN or Wi-Fi blip): nothing closes, nothing arrives."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections: list[dict[str, bool]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        conn = {"frozen": False, "websocket": False}
        self.connections.append(conn)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    if data.startswith(b"GET /websocket"):
                        conn["websocket"] = True
                    if not conn["frozen"]:
                        w.write(data)
                        await w.drain()

        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    def freeze(self) -> None:
        for conn in self.connections:
            if conn["websocket"]:
                conn["frozen"] = True

    async def stop(self) -> None:
        self.server.close()


async def test_a_silently_dead_socket_puts_what_it_lost_inside_the_gap(
    sim: XelionSimulator, client: httpx.AsyncClient, hooks: RecordingHooks
) -> None:
    """A half-open path drops what the server sends and closes nothing; the client notices only
    when a keepalive ping goes unanswered (ping interval + timeout later, 40 s with the protocol's
    settings). The gap opened when that was noticed, so a hang-up sent meanwhile was lost outside
    every gap (a protocol review's finding). It now starts when the server was last heard: the
    hang-up falls inside it."""
    proxy = FreezableProxy(sim.port)
    sim.port = await proxy.start()  # REST and websocket URLs now go through the proxy
    source = XelionSource(
        config_for(sim),
        hooks,
        client,
        fast_options(ping_interval=1.0, ping_timeout=1.0, heartbeat_interval=None),
    )
    task = asyncio.create_task(source.run())
    try:
        await wait_for(lambda: source.state is SourceState.SUBSCRIBED, what="subscribed")
        await sim.place_call("incoming", call_id="A")
        await wait_for(lambda: len(hooks.events) == 3, what="call A")
        proxy.freeze()
        await asyncio.sleep(0.2)
        lost_at = datetime.now(UTC)
        assert await sim.push("callHungUpEvent", {"callId": "B", "calleeUser": "anne", "duration": 5}) == 1
        await wait_for(
            lambda: source.state is not SourceState.SUBSCRIBED, timeout=10, what="the close noticed"
        )
        await wait_for(lambda: source.state is SourceState.SUBSCRIBED, timeout=10, what="subscribed again")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await proxy.stop()
    assert "B" not in [f["callId"] for _, _, f in hooks.events]  # lost on the wire, as set up
    opened = [(at, reason) for kind, _, at, reason in hooks.gaps if kind == "open"]
    closed = [at for kind, _, at, _ in hooks.gaps if kind == "close"]
    [(started, reason)] = [(at, r) for at, r in opened if r.startswith("websocket closed")]
    assert started <= lost_at, (started, lost_at, reason)
    assert any(at > lost_at for at in closed)
    # Not earlier than the keepalive allows: the last frame read (call A's events), at most
    # ping interval + timeout + close timeout before the close was noticed.
    assert started >= lost_at - timedelta(seconds=1.0 + 1.0 + fast_options().close_timeout + 1.0)
