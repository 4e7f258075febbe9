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

import functools
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, exists, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
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
    xelion_oid: str | None = None  # for a delivery handed to the worker without a claim query


def ordering_key(call_id: str, credential_id: int) -> str:
    """The key that orders deliveries (reliability.md §3): one call, one user."""
    return f"{call_id}|{credential_id}"


def delivery_row(
    d: NewDelivery,
    *,
    delivery_id: str,
    event_id: int,
    xelion_context_id: int,
    call_id: str,
    state: str,
    now: datetime,
    lease_owner: str | None = None,
    lease_until: datetime | None = None,
) -> dict[str, object]:
    """The ``delivery`` row of a new delivery, for ``insert_delivery_rows``."""
    return {
        "id": delivery_id,
        "event_id": event_id,
        "xelion_context_id": xelion_context_id,
        "crm_context_id": d.crm_context_id,
        "mapping_id": d.mapping_id,
        "credential_id": d.credential_id,
        "xelion_username": d.xelion_username,
        "user_role": d.user_role,
        "call_id": call_id,
        "ordering_key": ordering_key(call_id, d.credential_id),
        "state": state,
        "attempts": 0,
        "next_attempt_at": now,
        "lease_owner": lease_owner,
        "lease_expires_at": lease_until if lease_owner else None,
        "last_error": d.last_error,
        "created_at": now,
        "updated_at": now,
    }


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
    """One event through the batch statements; None if its dedupe key was seen before (counted)."""
    event = NewEvent(
        xelion_context_id,
        notification_type,
        call_id,
        dedupe_key,
        json.dumps(payload, ensure_ascii=False, separators=(",", ":")),
    )
    ids = insert_events(session, [event], now=now)
    if dedupe_key not in ids:
        count_duplicates(session, {dedupe_key: 1})
        return None
    touch_contexts(session, [xelion_context_id], now=now)
    return ids[dedupe_key]


def insert_deliveries(
    session: Session,
    *,
    event_id: int,
    xelion_context_id: int,
    call_id: str,
    deliveries: Sequence[NewDelivery],
    now: datetime,
) -> list[str]:
    """Insert the deliveries of one event, unleased; returns their ids."""
    rows = [
        delivery_row(
            d,
            delivery_id=new_delivery_id(),
            event_id=event_id,
            xelion_context_id=xelion_context_id,
            call_id=call_id,
            state=d.state,
            now=now,
        )
        for d in deliveries
    ]
    insert_delivery_rows(session, rows)
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
    d = _table(Delivery)
    earlier = d.alias("earlier")
    return exists().where(
        earlier.c.ordering_key == d.c.ordering_key,
        earlier.c.state.in_(UNDELIVERED),
        # The first term lets the database seek ``ix_delivery_order`` (ordering_key, event_id).
        earlier.c.event_id <= d.c.event_id,
        or_(earlier.c.event_id < d.c.event_id, earlier.c.mapping_id < d.c.mapping_id),
    )


@dataclass(frozen=True)
class _ClaimStatements:
    """The claim's statements, built once per dialect: rebuilding them per claim (and hashing them
    for SQLAlchemy's statement cache) cost more than running them."""

    expired: Any  # leases that ran out (a crashed or stopped worker's claims)
    expired_skip: Any
    pending: Any  # pending deliveries whose time has come
    pending_skip: Any
    lease: Any
    rows: Any


@functools.cache
def _claim_statements(dialect: str) -> _ClaimStatements:
    d = _table(Delivery)
    # Claim order; ``ix_delivery_due`` (state, next_attempt_at, event_id, mapping_id) follows it, so
    # the database walks the index and stops at the LIMIT instead of sorting the whole backlog.
    order = (d.c.next_attempt_at, d.c.event_id, d.c.mapping_id)
    skip = d.c.mapping_id.not_in(bindparam("skip", expanding=True))

    def due(*where: Any) -> Any:
        query = select(d.c.id).where(*where, ~_blocked()).order_by(*order).limit(bindparam("limit"))
        if dialect == "postgresql":
            query = query.with_for_update(skip_locked=True, of=d)
        return query

    expired = (
        d.c.state == "sending",
        d.c.lease_expires_at < bindparam("now", type_=d.c.lease_expires_at.type),
    )
    pending = (
        d.c.state == "pending",
        d.c.next_attempt_at <= bindparam("now", type_=d.c.next_attempt_at.type),
    )
    lease = (
        update(d)
        .where(d.c.id.in_(bindparam("ids", expanding=True)))
        .values(
            state="sending",
            lease_owner=bindparam("claim"),
            lease_expires_at=bindparam("until", type_=d.c.lease_expires_at.type),
            updated_at=bindparam("at", type_=d.c.updated_at.type),
        )
    )
    events, crms, creds = _table(CallEvent), _table(CrmContext), _table(UserCredentials)
    rows = (
        select(
            d.c.id,
            d.c.attempts,
            d.c.event_id,
            events.c.notification_type,
            events.c.payload,
            d.c.mapping_id,
            d.c.credential_id,
            d.c.xelion_username,
            creds.c.xelion_oid,
            d.c.user_role,
            crms.c.authorization_header_prefix,
            d.c.ordering_key,
        )
        .join(events, events.c.id == d.c.event_id)
        .join(crms, crms.c.id == d.c.crm_context_id)
        .outerjoin(creds, creds.c.id == d.c.credential_id)
        .where(d.c.id.in_(bindparam("ids", expanding=True)))
        .order_by(d.c.event_id, d.c.mapping_id)
    )
    return _ClaimStatements(
        expired=due(*expired),
        expired_skip=due(*expired, skip),
        pending=due(*pending),
        pending_skip=due(*pending, skip),
        lease=lease,
        rows=rows,
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

    Expired leases first (the oldest work), then pending deliveries in due order; each query walks
    ``ix_delivery_due`` and stops at its LIMIT, so a claim costs about the same with a backlog of
    ten or of ten thousand.

    ``skip_mappings``: mappings the caller has no room for now (their CRM host is at the worker's
    fairness bound, reliability.md §9); their deliveries stay in the queue for others.
    """
    if limit <= 0:
        return []
    conn = session.connection()
    st = _claim_statements(conn.dialect.name)
    params: dict[str, object] = {"now": now, "limit": limit}
    if skip_mappings:
        params["skip"] = list(skip_mappings)
    ids = [row[0] for row in conn.execute(st.expired_skip if skip_mappings else st.expired, params)]
    if len(ids) < limit:
        params["limit"] = limit - len(ids)
        ids += [row[0] for row in conn.execute(st.pending_skip if skip_mappings else st.pending, params)]
    if not ids:
        return []
    claim = uuid.uuid4().hex
    conn.execute(
        st.lease,
        {"ids": ids, "claim": claim, "until": now + timedelta(seconds=lease_seconds), "at": now},
    )
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
        for r in conn.execute(st.rows, {"ids": ids})
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
    attempt: AttemptRecord,
    next_attempt_at: datetime | None = None,
    count_attempt: bool = True,
) -> bool:
    """Record an attempt and the delivery's new state, if the claim is still ours.

    Returns False (and changes nothing) when the lease was lost to another claim. One completion
    through ``complete_many``, the worker's own path, so both are the same mechanism.
    """
    completion = Completion(
        delivery_id=delivery_id,
        claim=claim,
        state=state,
        attempt=attempt,
        next_attempt_at=next_attempt_at,
        count_attempt=count_attempt,
    )
    return complete_many(session, [completion], now=now)[0]


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


@functools.cache
def _next_due_statements(dialect: str) -> tuple[Any, Any, Any, Any]:
    d = _table(Delivery)
    skip = d.c.mapping_id.not_in(bindparam("skip", expanding=True))
    pending = (
        select(d.c.next_attempt_at)
        .where(d.c.state == "pending", ~_blocked())
        .order_by(d.c.next_attempt_at, d.c.event_id, d.c.mapping_id)
        .limit(1)
    )
    lease = select(func.min(d.c.lease_expires_at)).where(d.c.state == "sending")
    return pending, pending.where(skip), lease, lease.where(skip)


def next_due_at(session: Session, *, skip_mappings: Sequence[int] = ()) -> datetime | None:
    """When the earliest claimable pending delivery or lease comes due (the worker sleeps until
    then). A delivery waiting behind an earlier one of its call (§3) is left out: it becomes
    claimable when that one finishes, not at its own time, which has passed (counting it made the
    worker poll the database 20 times a second for as long as the earlier one was retrying)."""
    conn = session.connection()
    pending_q, pending_skip, lease_q, lease_skip = _next_due_statements(conn.dialect.name)
    if skip_mappings:
        params = {"skip": list(skip_mappings)}
        pending = conn.execute(pending_skip, params).scalar_one_or_none()
        lease = conn.execute(lease_skip, params).scalar_one_or_none()
    else:
        pending = conn.execute(pending_q).scalar_one_or_none()
        lease = conn.execute(lease_q).scalar_one_or_none()
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


# -- set-based ingest and completion (group commit) --------------------------------------------


@dataclass(frozen=True)
class NewEvent:
    """An event of an ingest batch, already deduplicated within the batch."""

    xelion_context_id: int
    notification_type: str
    call_id: str
    dedupe_key: str
    payload: str  # the notification object, JSON text


def _table(model: Any) -> Any:
    return model.__table__


def insert_events(session: Session, events: Sequence[NewEvent], *, now: datetime) -> dict[str, int]:
    """Insert a batch of events in one statement; returns the new ids by dedupe key.

    An event whose dedupe key is already stored is skipped (``ON CONFLICT DO NOTHING``) and absent
    from the result; the caller counts it with ``count_duplicates``. The keys within ``events`` must
    be distinct. Ids follow the order of ``events`` (one multi-row INSERT), which is arrival order.
    """
    if not events:
        return {}
    table = _table(CallEvent)
    dialect = session.get_bind().dialect.name
    ins: Any = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    ins = ins.on_conflict_do_nothing(index_elements=["dedupe_key"]).returning(table.c.id, table.c.dedupe_key)
    rows = [
        {
            "xelion_context_id": e.xelion_context_id,
            "notification_type": e.notification_type,
            "call_id": e.call_id,
            "dedupe_key": e.dedupe_key,
            "payload": e.payload,
            "duplicates": 0,
            "received_at": now,
        }
        for e in events
    ]
    result = session.connection().execute(ins, rows)
    return {str(key): int(event_id) for event_id, key in result}


def count_duplicates(session: Session, counts: dict[str, int]) -> None:
    """Add ``counts[dedupe_key]`` to each stored event's ``duplicates`` (one executemany)."""
    if not counts:
        return
    table = _table(CallEvent)
    stmt = (
        update(table)
        .where(table.c.dedupe_key == bindparam("b_key"))
        .values(duplicates=table.c.duplicates + bindparam("b_n"))
    )
    session.connection().execute(stmt, [{"b_key": k, "b_n": n} for k, n in sorted(counts.items())])


def touch_contexts(session: Session, xelion_context_ids: Sequence[int], *, now: datetime) -> None:
    """Set ``last_event_at`` of the integrations that received new events."""
    if xelion_context_ids:
        session.execute(
            update(XelionContext)
            .where(col(XelionContext.id).in_(sorted(set(xelion_context_ids))))
            .values(last_event_at=now)
        )


def inactive_credentials(session: Session, credential_ids: Sequence[int]) -> dict[int, str | None]:
    """The credentials among ``credential_ids`` that are not ``active``, with their state reason."""
    if not credential_ids:
        return {}
    return {
        int(cred_id): reason
        for cred_id, reason in session.execute(
            select(col(UserCredentials.id), col(UserCredentials.state_reason)).where(
                col(UserCredentials.id).in_(sorted(set(credential_ids))),
                col(UserCredentials.state) != "active",
            )
        )
    }


def lock_calls(session: Session, call_ids: Sequence[str]) -> None:
    """On PostgreSQL, serialise the ingest of events of the same calls across replicas.

    A transaction-level advisory lock per callId (taken in a fixed order, so two batches cannot
    deadlock), BEFORE the batch draws its event ids: a replica that ingests a later event of a call
    then draws a later id and sees the earlier event's deliveries, whether or not either replica
    hands its deliveries off (reliability.md §3). SQLite needs nothing: its one writer already
    serialises every transaction (BEGIN IMMEDIATE).
    """
    ids = sorted({c for c in call_ids if c})
    if not ids or session.get_bind().dialect.name != "postgresql":
        return
    session.execute(
        text(
            "SELECT count(pg_advisory_xact_lock(h)) FROM (SELECT DISTINCT hashtext('call|' || c) AS h "
            "FROM unnest(CAST(:ids AS text[])) AS c ORDER BY h) AS s"
        ),
        {"ids": ids},
    )


def undelivered_keys(session: Session, ordering_keys: Sequence[str]) -> set[str]:
    """The ordering keys among ``ordering_keys`` that have an undelivered delivery (§3).

    One query on ``ix_delivery_order``. On PostgreSQL it first takes a transaction-level advisory
    lock per key (in a fixed order), so that two replicas ingesting events of the same call
    serialise here: the second sees the first's committed delivery and does not hand its own off
    past it.
    """
    keys = sorted(set(ordering_keys))
    if not keys:
        return set()
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text(
                "SELECT count(pg_advisory_xact_lock(h)) FROM "
                "(SELECT DISTINCT hashtext(k) AS h FROM unnest(CAST(:keys AS text[])) AS k ORDER BY h) AS s"
            ),
            {"keys": keys},
        )
    found = session.execute(
        select(col(Delivery.ordering_key))
        .where(col(Delivery.ordering_key).in_(keys), col(Delivery.state).in_(UNDELIVERED))
        .distinct()
    )
    return {str(row[0]) for row in found}


def insert_delivery_rows(session: Session, rows: Sequence[dict[str, object]]) -> None:
    """Insert prepared delivery rows (every column of ``delivery`` but ``delivered_at``, ``last_status``)."""
    if rows:
        session.connection().execute(_table(Delivery).insert(), list(rows))


def pending_keys(session: Session, ordering_keys: Sequence[str]) -> set[str]:
    """The ordering keys among ``ordering_keys`` that have a ``pending`` delivery (one query on
    ``ix_delivery_order``): after a completion, whether the call has a successor to claim."""
    keys = sorted(set(ordering_keys))
    if not keys:
        return set()
    found = session.execute(
        select(col(Delivery.ordering_key))
        .where(col(Delivery.ordering_key).in_(keys), col(Delivery.state) == "pending")
        .distinct()
    )
    return {str(row[0]) for row in found}


@dataclass(frozen=True)
class Completion:
    """The outcome of one attempt, to be recorded by ``complete_many``."""

    delivery_id: str
    claim: str
    state: str
    attempt: AttemptRecord
    next_attempt_at: datetime | None = None
    count_attempt: bool = True
    # A parked outcome parks every undelivered delivery of the credential (§13).
    credential_id: int | None = None
    park_reason: str = ""


def complete_many(session: Session, completions: Sequence[Completion], *, now: datetime) -> list[bool]:
    """``complete`` for many deliveries in one transaction, with a few set-based statements.

    Returns, per completion, whether it applied. As in ``complete``, a completion applies only if
    the delivery is still ``sending`` under the same claim token: the rows are read first (locked
    ``FOR UPDATE`` on PostgreSQL, under the write lock on SQLite, so they cannot change before the
    update), the conditional UPDATE runs for the ones that match, attempt numbers come from one
    grouped COUNT and the attempt records from one executemany INSERT.
    """
    if not completions:
        return []
    table = _table(Delivery)
    ids = sorted({c.delivery_id for c in completions})
    query = select(table.c.id, table.c.lease_owner).where(table.c.id.in_(ids), table.c.state == "sending")
    if session.get_bind().dialect.name == "postgresql":
        query = query.order_by(table.c.id).with_for_update()
    owners = {str(i): owner for i, owner in session.execute(query)}
    applied: list[bool] = []
    for c in completions:
        ok = owners.get(c.delivery_id) == c.claim
        if ok:
            owners.pop(c.delivery_id)  # the same claim cannot complete twice
        applied.append(ok)
    done = [c for c, ok in zip(completions, applied, strict=True) if ok]
    if not done:
        return applied
    stmt = (
        update(table)
        .where(
            table.c.id == bindparam("b_id"),
            table.c.lease_owner == bindparam("b_claim"),
            table.c.state == "sending",
        )
        .values(
            state=bindparam("b_state"),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=bindparam("b_now", type_=table.c.updated_at.type),
            attempts=table.c.attempts + bindparam("b_inc"),
            last_status=bindparam("b_status", type_=table.c.last_status.type),
            last_error=bindparam("b_error", type_=table.c.last_error.type),
            next_attempt_at=func.coalesce(
                bindparam("b_next", type_=table.c.next_attempt_at.type), table.c.next_attempt_at
            ),
            delivered_at=func.coalesce(
                bindparam("b_delivered", type_=table.c.delivered_at.type), table.c.delivered_at
            ),
        )
    )
    conn = session.connection()
    conn.execute(
        stmt,
        [
            {
                "b_id": c.delivery_id,
                "b_claim": c.claim,
                "b_state": c.state,
                "b_now": now,
                "b_inc": 1 if c.count_attempt else 0,
                "b_status": c.attempt.http_status,
                "b_error": c.attempt.error,
                "b_next": c.next_attempt_at,
                "b_delivered": now if c.state == "delivered" else None,
            }
            for c in done
        ],
    )
    # Numbered over the delivery's whole life: a replay restarts the retry schedule
    # (``attempts``) but not the attempt log.
    attempts = _table(DeliveryAttempt)
    numbers = {
        str(d): int(n)
        for d, n in session.execute(
            select(attempts.c.delivery_id, func.count())
            .where(attempts.c.delivery_id.in_([c.delivery_id for c in done]))
            .group_by(attempts.c.delivery_id)
        )
    }
    rows = []
    for c in done:
        numbers[c.delivery_id] = numbers.get(c.delivery_id, 0) + 1
        a = c.attempt
        rows.append(
            {
                "delivery_id": c.delivery_id,
                "attempt_no": numbers[c.delivery_id],
                "started_at": a.started_at,
                "duration_ms": a.duration_ms,
                "outcome": a.outcome,
                "http_status": a.http_status,
                "error": a.error,
                "request_method": a.request_method,
                "request_url": a.request_url,
                "request_excerpt": a.request_excerpt,
                "response_excerpt": a.response_excerpt,
            }
        )
    conn.execute(attempts.insert(), rows)
    for c in done:
        if c.state == "parked" and c.credential_id is not None:
            park_credential(session, credential_id=c.credential_id, reason=c.park_reason, now=now)
    return applied
