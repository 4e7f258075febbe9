"""What the sources store of their listening (store/sources.py), on SQLite and PostgreSQL: the last
moment a source is known to have listened, from which a crashed daemon's downtime gap starts
(reliability.md §18)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlmodel import col, select

from cti_bridge.store import sources
from cti_bridge.store.db import Database
from cti_bridge.store.models import SourceGap, XelionContext

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def context(database: Database) -> int:
    def write(session):  # type: ignore[no-untyped-def]
        xc = XelionContext(host="xelion.example", tenant="t", admin_username="admin", admin_password_enc="x")
        session.add(xc)
        session.flush()
        return xc.id

    return int(database.run_sync(write))


def test_the_last_listen_is_the_latest_of_event_subscription_and_heartbeat(database: Database) -> None:
    ctx = context(database)
    assert database.run_sync(lambda s: sources.load_state(s, ctx)) == ("stopped", None)

    def gap_then_subscribed(session):  # type: ignore[no-untyped-def]
        session.add(
            SourceGap(xelion_context_id=ctx, started_at=T0, ended_at=T0 + timedelta(seconds=5), reason="x")
        )

    database.run_sync(gap_then_subscribed)
    assert database.run_sync(lambda s: sources.load_state(s, ctx))[1] == T0 + timedelta(seconds=5)

    # An event stored later (its time written up to a second late: a second earlier).
    database.run_sync(
        lambda s: s.get(XelionContext, ctx).__setattr__("last_event_at", T0 + timedelta(seconds=9))
    )
    assert database.run_sync(lambda s: sources.load_state(s, ctx))[1] == T0 + timedelta(seconds=8)

    # A quiet hour, heartbeats all along: the last one decides.
    for minutes in (1, 30, 60):
        database.run_sync(lambda s, m=minutes: sources.heartbeat(s, ctx, T0 + timedelta(minutes=m)))
    assert database.run_sync(lambda s: sources.load_state(s, ctx))[1] == T0 + timedelta(minutes=60)


def test_a_heartbeat_never_goes_back(database: Database) -> None:
    """Two replicas around a takeover, or a beat written late: the later time stays."""
    ctx = context(database)
    database.run_sync(lambda s: sources.heartbeat(s, ctx, T0 + timedelta(seconds=30)))
    database.run_sync(lambda s: sources.heartbeat(s, ctx, T0))
    assert database.run_sync(lambda s: s.get(XelionContext, ctx).listened_at) == T0 + timedelta(seconds=30)
    database.run_sync(lambda s: sources.heartbeat(s, ctx, T0 + timedelta(seconds=31)))
    assert database.run_sync(lambda s: s.get(XelionContext, ctx).listened_at) == T0 + timedelta(seconds=31)


def _open_gaps(database: Database, ctx: int) -> list[tuple[datetime, str | None]]:
    def read(session):  # type: ignore[no-untyped-def]
        rows = session.exec(
            select(SourceGap).where(
                col(SourceGap.xelion_context_id) == ctx, col(SourceGap.ended_at).is_(None)
            )
        )
        return [(r.started_at, r.reason) for r in rows]

    return list(database.run_sync(read))


def test_an_earlier_start_moves_the_open_gap_back_and_nothing_opens_one(database: Database) -> None:
    """Events lost before the gap opened, told later (a failed commit): the gap must cover them.
    With no gap open nothing is written: a gap opened there would stay open for ever (no source
    knows of it), as a review found when such a failure reached the store after the source had
    listened again, or on a replica that no longer owned the integration."""
    ctx = context(database)
    earlier = T0 - timedelta(seconds=4)
    database.run_sync(lambda s: sources.extend_open_gap(s, ctx, earlier, "an event could not be recorded: x"))
    assert _open_gaps(database, ctx) == []
    database.run_sync(lambda s: sources.open_gap(s, ctx, T0, "cti-bridge stopped listening"))
    database.run_sync(lambda s: sources.open_gap(s, ctx, T0 - timedelta(seconds=9), "again"))
    assert _open_gaps(database, ctx) == [(T0, "cti-bridge stopped listening")]  # opening keeps the first
    database.run_sync(lambda s: sources.extend_open_gap(s, ctx, T0 + timedelta(seconds=3), "later"))
    assert _open_gaps(database, ctx) == [(T0, "cti-bridge stopped listening")]
    database.run_sync(
        lambda s: sources.extend_open_gap(s, ctx, earlier, "an event could not be recorded: disk full")
    )
    assert _open_gaps(database, ctx) == [
        (earlier, "an event could not be recorded: disk full; then: cti-bridge stopped listening")
    ]


async def test_commits_that_fail_after_the_sources_stopped_move_the_stop_gap_back(database: Database) -> None:
    """At a stop the sources stop first (their gap opens then) and the last commits come after;
    those that failed lost events read before the gap began, and no source was left to tell
    (a protocol review's finding). ``record_unheard_failures`` moves the open gap back to them."""
    from cti_bridge.app import StoreSourceHooks
    from cti_bridge.ports import EventsNotRecorded

    ctx = context(database)
    hooks = StoreSourceHooks(database, None, None, None)  # type: ignore[arg-type]
    await hooks.gap_opened(ctx, T0, "cti-bridge stopped listening")
    hooks._failed[ctx] = EventsNotRecorded(RuntimeError("disk full"), T0 - timedelta(seconds=2))
    await hooks.record_unheard_failures()
    [(started, reason)] = _open_gaps(database, ctx)
    assert started == T0 - timedelta(seconds=2)
    assert reason is not None and reason.startswith("an event could not be recorded: ")
    await hooks.record_unheard_failures()  # told once
    assert _open_gaps(database, ctx)[0][0] == T0 - timedelta(seconds=2)
