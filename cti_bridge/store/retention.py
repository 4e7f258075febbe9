"""Retention: deleting history older than the operator keeps, a bounded batch per transaction.

What goes (README "Retention"): deliveries that ended ``delivered`` (and their attempts) once last
changed before the delivered cutoff; ``dead`` and ``dismissed`` ones before the dead cutoff, when
the operator set one; the events of those deliveries once no delivery refers to them; events
received before the delivered cutoff that never had a delivery (no mapping applied); and ended
websocket gaps older than it. Work that is not finished (``pending``, ``sending``, ``parked``) is
never deleted, whatever its age, and nor is the event a kept delivery needs for its payload.

Each call deletes at most ``limit`` deliveries (all states together) with at most
``ATTEMPTS_PER_DELIVERY * limit`` attempt records, and walks at most ``limit`` events, in one
transaction, so the write lock (one writer on SQLite) is held for milliseconds and the pipeline's
commits go on between batches. Every walk is bounded by the batch, not by how much history is
kept: deliveries through a prefix of ``ix_delivery_due``, events in the order of their
``received_at`` index from where the previous batch stopped.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, exists, func, select, text
from sqlmodel import Session, col

from cti_bridge.store.models import CallEvent, Delivery, DeliveryAttempt, SourceGap


@dataclass(frozen=True)
class Pruned:
    """Rows deleted, by kind."""

    deliveries: int = 0
    attempts: int = 0
    events: int = 0
    gaps: int = 0

    def __add__(self, other: Pruned) -> Pruned:
        return Pruned(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def total(self) -> int:
        return sum(astuple(self))


def _finished(
    session: Session, state: str, before: datetime, limit: int, *, lock: bool
) -> list[tuple[str, int]]:
    """Up to ``limit`` (id, event id) of deliveries in ``state`` last changed before ``before``,
    oldest first. The range ``state = ? AND next_attempt_at < ?`` is a prefix of ``ix_delivery_due``
    and holds (nearly) only such deliveries (a finished delivery was due before it finished; a
    replay makes it due again), so the walk is as long as the batch, however much history is
    kept. Locked on PostgreSQL: a replay meanwhile waits for this transaction and then finds
    nothing to replay rather than a half-deleted delivery."""
    query = (
        select(col(Delivery.id), col(Delivery.event_id))
        .where(
            col(Delivery.state) == state,
            col(Delivery.next_attempt_at) < before,
            col(Delivery.updated_at) < before,
        )
        .order_by(col(Delivery.next_attempt_at))
        .limit(limit)
    )
    if lock:
        query = query.with_for_update(skip_locked=True)
    return [(str(row[0]), int(row[1])) for row in session.execute(query)]


#: Attempt records a batch deletes at most, per delivery of its limit. A delivered delivery has one
#: or two; one that went through its retries (nine by default) or was replayed again and again has
#: many, each with excerpts of up to 4 KiB: 600 such deliveries (200 of each finished state, as
#: batches were) deleted 5,400 records in one transaction, 250-280 ms on SQLite during which the
#: delivery path waited for the database (a retention review's measurement).
ATTEMPTS_PER_DELIVERY = 2


def _within_attempt_budget(
    session: Session, found: list[tuple[str, int]], budget: int
) -> list[tuple[str, int]]:
    """The first of ``found`` whose attempt records together stay within ``budget`` (the first
    always, however many it has: it must go some day). One look-up of
    ``ix_delivery_attempt_delivery_id`` for the batch."""
    if not found:
        return found
    counts: dict[str, int] = {
        str(row[0]): int(row[1])
        for row in session.execute(
            select(col(DeliveryAttempt.delivery_id), func.count())
            .where(col(DeliveryAttempt.delivery_id).in_([d for d, _ in found]))
            .group_by(col(DeliveryAttempt.delivery_id))
        )
    }
    kept: list[tuple[str, int]] = []
    total = 0
    for item in found:
        total += counts.get(item[0], 0)
        if kept and total > budget:
            break
        kept.append(item)
    return kept


def _delete_orphans(session: Session, event_ids: list[int]) -> int:
    """Delete those of ``event_ids`` that no delivery refers to."""
    if not event_ids:
        return 0
    return _rowcount(
        session,
        delete(CallEvent).where(
            col(CallEvent.id).in_(event_ids),
            ~exists().where(col(Delivery.event_id) == col(CallEvent.id)),
        ),
    )


def _rowcount(session: Session, statement: Any) -> int:
    result: Any = session.execute(statement)
    return int(result.rowcount)


#: On PostgreSQL, replicas of the daemon share the database and each runs passes. Two batches
#: at once could each delete one of an event's two deliveries, each still see the other's
#: (uncommitted: READ COMMITTED) and keep the event, which both walks then leave behind. So one
#: batch at a time: a transaction-level advisory lock, and a replica that finds it taken ends its
#: pass (the one holding it does the work).
_ONE_PRUNER = text("SELECT pg_try_advisory_xact_lock(hashtext('cti-bridge retention'))")

#: Where the walk over events stopped: the ``received_at`` of the last events walked (all of them).
EventCursor = datetime


def prune_batch(
    session: Session,
    *,
    delivered_before: datetime | None,
    dead_before: datetime | None,
    limit: int,
    events_after: EventCursor | None = None,
) -> tuple[Pruned, EventCursor | None, bool]:
    """Delete one batch of expired history (see the module docstring). A cutoff of None keeps that
    kind for ever.

    Events: those of the deliveries deleted here, once none is left; and, walking
    ``ix_call_event_received_at`` from after ``events_after`` up to ``delivered_before``, about
    ``limit`` of them, those without a delivery (events no mapping applied to). Returns what was
    deleted, the ``received_at`` of the last events walked (the caller starts the next batch, and
    the next pass, after it: events passed over, kept for a delivery, are not walked again and
    again; when their deliveries go, the first part takes them) and whether the walk may go on.

    The position is a time, not an id: SQLite gives a new row the largest id plus one, so once
    the newest events are deleted their ids come again, below an id position. An ingest batch's
    events share their ``received_at``; the walk takes such a group whole (a second look-up of
    that one time), so the next batch can start strictly after it, and both databases walk the
    index in its own order without sorting the range."""
    postgresql = session.get_bind().dialect.name == "postgresql"
    if postgresql and not session.execute(_ONE_PRUNER).scalar_one():
        return Pruned(), events_after, False  # another replica is pruning: this pass ends here
    found: list[tuple[str, int]] = []
    if delivered_before is not None:
        found += _finished(session, "delivered", delivered_before, limit, lock=postgresql)
    if dead_before is not None:
        for state in ("dead", "dismissed"):
            if len(found) < limit:  # one limit for the three states, not one each
                found += _finished(session, state, dead_before, limit - len(found), lock=postgresql)
    kept = _within_attempt_budget(session, found, ATTEMPTS_PER_DELIVERY * limit)
    cut = len(kept) < len(found)  # the rest waits for the next batch, which comes at once
    found = kept
    ids = [d for d, _ in found]
    attempts = deliveries = events = gaps = 0
    if ids:
        attempts = _rowcount(
            session, delete(DeliveryAttempt).where(col(DeliveryAttempt.delivery_id).in_(ids))
        )
        deliveries = _rowcount(session, delete(Delivery).where(col(Delivery.id).in_(ids)))
        events = _delete_orphans(session, sorted({e for _, e in found}))
    walked_to, more = events_after, False
    if delivered_before is not None:
        walk = select(col(CallEvent.received_at), col(CallEvent.id)).where(
            col(CallEvent.received_at) < delivered_before
        )
        if events_after is not None:
            walk = walk.where(col(CallEvent.received_at) > events_after)
        rows = session.execute(walk.order_by(col(CallEvent.received_at)).limit(limit)).all()
        walked = [int(r[1]) for r in rows]
        if rows:
            walked_to, more = rows[-1][0], len(rows) == limit
            if more:  # the rest of the last time's group, which the LIMIT may have cut
                walked += [
                    int(r[0])
                    for r in session.execute(
                        select(col(CallEvent.id)).where(
                            col(CallEvent.received_at) == walked_to, col(CallEvent.id).not_in(walked)
                        )
                    )
                ]
            events += _delete_orphans(session, walked)
        gap_ids = [
            int(row[0])
            for row in session.execute(
                select(col(SourceGap.id))
                .where(col(SourceGap.ended_at).is_not(None), col(SourceGap.ended_at) < delivered_before)
                .limit(limit)
            )
        ]
        if gap_ids:
            gaps = _rowcount(session, delete(SourceGap).where(col(SourceGap.id).in_(gap_ids)))
    return Pruned(deliveries=deliveries, attempts=attempts, events=events, gaps=gaps), walked_to, more or cut
