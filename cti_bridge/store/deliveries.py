"""Queries over events, deliveries and attempts: ingest, claim with leases, complete, park, replay.

Claiming (reliability.md §3, §4): a delivery is due when it is ``pending`` and its next attempt
time has come, or ``sending`` with an expired lease (a crashed worker's claim). It may be claimed
only when no earlier delivery with the same ordering key (callId + user) is still undelivered
(``pending``, ``sending`` or ``parked``), so a later event never overtakes an earlier one. On
PostgreSQL the claim takes row locks with ``FOR UPDATE SKIP LOCKED`` so replicas never claim the
same row; on SQLite the whole transaction runs under ``BEGIN IMMEDIATE`` (one writer).

Every completion is conditional on the claim token (``lease_owner``): a worker whose lease
expired and whose delivery was claimed again cannot overwrite the newer outcome.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased
from sqlmodel import Session, col

from cti_bridge.store.models import (
    CallEvent,
    CrmContext,
    Delivery,
    DeliveryAttempt,
    UserCredentials,
    XelionContext,
)

UNDELIVERED = ("pending", "sending", "parked")
TERMINAL = ("delivered", "dead", "dismissed")
STATES = ("pending", "sending", "delivered", "dead", "parked", "dismissed")


def new_delivery_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class NewDelivery:
    """A delivery the pipeline decided to create for an event."""

    crm_context_id: int
    mapping_id: int
    credential_id: int
    xelion_username: str
    user_role: str
    state: str = "pending"
    last_error: str | None = None


def insert_event(
    session: Session,
    *,
    xelion_context_id: int,
    notification_type: str,
    call_id: str,
    dedupe_key: str,
    payload: dict[str, object],
    now: datetime,
) -> int | None:
    """Insert a call event; None if its dedupe key was seen before (the duplicate is counted)."""
    values = {
        "xelion_context_id": xelion_context_id,
        "notification_type": notification_type,
        "call_id": call_id,
        "dedupe_key": dedupe_key,
        "payload": json.dumps(payload, ensure_ascii=False, separators=(",", ":")),
        "duplicates": 0,
        "received_at": now,
    }
    table: Any = CallEvent.__table__  # type: ignore[attr-defined]
    dialect = session.get_bind().dialect.name
    ins: Any = (postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)).values(
        **values
    )
    ins = ins.on_conflict_do_nothing(index_elements=["dedupe_key"]).returning(table.c.id)
    event_id = session.execute(ins).scalar_one_or_none()
    if event_id is None:
        session.execute(
            update(table).where(table.c.dedupe_key == dedupe_key).values(duplicates=table.c.duplicates + 1)
        )
        return None
    session.execute(
        update(XelionContext).where(col(XelionContext.id) == xelion_context_id).values(last_event_at=now)
    )
    return int(event_id)


def insert_deliveries(
    session: Session,
    *,
    event_id: int,
    xelion_context_id: int,
    call_id: str,
    deliveries: Sequence[NewDelivery],
    now: datetime,
) -> list[str]:
    """Insert the deliveries of one event; returns their ids."""
    if not deliveries:
        return []
    rows = []
    for d in deliveries:
        rows.append(
            {
                "id": new_delivery_id(),
                "event_id": event_id,
                "xelion_context_id": xelion_context_id,
                "crm_context_id": d.crm_context_id,
                "mapping_id": d.mapping_id,
                "credential_id": d.credential_id,
                "xelion_username": d.xelion_username,
                "user_role": d.user_role,
                "call_id": call_id,
                "ordering_key": f"{call_id}|{d.credential_id}",
                "state": d.state,
                "attempts": 0,
                "next_attempt_at": now,
                "last_error": d.last_error,
                "created_at": now,
                "updated_at": now,
            }
        )
    session.execute(Delivery.__table__.insert(), rows)  # type: ignore[attr-defined]
    return [str(r["id"]) for r in rows]


@dataclass(frozen=True)
class Claimed:
    """A leased delivery with what the worker needs to send it."""

    id: str
    claim: str
    attempts: int
    event_id: int
    notification_type: str
    payload: dict[str, object]
    mapping_id: int
    credential_id: int | None
    xelion_username: str
    xelion_oid: str | None
    user_role: str
    authorization_header_prefix: str
    ordering_key: str


def _blocked() -> Any:
    """True for a delivery with an earlier undelivered one of the same ordering key (§3)."""
    earlier = aliased(Delivery)
    return exists().where(
        and_(
            col(earlier.ordering_key) == col(Delivery.ordering_key),
            col(earlier.state).in_(UNDELIVERED),
            or_(
                col(earlier.event_id) < col(Delivery.event_id),
                and_(
                    col(earlier.event_id) == col(Delivery.event_id),
                    col(earlier.mapping_id) < col(Delivery.mapping_id),
                ),
            ),
        )
    )


def claim_due(
    session: Session,
    *,
    now: datetime,
    limit: int,
    lease_seconds: float,
    skip_mappings: Sequence[int] = (),
) -> list[Claimed]:
    """Lease up to ``limit`` due deliveries, respecting per-ordering-key order.

    ``skip_mappings``: mappings the caller has no room for now (their CRM host is at the worker's
    fairness bound, reliability.md §9); their deliveries stay in the queue for others.
    """
    due = or_(
        and_(col(Delivery.state) == "pending", col(Delivery.next_attempt_at) <= now),
        and_(col(Delivery.state) == "sending", col(Delivery.lease_expires_at) < now),
    )
    query = (
        select(col(Delivery.id))
        .where(due, ~_blocked())
        .order_by(col(Delivery.next_attempt_at), col(Delivery.event_id), col(Delivery.mapping_id))
        .limit(limit)
    )
    if skip_mappings:
        query = query.where(col(Delivery.mapping_id).not_in(list(skip_mappings)))
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=Delivery)
    ids = [row[0] for row in session.execute(query)]
    if not ids:
        return []
    claim = uuid.uuid4().hex
    session.execute(
        update(Delivery)
        .where(col(Delivery.id).in_(ids))
        .values(
            state="sending",
            lease_owner=claim,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            updated_at=now,
        )
    )
    rows = session.execute(
        select(
            col(Delivery.id),
            col(Delivery.attempts),
            col(Delivery.event_id),
            col(CallEvent.notification_type),
            col(CallEvent.payload),
            col(Delivery.mapping_id),
            col(Delivery.credential_id),
            col(Delivery.xelion_username),
            col(UserCredentials.xelion_oid),
            col(Delivery.user_role),
            col(CrmContext.authorization_header_prefix),
            col(Delivery.ordering_key),
        )
        .join(CallEvent, col(CallEvent.id) == col(Delivery.event_id))
        .join(CrmContext, col(CrmContext.id) == col(Delivery.crm_context_id))
        .outerjoin(UserCredentials, col(UserCredentials.id) == col(Delivery.credential_id))
        .where(col(Delivery.id).in_(ids))
        .order_by(col(Delivery.event_id), col(Delivery.mapping_id))
    ).all()
    return [
        Claimed(
            id=r[0],
            claim=claim,
            attempts=r[1],
            event_id=r[2],
            notification_type=r[3],
            payload=json.loads(r[4]),
            mapping_id=r[5],
            credential_id=r[6],
            xelion_username=r[7],
            xelion_oid=r[8],
            user_role=r[9],
            authorization_header_prefix=r[10],
            ordering_key=r[11],
        )
        for r in rows
    ]


@dataclass(frozen=True)
class AttemptRecord:
    """What one try sent and got back; secrets already masked by the worker."""

    started_at: datetime
    duration_ms: int | None
    outcome: str
    http_status: int | None
    error: str | None
    request_method: str
    request_url: str
    request_excerpt: str | None
    response_excerpt: str | None


def complete(
    session: Session,
    *,
    delivery_id: str,
    claim: str,
    state: str,
    now: datetime,
    attempt: AttemptRecord | None,
    next_attempt_at: datetime | None = None,
    count_attempt: bool = True,
) -> bool:
    """Record an attempt and the delivery's new state, if the claim is still ours.

    Returns False (and changes nothing) when the lease was lost to another claim.
    """
    values: dict[str, object] = {
        "state": state,
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": now,
    }
    if count_attempt:
        values["attempts"] = col(Delivery.attempts) + 1
    if attempt is not None:
        values["last_status"] = attempt.http_status
        values["last_error"] = attempt.error
    if next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
    if state == "delivered":
        values["delivered_at"] = now
    result: Any = session.execute(
        update(Delivery)
        .where(
            col(Delivery.id) == delivery_id,
            col(Delivery.lease_owner) == claim,
            col(Delivery.state) == "sending",
        )
        .values(**values)
    )
    if result.rowcount != 1:
        return False
    if attempt is not None:
        # Numbered over the delivery's whole life: a replay restarts the retry schedule
        # (``attempts``) but not the attempt log.
        attempt_no = (
            session.execute(
                select(func.count())
                .select_from(DeliveryAttempt)
                .where(col(DeliveryAttempt.delivery_id) == delivery_id)
            ).scalar_one()
            + 1
        )
        session.add(
            DeliveryAttempt(
                delivery_id=delivery_id,
                attempt_no=int(attempt_no),
                started_at=attempt.started_at,
                duration_ms=attempt.duration_ms,
                outcome=attempt.outcome,
                http_status=attempt.http_status,
                error=attempt.error,
                request_method=attempt.request_method,
                request_url=attempt.request_url,
                request_excerpt=attempt.request_excerpt,
                response_excerpt=attempt.response_excerpt,
            )
        )
    return True


def release(session: Session, *, delivery_ids: Sequence[str], claim: str, now: datetime) -> int:
    """Return claimed deliveries to the queue untouched (graceful shutdown)."""
    result: Any = session.execute(
        update(Delivery)
        .where(col(Delivery.id).in_(delivery_ids), col(Delivery.lease_owner) == claim)
        .values(state="pending", lease_owner=None, lease_expires_at=None, updated_at=now)
    )
    return int(result.rowcount)


def release_all_leases(session: Session, *, now: datetime) -> int:
    """Return every leased delivery to the queue: for a sole owner starting up (embedded SQLite)."""
    result: Any = session.execute(
        update(Delivery)
        .where(col(Delivery.state) == "sending")
        .values(state="pending", lease_owner=None, lease_expires_at=None, updated_at=now)
    )
    return int(result.rowcount)


def park_credential(session: Session, *, credential_id: int, reason: str, now: datetime) -> int:
    """Park every undelivered delivery of a credential (reliability.md §13)."""
    result: Any = session.execute(
        update(Delivery)
        .where(col(Delivery.credential_id) == credential_id, col(Delivery.state).in_(("pending", "sending")))
        .values(state="parked", lease_owner=None, lease_expires_at=None, last_error=reason, updated_at=now)
    )
    return int(result.rowcount)


def unpark_credential(session: Session, *, credential_id: int, now: datetime) -> int:
    """Make a credential's parked deliveries due again (a new refresh token or device code was set)."""
    result: Any = session.execute(
        update(Delivery)
        .where(col(Delivery.credential_id) == credential_id, col(Delivery.state) == "parked")
        .values(state="pending", next_attempt_at=now, updated_at=now)
    )
    return int(result.rowcount)


def next_due_at(session: Session, *, skip_mappings: Sequence[int] = ()) -> datetime | None:
    """When the earliest claimable pending delivery or lease comes due (the worker sleeps until
    then). A delivery waiting behind an earlier one of its call (§3) is left out: it becomes
    claimable when that one finishes, not at its own time, which has passed (counting it made the
    worker poll the database 20 times a second for as long as the earlier one was retrying)."""
    pending_q = (
        select(col(Delivery.next_attempt_at))
        .where(col(Delivery.state) == "pending", ~_blocked())
        .order_by(col(Delivery.next_attempt_at))
        .limit(1)
    )
    lease_q = select(func.min(Delivery.lease_expires_at)).where(col(Delivery.state) == "sending")
    if skip_mappings:
        skip = col(Delivery.mapping_id).not_in(list(skip_mappings))
        pending_q = pending_q.where(skip)
        lease_q = lease_q.where(skip)
    pending = session.execute(pending_q).scalar_one_or_none()
    lease = session.execute(lease_q).scalar_one_or_none()
    candidates = [t for t in (pending, lease) if t is not None]
    return min(candidates) if candidates else None


# -- the deliveries API ----------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryFilter:
    state: str | None = None
    xelion_context_id: int | None = None
    username: str | None = None
    call_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def _filtered(query: Any, f: DeliveryFilter) -> Any:
    if f.state:
        query = query.where(col(Delivery.state) == f.state)
    if f.xelion_context_id is not None:
        query = query.where(col(Delivery.xelion_context_id) == f.xelion_context_id)
    if f.username:
        query = query.where(col(Delivery.xelion_username) == f.username)
    if f.call_id:
        query = query.where(col(Delivery.call_id) == f.call_id)
    if f.since:
        query = query.where(col(Delivery.created_at) >= f.since)
    if f.until:
        query = query.where(col(Delivery.created_at) < f.until)
    return query


def list_deliveries(
    session: Session, f: DeliveryFilter, *, limit: int, offset: int
) -> tuple[int, list[Delivery]]:
    total = session.execute(_filtered(select(func.count()).select_from(Delivery), f)).scalar_one()
    rows = (
        session.execute(
            _filtered(select(Delivery), f)
            .order_by(col(Delivery.created_at).desc(), col(Delivery.id))
            .limit(limit)
            .offset(offset)
        )
        .scalars()
        .all()
    )
    return int(total), list(rows)


def get_delivery(
    session: Session, delivery_id: str
) -> tuple[Delivery, CallEvent, list[DeliveryAttempt]] | None:
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        return None
    event = session.get(CallEvent, delivery.event_id)
    assert event is not None
    attempts = (
        session.execute(
            select(DeliveryAttempt)
            .where(col(DeliveryAttempt.delivery_id) == delivery_id)
            .order_by(col(DeliveryAttempt.attempt_no), col(DeliveryAttempt.id))
        )
        .scalars()
        .all()
    )
    return delivery, event, list(attempts)


REPLAYABLE = ("dead", "dismissed", "delivered")
DISMISSABLE = ("pending", "parked", "dead")


def replay(session: Session, delivery_id: str, now: datetime) -> bool:
    """Queue a finished delivery again; it keeps its id, so the CRM sees the same Idempotency-Key."""
    result: Any = session.execute(
        update(Delivery)
        .where(col(Delivery.id) == delivery_id, col(Delivery.state).in_(REPLAYABLE))
        .values(state="pending", next_attempt_at=now, attempts=0, updated_at=now, last_error=None)
    )
    return int(result.rowcount) == 1


def replay_many(session: Session, f: DeliveryFilter, now: datetime) -> int:
    state = f.state or "dead"
    if state not in REPLAYABLE:
        raise ValueError(f"only deliveries in state {', '.join(REPLAYABLE)} can be replayed")
    scoped = DeliveryFilter(**{**f.__dict__, "state": state})
    ids = [row[0] for row in session.execute(_filtered(select(col(Delivery.id)), scoped))]
    if not ids:
        return 0
    total = 0
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        result: Any = session.execute(
            update(Delivery)
            .where(col(Delivery.id).in_(chunk), col(Delivery.state) == state)
            .values(state="pending", next_attempt_at=now, attempts=0, updated_at=now, last_error=None)
        )
        total += int(result.rowcount)
    return total


def dismiss(session: Session, delivery_id: str, now: datetime) -> bool:
    result: Any = session.execute(
        update(Delivery)
        .where(col(Delivery.id) == delivery_id, col(Delivery.state).in_(DISMISSABLE))
        .values(state="dismissed", updated_at=now)
    )
    return int(result.rowcount) == 1
