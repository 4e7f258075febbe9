"""What the sources store of their listening (store/sources.py), on SQLite and PostgreSQL: the last
moment a source is known to have listened, from which a crashed daemon's downtime gap starts
(reliability.md §18)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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
