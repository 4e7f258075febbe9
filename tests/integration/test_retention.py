"""Retention (store/retention.py, retention.py): history past its time is deleted in batches, and
nothing that is unfinished, recent, or needed by a kept delivery is. On SQLite and PostgreSQL,
with a fixed ``now``."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select, text
from sqlmodel import Session

from cti_bridge.config import Settings
from cti_bridge.retention import Retention
from cti_bridge.store.db import Database
from cti_bridge.store.deliveries import dismiss, insert_event, park_credential, replay
from cti_bridge.store.models import CallEvent, Delivery, DeliveryAttempt, SourceGap
from cti_bridge.store.retention import Pruned, prune_batch
from tests.integration.oauth_helpers import FakeClock
from tests.integration.test_delivery_leases import T0, World, make_world

DAY = timedelta(days=1)
NOW = T0 + 31 * DAY  # with 30 days kept, the cutoff is T0 + 1 day


async def _pass(retention: Retention) -> Pruned:
    """One pass, which must end (a pass that walks the same events for ever fails here)."""
    return await asyncio.wait_for(retention.prune(), 10)


def _settings(**values: float) -> Settings:
    return Settings(database_url="sqlite:///unused.db", **values)


def _finished(world: World, call_id: str, state: str, at: datetime) -> str:
    """A delivery created at ``at`` that ended in ``state`` a minute later; its id."""
    delivery_id = world.event(call_id, now=at)
    ((claimed, claim),) = world.claim(at + timedelta(seconds=30))
    assert claimed == delivery_id
    assert world.complete(delivery_id, claim, state, now=at + timedelta(minutes=1))
    return delivery_id


def _bare_event(world: World, call_id: str, at: datetime) -> int:
    """An event no mapping applied to (no delivery); its id."""
    event_id = world.db.run_sync(
        lambda s: insert_event(
            s,
            xelion_context_id=world.xelion_context_id,
            notification_type="newCallEvent",
            call_id=call_id,
            dedupe_key=f"bare-{call_id}",
            payload={"callId": call_id},
            now=at,
        )
    )
    assert event_id is not None
    return event_id


def _gap(world: World, started: datetime, ended: datetime | None) -> int:
    def write(session: Session) -> int:
        gap = SourceGap(xelion_context_id=world.xelion_context_id, started_at=started, ended_at=ended)
        session.add(gap)
        session.flush()
        assert gap.id is not None
        return gap.id

    return world.db.run_sync(write)


def _ids(db: Database, model: type, column: str) -> set[object]:
    return set(db.run_sync(lambda s: s.execute(select(getattr(model, column))).scalars().all()))


def _event_of(db: Database, delivery_id: str) -> int:
    return int(
        db.run_sync(
            lambda s: s.execute(select(Delivery.event_id).where(Delivery.id == delivery_id)).scalar_one()
        )
    )


def _count(db: Database, model: type) -> int:
    return int(db.run_sync(lambda s: s.execute(select(func.count()).select_from(model)).scalar_one()))


def test_prune_deletes_only_finished_history_past_its_time(database: Database) -> None:
    world = make_world(database)
    old_delivered = _finished(world, "c-old-ok", "delivered", T0)
    old_event = _event_of(database, old_delivered)
    replayed = _finished(world, "c-replayed", "delivered", T0)
    # Replayed and delivered again yesterday: it was last changed within the window.
    assert database.run_sync(lambda s: replay(s, replayed, NOW - DAY))
    ((again, claim),) = world.claim(NOW - DAY)
    assert again == replayed and world.complete(replayed, claim, "delivered", now=NOW - DAY)
    old_dead = _finished(world, "c-old-dead", "dead", T0)
    old_dismissed = _finished(world, "c-old-dismissed", "dead", T0)
    assert database.run_sync(lambda s: dismiss(s, old_dismissed, T0 + timedelta(minutes=5)))
    recent_delivered = _finished(world, "c-recent", "delivered", T0 + 2 * DAY)
    # Unfinished work a month old: parked (a user to re-authorise), leased (a worker that never
    # came back), pending (never claimed). None of it may go.
    old_parked = world.event("c-old-parked", now=T0)
    database.run_sync(lambda s: park_credential(s, credential_id=world.credential_id, reason="x", now=T0))
    assert world.row(old_parked).state == "parked"
    old_sending = world.event("c-old-sending", now=T0)
    assert [d for d, _ in world.claim(T0 + timedelta(seconds=1))] == [old_sending]
    old_pending = world.event("c-old-pending", now=T0)
    old_bare = _bare_event(world, "c-old-bare", T0)
    recent_bare = _bare_event(world, "c-recent-bare", NOW - DAY)
    old_gap = _gap(world, T0, T0 + timedelta(minutes=3))
    open_gap = _gap(world, T0, None)
    recent_gap = _gap(world, NOW - DAY, NOW - DAY + timedelta(minutes=1))
    attempts_before = _count(database, DeliveryAttempt)

    pruned, walked_to, more = database.run_sync(
        lambda s: prune_batch(s, delivered_before=NOW - 30 * DAY, dead_before=None, limit=100)
    )

    assert pruned == Pruned(deliveries=1, attempts=1, events=2, gaps=1)
    assert walked_to == T0 and not more  # every event before the cutoff walked
    assert _ids(database, Delivery, "id") == {
        replayed,
        old_dead,
        old_dismissed,
        recent_delivered,
        old_parked,
        old_sending,
        old_pending,
    }
    assert world.row(old_sending).state == "sending"
    assert world.attempts(replayed) == 2  # kept whole
    assert _count(database, DeliveryAttempt) == attempts_before - 1
    events = _ids(database, CallEvent, "id")
    assert old_event not in events and old_bare not in events
    assert recent_bare in events
    assert _ids(database, SourceGap, "id") == {open_gap, recent_gap}
    assert old_gap not in _ids(database, SourceGap, "id")
    # A second pass finds nothing more.
    assert (
        database.run_sync(
            lambda s: prune_batch(s, delivered_before=NOW - 30 * DAY, dead_before=None, limit=100)
        )[0]
        == Pruned()
    )


def test_dead_and_dismissed_go_only_when_a_dead_retention_is_set(database: Database) -> None:
    world = make_world(database)
    dead = _finished(world, "c-dead", "dead", T0)
    dismissed = _finished(world, "c-dismissed", "dead", T0)
    assert database.run_sync(lambda s: dismiss(s, dismissed, T0 + timedelta(minutes=5)))
    recent_dead = _finished(world, "c-recent-dead", "dead", NOW - 5 * DAY)
    delivered = _finished(world, "c-ok", "delivered", T0)
    bare = _bare_event(world, "c-bare", T0)
    events_kept = {_event_of(database, recent_dead), _event_of(database, delivered), bare}

    # Delivered history kept for ever (retention_days = 0), dead kept 10 days: the dead and the
    # dismissed delivery go, with their attempts and their events (no delivery needs them now);
    # the event without deliveries is delivered history, kept.
    pruned, _, more = database.run_sync(
        lambda s: prune_batch(s, delivered_before=None, dead_before=NOW - 10 * DAY, limit=100)
    )

    assert pruned == Pruned(deliveries=2, attempts=2, events=2)
    assert not more
    assert _ids(database, Delivery, "id") == {recent_dead, delivered}
    assert dead not in _ids(database, Delivery, "id")
    assert _ids(database, CallEvent, "id") == events_kept


async def test_the_event_walk_is_bounded_by_the_batch_and_goes_on_where_it_stopped(
    database: Database,
) -> None:
    """Events kept for their (dead) deliveries are walked past once per batch's worth, not again
    at every batch or pass; an event kept that way goes when its delivery goes."""
    world = make_world(database)
    kept = [_finished(world, f"c-dead-{i}", "dead", T0 - timedelta(seconds=7 - i)) for i in range(7)]
    bare = [_bare_event(world, f"c-bare-{i}", T0 + timedelta(seconds=i)) for i in range(3)]
    retention = Retention(database, _settings(retention_days=30), FakeClock(NOW))
    retention.batch, retention.pause = 4, 0.0

    cutoff = NOW - 30 * DAY
    walked: list[tuple[int, bool]] = []
    position = None
    for _ in range(3):
        pruned, position, more = database.run_sync(
            lambda s: prune_batch(
                s, delivered_before=cutoff, dead_before=None, limit=4, events_after=position
            )
        )
        assert position is not None
        walked.append((pruned.events, more))
    # 4 kept events walked past; then 3 kept and 1 bare; then the 2 bare left, and the end.
    assert walked == [(0, True), (1, True), (2, False)]
    assert position == T0 + timedelta(seconds=2)
    assert not set(bare) & _ids(database, CallEvent, "id")
    retention.events_after = position
    # On SQLite this event takes an id again that a deleted one had (the largest id plus one),
    # below the walk's last id: the walk goes by time, so it is not passed over.
    later = _bare_event(world, "c-bare-later", T0 + DAY / 2)
    assert await _pass(retention) == Pruned(events=1)  # only what came after the last walk
    assert later not in _ids(database, CallEvent, "id")
    # The dead deliveries' events stay as long as the deliveries do; with a dead retention set
    # they go with them, though the walk is long past them.
    assert len(_ids(database, CallEvent, "id")) == 7
    assert _ids(database, Delivery, "id") == set(kept)
    retention.settings = _settings(retention_days=30, dead_retention_days=10)
    assert await _pass(retention) == Pruned(deliveries=7, attempts=7, events=7)
    assert not _ids(database, Delivery, "id") and not _ids(database, CallEvent, "id")


def test_the_walk_takes_events_of_one_time_whole(database: Database) -> None:
    """An ingest batch's events share their ``received_at``: a batch of the walk that the LIMIT
    cuts inside such a group takes the rest of it too, so the next one, starting after that time,
    misses none."""
    world = make_world(database)
    kept = [_finished(world, f"c-dead-{i}", "dead", T0) for i in range(3)]
    same_time = [_bare_event(world, f"c-bare-{i}", T0) for i in range(4)]
    after = _bare_event(world, "c-after", T0 + timedelta(seconds=1))
    cutoff = NOW - 30 * DAY

    pruned, position, more = database.run_sync(
        lambda s: prune_batch(s, delivered_before=cutoff, dead_before=None, limit=2)
    )
    assert (pruned.events, position, more) == (4, T0, True)
    pruned, position, more = database.run_sync(
        lambda s: prune_batch(s, delivered_before=cutoff, dead_before=None, limit=2, events_after=T0)
    )
    assert (pruned.events, position, more) == (1, T0 + timedelta(seconds=1), False)
    assert _ids(database, CallEvent, "id") == {_event_of(database, d) for d in kept}
    assert not (set(same_time) | {after}) & _ids(database, CallEvent, "id")


async def test_a_pass_runs_batch_after_batch_until_nothing_has_expired(database: Database) -> None:
    world = make_world(database)
    old = [_finished(world, f"c-{i}", "delivered", T0 + timedelta(seconds=i)) for i in range(8)]
    keep = _finished(world, "c-new", "delivered", NOW - DAY)
    retention = Retention(database, _settings(retention_days=30), FakeClock(NOW))
    retention.batch, retention.pause = 3, 0.0

    async def one_pass() -> list[Pruned]:
        return [batch async for batch in retention.batches()]

    batches = await asyncio.wait_for(one_pass(), 10)
    pruned = sum(batches, Pruned())

    assert pruned == Pruned(deliveries=8, attempts=8, events=8)
    assert [b.deliveries for b in batches] == [3, 3, 2]
    assert _ids(database, Delivery, "id") == {keep}
    assert not set(old) & _ids(database, Delivery, "id")


async def test_zero_days_keeps_everything(database: Database) -> None:
    world = make_world(database)
    _finished(world, "c-ok", "delivered", T0)
    _finished(world, "c-dead", "dead", T0)
    retention = Retention(database, _settings(retention_days=0, dead_retention_days=0), FakeClock(NOW))

    assert await _pass(retention) == Pruned()
    assert _count(database, Delivery) == 2 and _count(database, CallEvent) == 2


async def test_the_loop_passes_at_start_and_at_each_interval_and_stops(database: Database) -> None:
    world = make_world(database)

    async def gone() -> None:
        while _count(database, Delivery):
            await asyncio.sleep(0.01)

    for interval in (3600.0, 0.05):
        _finished(world, f"c-{interval}", "delivered", T0)
        settings = _settings(retention_days=30, retention_interval_seconds=interval)
        retention = Retention(database, settings, FakeClock(NOW))
        stop = asyncio.Event()
        task = asyncio.create_task(retention.run(stop))
        await asyncio.wait_for(gone(), 5)  # the pass at start (the next one is an hour away)
        if interval < 1:
            later = _finished(world, "c-later", "delivered", T0)
            await asyncio.wait_for(gone(), 5)  # a pass at the next interval
            assert later not in _ids(database, Delivery, "id")
        stop.set()
        await asyncio.wait_for(task, 5)
        assert task.result() is None


async def test_a_pass_ends_however_many_old_events_it_keeps(database: Database) -> None:
    """More kept events (dead deliveries, dead retention 0) than a batch walks: the walk moves on
    from batch to batch (its position is kept) and the pass ends."""
    world = make_world(database)
    for i in range(9):
        _finished(world, f"c-dead-{i}", "dead", T0 + timedelta(seconds=i))
    retention = Retention(database, _settings(retention_days=30), FakeClock(NOW))
    retention.batch, retention.pause = 4, 0.0

    assert await _pass(retention) == Pruned()
    assert retention.events_after == T0 + timedelta(seconds=8)
    assert _count(database, CallEvent) == 9


async def test_a_day_later_the_walk_starts_from_the_beginning(database: Database) -> None:
    """An event left behind the walk without a delivery (here: one received, by the wall clock,
    before where the walk already is) is found by the first pass a day later."""
    world = make_world(database)
    _bare_event(world, "c-1", T0 + timedelta(hours=1))
    clock = FakeClock(NOW)
    retention = Retention(database, _settings(retention_days=30), clock)
    assert await _pass(retention) == Pruned(events=1)
    behind = _bare_event(world, "c-behind", T0)
    assert await _pass(retention) == Pruned()  # the walk is past it
    clock.advance(86400)
    assert await _pass(retention) == Pruned(events=1)
    assert behind not in _ids(database, CallEvent, "id")


def test_on_postgresql_one_replica_prunes_at_a_time(database: Database) -> None:
    """A replica whose batch finds another's batch running (the advisory lock) deletes nothing
    and ends its pass; once that one committed, it goes on."""
    if database.is_sqlite:
        pytest.skip("SQLite has one writer: one process, one job")
    world = make_world(database)
    _finished(world, "c-1", "delivered", T0)
    cutoff = NOW - 30 * DAY
    with database.engine.connect() as other:
        other.execute(text("SELECT pg_advisory_xact_lock(hashtext('cti-bridge retention'))"))
        assert database.run_sync(
            lambda s: prune_batch(s, delivered_before=cutoff, dead_before=None, limit=10)
        ) == (Pruned(), None, False)
        other.rollback()
    pruned, _, _ = database.run_sync(
        lambda s: prune_batch(s, delivered_before=cutoff, dead_before=None, limit=10)
    )
    assert pruned == Pruned(deliveries=1, attempts=1, events=1)


def test_a_batch_deletes_a_bounded_number_of_attempt_records(database: Database) -> None:
    """Deliveries with many attempts (retried through the schedule, replayed again and again) no
    longer make a batch of thousands of rows: one limit of deliveries for every state together,
    and at most ATTEMPTS_PER_DELIVERY x limit attempt records, except a first delivery, which goes
    whatever it has. Everything still goes, batch after batch."""
    world = make_world(database)
    delivered = [_finished(world, f"c-ok-{n}", "delivered", T0) for n in range(4)]
    dead = [_finished(world, f"c-dead-{n}", "dead", T0) for n in range(4)]
    heavy = _finished(world, "c-heavy", "dead", T0 - DAY)  # the oldest dead one: first in line

    def more_attempts(delivery_id: str, n: int) -> None:
        def write(s: Session) -> None:
            for k in range(n):
                s.add(
                    DeliveryAttempt(
                        delivery_id=delivery_id, attempt_no=k + 2, started_at=T0, outcome="retry",
                        request_method="POST", request_url="https://crm.example/calls",
                    )
                )  # fmt: skip

        database.run_sync(write)

    for d in dead:
        more_attempts(d, 2)  # three each
    more_attempts(heavy, 20)  # twenty-one: more than a whole batch's budget
    limit = 4  # a budget of 8 attempt records
    batches: list[Pruned] = []
    after = None
    while True:
        batch, after, more = database.run_sync(
            lambda s, a=after: prune_batch(
                s, delivered_before=T0 + DAY, dead_before=T0 + DAY, limit=limit, events_after=a
            )
        )
        batches.append(batch)
        if not more and batch.deliveries < limit:
            break
        assert len(batches) < 20
    assert [(b.deliveries, b.attempts) for b in batches if b.deliveries] == [
        (4, 4),  # the delivered ones: the limit is shared, so no dead one joins them
        (1, 21),  # alone, whatever it has; the next (3 more) would exceed the budget
        (2, 6),  # two dead ones (3 + 3); a third would make 9 > 8
        (2, 6),
    ]
    assert _count(database, Delivery) == 0 and _count(database, DeliveryAttempt) == 0
    assert set(delivered + dead + [heavy]).isdisjoint(_ids(database, Delivery, "id"))
