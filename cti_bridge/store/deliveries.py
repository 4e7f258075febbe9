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
import operator
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import uuid6
from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, col

from cti_bridge import jsontext
from cti_bridge.store.models import (
    UNDELIVERED,
    UNDELIVERED_SQL,
    WAITING_SQL,
    CallEvent,
    Delivery,
    DeliveryAttempt,
)

TERMINAL = ("delivered", "dead", "dismissed")
STATES = ("pending", "sending", "delivered", "dead", "parked", "dismissed")
T = TypeVar("T")


def new_delivery_id() -> str:
    """A new delivery id: a UUID of version 7 (RFC 9562), whose leading bits are the time.

    Ids made one after another sort one after another, so the primary-key index of ``delivery``
    and the ``delivery_id`` index of ``delivery_attempt`` grow at their right-hand edge: a batch of
    inserts changes one or two index pages instead of one random page per row. With random (v4)
    ids those two indexes were a quarter of every page the database writes per event (8.0 -> 6.3
    WAL pages per event, measured on an ingest + completion loop), and the share grows with the
    table. The id stays an opaque UUID to everyone else (API, ``Idempotency-Key``)."""
    return str(uuid6.uuid7())


# Built per event or per delivery on the hot path, and never changed after: not frozen, since a
# frozen dataclass's __init__ costs five times as much (1.1 against 0.2 us for nine fields).
@dataclass(slots=True, eq=False)  # compared and hashed by identity (pipeline.py)
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


def payload_text(fields: dict[str, object]) -> str:
    """The JSON text of an event's payload, as ``call_event.payload`` holds it: compact, UTF-8 as it
    is, exactly ``json.dumps(fields, separators=(",", ":"), ensure_ascii=False)`` (jsontext.py)."""
    return jsontext.compact(fields)


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
        "last_error": None if d.last_error is None else storable(d.last_error, MAX_ERROR),
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
        payload_text(payload),
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


# Slotted, not frozen: see NewDelivery.
@dataclass(slots=True)
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


#: The per-call order rule (§3) as SQL: true for a ``delivery`` row that no earlier undelivered
#: delivery of its ordering key precedes. One text for the claim and for ``next_due_at``. The first
#: ``event_id`` term lets the database seek ``ix_delivery_order`` (ordering_key, event_id); the
#: states are constants (``UNDELIVERED``), never a value from outside.
_FIRST_IN_LINE = (
    "NOT EXISTS (SELECT 1 FROM delivery AS earlier WHERE earlier.ordering_key = delivery.ordering_key "  # noqa: S608
    f"AND earlier.{UNDELIVERED_SQL} "
    "AND earlier.event_id <= delivery.event_id "
    "AND (earlier.event_id < delivery.event_id OR earlier.mapping_id < delivery.mapping_id))"
)

#: What a claim takes, in this order: leases that ran out (a crashed or stopped worker's claims),
#: then pending deliveries whose time has come. (state, the condition on the claim's ``now``.)
_CLAIMABLE = (
    ("sending", "delivery.lease_expires_at < ?"),
    ("pending", "delivery.next_attempt_at <= ?"),
)


@functools.cache
def _due_sql(drv: _DriverSql, due: str, skip: int) -> str:
    """The SELECT of claimable ids (state ``?``, ``due``, and for ``skip`` mappings ``NOT IN``) in
    claim order, stopping at its LIMIT; ``ix_delivery_due`` (state, next_attempt_at, event_id,
    mapping_id) follows that order, so the database walks the index instead of sorting the
    backlog. On PostgreSQL the rows are locked, skipping those another replica holds. Built once
    per dialect and number of skipped mappings (a power of two: ``claim_due`` pads the list)."""
    not_in = f" AND delivery.mapping_id NOT IN ({drv.marks(skip)})" if skip else ""
    lock = " FOR UPDATE OF delivery SKIP LOCKED" if drv.postgresql else ""
    return drv.sql(
        f"SELECT delivery.id FROM delivery WHERE delivery.state = ? AND {due}{not_in} "  # noqa: S608
        f"AND {_FIRST_IN_LINE} "
        f"ORDER BY delivery.next_attempt_at, delivery.event_id, delivery.mapping_id LIMIT ?{lock}"
    )


def claim_due(
    session: Session,
    *,
    now: datetime,
    limit: int,
    lease_seconds: float,
    skip_mappings: Sequence[int] = (),
    skip_ids: Collection[str] = (),
) -> list[Claimed]:
    """Lease up to ``limit`` due deliveries, respecting per-ordering-key order.

    Expired leases first (the oldest work), then pending deliveries in due order; each query walks
    ``ix_delivery_due`` and stops at its LIMIT, so a claim costs about the same with a backlog of
    ten or of ten thousand. A delivery is claimable only if no earlier undelivered delivery of its
    ordering key exists (§3). Driver SQL like the other per-event statements (``_driver``).

    ``skip_mappings``: mappings the caller has no room for now (their CRM host is at the worker's
    fairness bound, reliability.md §9); their deliveries stay in the queue for others.

    ``skip_ids``: deliveries the caller is still running under its own lease. Their lease in the
    database ends by the wall clock, the caller's by its monotonic clock; when the wall clock steps
    forward (a VM resumed, an NTP step) the stored lease has ended while the request is still under
    way, and claiming it again made this very process send it a second time. Left out of the
    expired leases here (filtered after the SELECT, which asks for as many more), they come back to
    the queue the usual way once their task ends.
    """
    if limit <= 0:
        return []
    conn, drv = _driver(session)
    at = drv.dt(now)
    # Padded (``NOT IN (a, b, b)`` is ``NOT IN (a, b)``): a statement text per list length, cached
    # for the process's life, grew to thousands of texts (tens of MB) with a slow CRM and many
    # mappings, each prepared anew.
    skip = _padded(sorted(set(skip_mappings)))
    running = set(skip_ids)
    ids: list[str] = []
    for state, due in _CLAIMABLE:
        want = limit - len(ids)
        more = len(running) if state == "sending" else 0  # only a lease can be one of ours
        rows = conn.rows(_due_sql(drv, due, len(skip)), (state, at, *skip, want + more))
        ids += [i for i in (str(row[0]) for row in rows) if i not in running][:want]
        if len(ids) >= limit:
            break
    if not ids:
        return []
    claim = uuid.uuid4().hex
    until = drv.dt(now + timedelta(seconds=lease_seconds))
    for chunk in _in_lists(ids):
        conn.execute(
            _in_statement(
                drv,
                "UPDATE delivery SET state = 'sending', lease_owner = ?, lease_expires_at = ?, "
                "updated_at = ? WHERE id IN ({in_list})",
                len(chunk),
            ),
            (claim, until, at, *chunk),
        )
    rows = drv.rows_in(
        conn,
        "SELECT delivery.id, delivery.attempts, delivery.event_id, call_event.notification_type, "
        "call_event.payload, delivery.mapping_id, delivery.credential_id, delivery.xelion_username, "
        "user_credentials.xelion_oid, delivery.user_role, crm_context.authorization_header_prefix, "
        "delivery.ordering_key FROM delivery "
        "JOIN call_event ON call_event.id = delivery.event_id "
        "JOIN crm_context ON crm_context.id = delivery.crm_context_id "
        "LEFT OUTER JOIN user_credentials ON user_credentials.id = delivery.credential_id "
        "WHERE delivery.id IN ({in_list})",
        ids,
    )
    rows.sort(key=lambda r: (r[2], r[5]))  # claim order within the batch: event, then mapping
    return [
        Claimed(
            id=r[0],
            claim=claim,
            attempts=r[1],
            event_id=r[2],
            notification_type=r[3],
            payload=jsontext.loads(r[4]),
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


#: The length of ``delivery.last_error`` and ``delivery_attempt.error`` (VARCHAR(2000)).
MAX_ERROR = 2000
#: The length of ``delivery_attempt.request_method`` (VARCHAR(8)).
MAX_METHOD = 8


def storable(value: str, limit: int | None = None) -> str:
    """``value`` as both databases keep it. PostgreSQL refuses a NUL character in text and enforces
    a VARCHAR's length, failing the whole transaction; SQLite does neither. A CRM's answer may hold
    NUL bytes (a binary or UTF-16 body), and an error may quote anything: NUL becomes U+FFFD, as an
    undecodable byte of an excerpt does, and a text longer than ``limit`` is cut there."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    return value if limit is None or len(value) <= limit else value[:limit]


def _storable_attempt(a: AttemptRecord) -> AttemptRecord:
    """``a`` with every text ``storable``: ``a`` itself when it is already (nearly always)."""
    if (
        (a.error is not None and (len(a.error) > MAX_ERROR or "\x00" in a.error))
        or len(a.request_method) > MAX_METHOD
        or "\x00" in a.request_method
        or "\x00" in a.request_url
        or (a.request_excerpt is not None and "\x00" in a.request_excerpt)
        or (a.response_excerpt is not None and "\x00" in a.response_excerpt)
    ):
        return replace(
            a,
            error=None if a.error is None else storable(a.error, MAX_ERROR),
            request_method=storable(a.request_method, MAX_METHOD),
            request_url=storable(a.request_url),
            request_excerpt=None if a.request_excerpt is None else storable(a.request_excerpt),
            response_excerpt=None if a.response_excerpt is None else storable(a.response_excerpt),
        )
    return a


# Slotted, not frozen: see NewDelivery.
@dataclass(slots=True)
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
    return complete_many(session, [completion], now=now)[0] is not None


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
    """Park the credential's deliveries waiting to be sent (reliability.md §13). Through
    ``ix_delivery_credential_waiting``, whose condition the query repeats.

    Not those in flight (``sending``): their requests are out already, and parking them took their
    lease, so a delivered one's outcome was thrown away (the claim no longer held) and the delivery
    sent again once resumed. Each one's own outcome decides: delivered, or parked by its own attempt
    (the credential is marked, so the token manager refuses it a token)."""
    result: Any = session.execute(
        update(Delivery)
        .where(
            col(Delivery.credential_id) == credential_id,
            text(WAITING_SQL),
            col(Delivery.state) == "pending",
        )
        .values(
            state="parked",
            lease_owner=None,
            lease_expires_at=None,
            last_error=storable(reason, MAX_ERROR),
            updated_at=now,
        )
    )
    return int(result.rowcount)


def _parked_of(credential_id: int) -> Any:
    """An UPDATE of a credential's parked deliveries, through ``ix_delivery_credential_waiting``
    like ``park_credential`` (its condition repeated word for word, as SQLite needs)."""
    return update(Delivery).where(
        col(Delivery.credential_id) == credential_id,
        text(WAITING_SQL),
        col(Delivery.state) == "parked",
    )


def unpark_credential(session: Session, *, credential_id: int, now: datetime) -> int:
    """Make a credential's parked deliveries due again (the operator repaired the credential)."""
    result: Any = session.execute(
        _parked_of(credential_id).values(state="pending", next_attempt_at=now, updated_at=now)
    )
    return int(result.rowcount)


def bury_parked(session: Session, *, credential_id: int, reason: str, now: datetime) -> int:
    """End a credential's parked deliveries as ``dead`` with ``reason`` (its user is being deleted:
    nothing could resume them, and ``ON DELETE SET NULL`` would leave them parked behind no user,
    for ever, as retention keeps unfinished work)."""
    result: Any = session.execute(
        _parked_of(credential_id).values(state="dead", last_error=storable(reason, MAX_ERROR), updated_at=now)
    )
    return int(result.rowcount)


@functools.cache
def _next_due_statements(dialect: str) -> tuple[Any, Any, Any, Any]:
    d = _table(Delivery)
    skip = d.c.mapping_id.not_in(bindparam("skip", expanding=True))
    pending = (
        select(d.c.next_attempt_at)
        .where(d.c.state == "pending", text(_FIRST_IN_LINE))
        .order_by(d.c.next_attempt_at, d.c.event_id, d.c.mapping_id)
        .limit(1)
    )
    # The earliest leases with their ids (as many as the caller runs, and one): the caller's own
    # are left out after the query, as ``claim_due`` leaves them out.
    lease = (
        select(d.c.id, d.c.lease_expires_at)
        .where(d.c.state == "sending", d.c.lease_expires_at.is_not(None))
        .order_by(d.c.lease_expires_at)
        .limit(bindparam("n"))
    )
    return pending, pending.where(skip), lease, lease.where(skip)


def next_due_at(
    session: Session, *, skip_mappings: Sequence[int] = (), skip_ids: Collection[str] = ()
) -> datetime | None:
    """When the earliest claimable pending delivery or lease comes due (the worker sleeps until
    then). A delivery waiting behind an earlier one of its call (§3) is left out: it becomes
    claimable when that one finishes, not at its own time, which has passed (counting it made the
    worker poll the database 20 times a second for as long as the earlier one was retrying).
    ``skip_ids``: the caller's running deliveries, whose leases ``claim_due`` leaves out too: after
    a wall-clock step forward their stored leases lie in the past, and counting them made the
    worker claim and ask again 15 times a second for as long as those requests ran."""
    conn = session.connection()
    pending_q, pending_skip, lease_q, lease_skip = _next_due_statements(conn.dialect.name)
    running = set(skip_ids)
    params: dict[str, object] = {"n": len(running) + 1}
    if skip_mappings:
        params["skip"] = list(skip_mappings)
        pending = conn.execute(pending_skip, params).scalar_one_or_none()
        leases = conn.execute(lease_skip, params).all()
    else:
        pending = conn.execute(pending_q).scalar_one_or_none()
        leases = conn.execute(lease_q, params).all()
    lease = next((at for lease_id, at in leases if lease_id not in running), None)
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
    session: Session, f: DeliveryFilter, *, limit: int, offset: int, after: tuple[datetime, str] | None = None
) -> tuple[int, list[Delivery], bool]:
    """The total matching ``f``, one page of them newest first, and whether more follow it.

    ``after``: (created_at, id) of the last item of the previous page (a keyset cursor): the page
    starts right behind it, wherever new deliveries arrived meanwhile. ``offset`` counts from there.
    """
    total = session.execute(_filtered(select(func.count()).select_from(Delivery), f)).scalar_one()
    query = _filtered(select(Delivery), f)
    if after is not None:
        # The order is created_at descending, then id ascending: "behind" is older, or as old
        # with a greater id.
        at, delivery_id = after
        created = col(Delivery.created_at)
        query = query.where((created < at) | ((created == at) & (col(Delivery.id) > delivery_id)))
    rows = list(
        session.execute(
            query.order_by(col(Delivery.created_at).desc(), col(Delivery.id)).limit(limit + 1).offset(offset)
        )
        .scalars()
        .all()
    )
    return int(total), rows[:limit], len(rows) > limit


def get_delivery(
    session: Session, delivery_id: str
) -> tuple[Delivery, CallEvent, list[DeliveryAttempt]] | None:
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        return None
    event = session.get(CallEvent, delivery.event_id)
    if event is None:
        return None  # deleted by retention between the two reads (PostgreSQL, READ COMMITTED)
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


def _driver(session: Session) -> tuple[_Raw, _DriverSql]:
    """The transaction's driver connection (``_Raw``) and the dialect's helper (``_DriverSql``).

    The per-event statements (ingest, completion) run as SQL text on the driver, with parameters
    already in the driver's form: SQLAlchemy's statement building, caching, per-value type
    processing and execution context cost more than the database's own work for these small, fixed
    statements (profile in bench/profile_report.py; an executed statement costs ~19 us through
    ``exec_driver_sql`` against ~3 us on the cursor). Everything else goes through SQLAlchemy.
    """
    conn = session.connection()  # begins the session's transaction (BEGIN IMMEDIATE on SQLite)
    return _Raw(conn), _driver_sql(conn.dialect)


class _Raw:
    """The DBAPI connection under a SQLAlchemy ``Connection``, inside that connection's transaction.

    What ``exec_driver_sql`` does, without its execution context: the statement and parameters go
    to a driver cursor as they are. A driver error is raised as SQLAlchemy's exception of the same
    kind (``OperationalError`` for a locked SQLite file or a dropped PostgreSQL connection), with
    the parameters hidden, exactly as ``exec_driver_sql`` raises it; callers cannot tell the two
    apart.
    """

    __slots__ = ("_conn", "_dialect", "_error")

    def __init__(self, conn: Any) -> None:
        self._conn = conn.connection.driver_connection
        self._dialect = conn.dialect
        self._error = conn.dialect.loaded_dbapi.Error

    def _wrap(self, sql: str, exc: Exception) -> BaseException:
        return DBAPIError.instance(sql, None, exc, self._error, hide_parameters=True, dialect=self._dialect)

    def _call(self, sql: str, run: Callable[[Any], T]) -> T:
        """``run(cursor)`` on a fresh cursor, closed after; a driver error raised as SQLAlchemy's."""
        cursor = self._conn.cursor()
        try:
            return run(cursor)
        except self._error as exc:
            raise self._wrap(sql, exc) from exc
        finally:
            cursor.close()

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        """The rows of a statement that returns rows."""

        def run(cursor: Any) -> list[Any]:
            cursor.execute(sql, params)
            return list(cursor.fetchall())

        return self._call(sql, run)

    def execute(self, sql: str, params: Sequence[object] = ()) -> None:
        """Run a statement that returns nothing."""
        self._call(sql, lambda cursor: cursor.execute(sql, params))

    def executemany(self, sql: str, params: Sequence[Sequence[object]]) -> None:
        """Run a statement once per parameter tuple (one driver call)."""
        self._call(sql, lambda cursor: cursor.executemany(sql, params))


@dataclass(frozen=True)
class _DriverSql:
    postgresql: bool
    #: A tz-aware datetime as the driver stores it (SQLAlchemy's own bind processor for the
    #: column type, so the text SQLite stores is exactly what SQLAlchemy writes and compares).
    dt: Any

    def sql(self, text_: str) -> str:
        """``?`` placeholders in the driver's style (sqlite3: ``?``, psycopg: ``%s``)."""
        return text_.replace("?", "%s") if self.postgresql else text_

    def marks(self, n: int) -> str:
        """``n`` placeholders. The statements built with it interpolate only placeholders and
        constant column names, never a value (hence the S608 exemptions)."""
        return ", ".join(["?"] * n)

    def rows_in(self, conn: _Raw, template: str, values: Sequence[object], *extra: object) -> list[Any]:
        """The rows of ``template`` (a SELECT whose ``{in_list}`` is replaced by placeholders for
        ``values``, then ``extra`` parameters) for every value, 512 values per statement.

        The list is padded to a power of two with its last value (``x IN (a, b, b)`` is
        ``x IN (a, b)``), so a template has at most ten statement texts: the driver's statement
        cache (128 per connection) keeps them prepared, where a text per batch size (up to 256
        of them per template) made it prepare nearly every statement anew once batch sizes varied.
        """
        rows: list[Any] = []
        for chunk in _in_lists(values):
            rows += conn.rows(_in_statement(self, template, len(chunk)), (*chunk, *extra))
        return rows


#: Values in one IN list (a power of two; SQLite's oldest limit is 999 parameters per statement).
IN_LIST_MAX = 512


def _bucket(n: int) -> int:
    """The power of two at or above ``n`` (``n`` >= 1)."""
    return 1 << (n - 1).bit_length()


def _in_lists(values: Sequence[T]) -> list[list[T]]:
    """``values`` in IN lists of at most IN_LIST_MAX, each padded to a power of two with its last
    value (``x IN (a, b, b)`` is ``x IN (a, b)``): the one mechanism by which every statement with
    an IN list keeps a few texts (see ``_DriverSql.rows_in``)."""
    return [
        _padded(list(values[start : start + IN_LIST_MAX])) for start in range(0, len(values), IN_LIST_MAX)
    ]


def _padded(values: list[T]) -> list[T]:
    """``values`` padded to a power of two with its last value (an empty list stays empty)."""
    return values + values[-1:] * (_bucket(len(values)) - len(values)) if values else values


@functools.cache
def _in_statement(drv: _DriverSql, template: str, n: int) -> str:
    """``template`` with its ``{in_list}`` as ``n`` placeholders, in the driver's style; built once
    per (dialect, template, size), as the sizes are a few powers of two. Only placeholders are
    interpolated, never a value."""
    return drv.sql(template.format(in_list=drv.marks(n)))


def _pieces(n: int, largest: int) -> list[int]:
    """``n`` as a sum of powers of two, largest first, none above ``largest`` (a power of two):
    the sizes of the statements a multi-row INSERT of ``n`` rows is split into, so that it has a
    few statement texts the driver keeps prepared rather than one per batch size."""
    sizes: list[int] = []
    while n >= largest:
        sizes.append(largest)
        n -= largest
    bit = largest >> 1
    while n:
        if n & bit:
            sizes.append(bit)
            n -= bit
        bit >>= 1
    return sizes


_DRIVER_SQL: dict[str, _DriverSql] = {}


def _driver_sql(dialect: Any) -> _DriverSql:
    found = _DRIVER_SQL.get(dialect.name)
    if found is None:
        dt: Callable[[Any], Any]
        if dialect.name == "sqlite":
            dt = sqlite_datetime
        else:
            dt = _table(Delivery).c.updated_at.type._cached_bind_processor(dialect) or (lambda v: v)
        found = _DRIVER_SQL[dialect.name] = _DriverSql(dialect.name == "postgresql", dt)
    return found


def sqlite_datetime(value: datetime | None) -> str | None:
    """What SQLAlchemy's bind processor for ``UTCDateTime`` on SQLite makes of ``value``, the same
    text (a test compares the two) for less: the per-event statements convert a few datetimes per
    event, and the processor's chain (TypeDecorator, then DATETIME's format) took 6.0 µs each
    against 3.6 µs here (timeit, the same process)."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        if value.utcoffset() is None:
            raise ValueError("Datetime values must have timezone information.")
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds")[:26]  # without the "+00:00"


# Slotted, not frozen: see NewDelivery.
@dataclass(slots=True)
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
    """Insert a batch of events in a few multi-row statements; returns the new ids by dedupe key.

    An event whose dedupe key is already stored is skipped (``ON CONFLICT DO NOTHING``) and absent
    from the result; the caller counts it with ``count_duplicates``. The keys within ``events`` must
    be distinct. Ids follow the order of ``events`` (the statements run in that order), which is
    arrival order.
    """
    if not events:
        return {}
    conn, drv = _driver(session)
    received = drv.dt(now)
    found: dict[str, int] = {}
    start = 0
    # 128 rows (768 parameters) at most per statement, and power-of-two sizes (_pieces), one
    # after another so that ids still follow the order of ``events``.
    for size in _pieces(len(events), 128):
        chunk = events[start : start + size]
        start += size
        params: list[object] = []
        for e in chunk:
            params += (e.xelion_context_id, e.notification_type, e.call_id, e.dedupe_key, e.payload, received)
        result = conn.rows(_insert_events_sql(drv, size), params)
        found.update({str(key): int(event_id) for event_id, key in result})
    return found


@functools.cache
def _insert_events_sql(drv: _DriverSql, rows: int) -> str:
    """The multi-row INSERT of ``rows`` events; built once per dialect and (power-of-two) size."""
    values = ", ".join(["(?, ?, ?, ?, ?, 0, ?)"] * rows)
    return drv.sql(
        "INSERT INTO call_event (xelion_context_id, notification_type, call_id, dedupe_key, "  # noqa: S608
        f"payload, duplicates, received_at) VALUES {values} "
        "ON CONFLICT (dedupe_key) DO NOTHING RETURNING id, dedupe_key"
    )


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
    ids = sorted(set(xelion_context_ids))
    if ids:
        conn, drv = _driver(session)
        conn.execute(
            drv.sql(f"UPDATE xelion_context SET last_event_at = ? WHERE id IN ({drv.marks(len(ids))})"),  # noqa: S608
            (drv.dt(now), *ids),
        )


def inactive_credentials(session: Session, credential_ids: Sequence[int]) -> dict[int, str | None]:
    """The credentials among ``credential_ids`` that are not ``active``, with their state reason."""
    ids = sorted(set(credential_ids))
    if not ids:
        return {}
    conn, drv = _driver(session)
    sql = "SELECT id, state_reason FROM user_credentials WHERE id IN ({in_list}) AND state <> 'active'"
    found = {int(cred_id): reason for cred_id, reason in drv.rows_in(conn, sql, ids)}
    if found and drv.postgresql:
        # An operator's repair may be committing meanwhile (``update_secret``: the credential and
        # its parked deliveries in one transaction). Read the inactive ones again under a share
        # lock, which waits for it: without, this batch could start deliveries parked that the
        # repair did not see to resume, and they would wait for ever. Only when one is inactive:
        # the hot path stays a plain read. SQLite has one writer at a time: nothing to wait for.
        rows = drv.rows_in(conn, sql + " ORDER BY id FOR SHARE", sorted(found))
        found = {int(cred_id): reason for cred_id, reason in rows}
    return found


def reauth_required(session: Session, credential_ids: Sequence[int]) -> set[int]:
    """The credentials among ``credential_ids`` still marked ``reauth_required``: a completion
    parks a credential's deliveries only then (§13). On PostgreSQL the rows are locked (in id
    order) until the transaction ends, so an operator's repair committing meanwhile is either seen
    here (and nothing is parked) or waits and resumes what this transaction parks; taken before any
    delivery row, in the order the repair takes them (the credential, then its deliveries)."""
    ids = sorted(set(credential_ids))
    if not ids:
        return set()
    conn, drv = _driver(session)
    sql = "SELECT id FROM user_credentials WHERE id IN ({in_list}) AND state = 'reauth_required'"
    if drv.postgresql:
        # NO KEY UPDATE: it still waits for a repair's UPDATE and an ingest's FOR SHARE, but not for
        # the key-share lock an ingest's foreign-key check takes when it inserts a delivery of the
        # credential (FOR UPDATE made that insert wait here while this waited for the ingest's
        # FOR SHARE of another credential: a deadlock).
        sql += " ORDER BY id FOR NO KEY UPDATE"
    return {int(row[0]) for row in drv.rows_in(conn, sql, ids)}


def lock_calls(session: Session, call_ids: Sequence[str]) -> None:
    """On PostgreSQL, serialise the ingest of events of the same calls across replicas.

    A transaction-level advisory lock per callId (taken in a fixed order, so two batches cannot
    deadlock), BEFORE the batch draws its event ids: a replica that ingests a later event of a call
    then draws a later id and sees the earlier event's deliveries, whether or not either replica
    hands its deliveries off (reliability.md §3). SQLite needs nothing: its one writer already
    serialises every transaction (BEGIN IMMEDIATE).
    """
    ids = sorted({c for c in call_ids if c})
    if not ids:
        return
    conn, drv = _driver(session)
    if not drv.postgresql:
        return
    conn.rows(
        "SELECT count(pg_advisory_xact_lock(h)) FROM (SELECT DISTINCT hashtext('call|' || c) AS h "
        "FROM unnest(CAST(%s AS text[])) AS c ORDER BY h) AS s",
        (ids,),
    )


def _keys_in_states(session: Session, ordering_keys: Sequence[str], states: Sequence[str]) -> set[str]:
    """The ordering keys among ``ordering_keys`` with a delivery in one of ``states`` (one query on
    ``ix_delivery_order``: a seek per key, whatever the backlog; see ``keys_in_states_sql``)."""
    keys = sorted(set(ordering_keys))
    if not keys:
        return set()
    conn, drv = _driver(session)
    rows = drv.rows_in(conn, keys_in_states_sql(drv, len(states)), keys, *states)
    return {str(row[0]) for row in rows}


def keys_in_states_sql(drv: _DriverSql, states: int) -> str:
    """The template (``{in_list}`` for the keys, then ``states`` placeholders) of ``_keys_in_states``.

    Its state test is written so that no index on ``state`` can serve it: ``+state`` on SQLite,
    ``(state || '')`` on PostgreSQL. Both planners otherwise took the state index (SQLite, without
    statistics: ``ix_delivery_due``; PostgreSQL, from statistics taken while the backlog was small:
    the partial credential index) and read every undelivered delivery for each ingest batch: on
    SQLite 0.43 ms with 500 of them and 1.4 ms with 2,000, against 27 µs through
    ``ix_delivery_order``, so ingest slowed down in step with the backlog (a CRM outage, a replay),
    which is when it must not.
    """
    state = "(state || '')" if drv.postgresql else "+state"
    return (
        "SELECT DISTINCT ordering_key FROM delivery WHERE ordering_key IN ({in_list}) "  # noqa: S608
        f"AND {state} IN ({drv.marks(states)})"
    )


def undelivered_keys(session: Session, ordering_keys: Sequence[str]) -> set[str]:
    """The ordering keys among ``ordering_keys`` that have an undelivered delivery (§3).

    On PostgreSQL the caller holds ``lock_calls``'s locks for these keys' calls, so two replicas
    ingesting events of the same call have serialised before this read.
    """
    return _keys_in_states(session, ordering_keys, UNDELIVERED)


#: The columns ``delivery_row`` fills, in the order ``insert_delivery_rows`` sends them.
_DELIVERY_COLUMNS = (
    "id",
    "event_id",
    "xelion_context_id",
    "crm_context_id",
    "mapping_id",
    "credential_id",
    "xelion_username",
    "user_role",
    "call_id",
    "ordering_key",
    "state",
    "attempts",
    "next_attempt_at",
    "lease_owner",
    "lease_expires_at",
    "last_error",
    "created_at",
    "updated_at",
)
_DATETIME_COLUMNS = frozenset({"next_attempt_at", "lease_expires_at", "created_at", "updated_at"})
#: A row's values in column order (one C call), and where among them the datetimes are.
_DELIVERY_VALUES = operator.itemgetter(*_DELIVERY_COLUMNS)
_DATETIME_AT = tuple(i for i, c in enumerate(_DELIVERY_COLUMNS) if c in _DATETIME_COLUMNS)


def insert_delivery_rows(session: Session, rows: Sequence[dict[str, object]]) -> None:
    """Insert prepared delivery rows (``delivery_row``: every column but ``delivered_at`` and
    ``last_status``), one executemany."""
    if not rows:
        return
    conn, drv = _driver(session)
    # Most rows of a batch share their timestamps (the batch's ``now``): each is converted once.
    converted: dict[object, object] = {}

    def dt(value: object) -> object:
        if value is None:
            return None
        out = converted.get(value)
        if out is None:
            out = converted[value] = drv.dt(value)
        return out

    params = []
    for row in rows:
        values = list(_DELIVERY_VALUES(row))
        for i in _DATETIME_AT:
            values[i] = dt(values[i])
        params.append(values)
    conn.executemany(
        drv.sql(
            f"INSERT INTO delivery ({', '.join(_DELIVERY_COLUMNS)}) "  # noqa: S608
            f"VALUES ({drv.marks(len(_DELIVERY_COLUMNS))})"
        ),
        params,
    )


def recorded_attempts(session: Session, completions: Sequence[Completion]) -> set[str]:
    """The deliveries among ``completions`` whose attempt is already in the log (the same delivery
    and start time): a batch written again after an error whose first COMMIT did apply. One
    statement per completion: only ever asked for a batch written again."""
    conn, drv = _driver(session)
    sql = drv.sql("SELECT 1 FROM delivery_attempt WHERE delivery_id = ? AND started_at = ?")
    return {
        c.delivery_id for c in completions if conn.rows(sql, (c.delivery_id, drv.dt(c.attempt.started_at)))
    }


def pending_keys(session: Session, ordering_keys: Sequence[str]) -> set[str]:
    """The ordering keys among ``ordering_keys`` that have a ``pending`` delivery: after a
    completion, whether the call has a successor to claim."""
    return _keys_in_states(session, ordering_keys, ("pending",))


# Slotted, not frozen: see NewDelivery.
@dataclass(slots=True)
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


def complete_many(session: Session, completions: Sequence[Completion], *, now: datetime) -> list[str | None]:
    """``complete`` for many deliveries in one transaction, with a few set-based statements.

    Returns, per completion, the state it wrote, or None where it did not apply: a parked outcome
    whose credential was repaired meanwhile writes ``pending`` (``_resumed``), and the worker must
    count and wake for what was written. As in ``complete``, a completion applies only if
    the delivery is still ``sending`` under the same claim token, and a delivery completes at most
    once per batch (the first completion that matches). The state changes are conditional
    UPDATEs (``_apply_sqlite``, ``_apply_postgresql``); then the attempt records are inserted with
    their number counted in the same statement (one executemany).
    """
    if not completions:
        return []
    # Texts either database keeps (one refused value failed the batch, and every outcome in it was
    # sent again at its lease's end, for ever: a CRM answering with a NUL byte on PostgreSQL).
    completions = [
        c if (a := _storable_attempt(c.attempt)) is c.attempt else replace(c, attempt=a) for c in completions
    ]
    parking = [c.credential_id for c in completions if c.state == "parked" and c.credential_id is not None]
    still: set[int] = set()  # the credentials this transaction parks
    if parking:
        still = reauth_required(session, parking)
        completions = [
            _resumed(c, now) if c.state == "parked" and c.credential_id not in still else c
            for c in completions
        ]
    conn, drv = _driver(session)
    at = drv.dt(now)
    if drv.postgresql:
        applied = _apply_postgresql(conn, drv, completions, at, sorted(still))
    else:
        applied = _apply_sqlite(conn, drv, completions, at)
    written = [c.state if ok else None for c, ok in zip(completions, applied, strict=True)]
    done = [c for c, ok in zip(completions, applied, strict=True) if ok]
    if not done:
        return written
    # Numbered over the delivery's whole life: a replay restarts the retry schedule
    # (``attempts``) but not the attempt log. Each delivery appears once in ``done``.
    conn.executemany(
        drv.sql(
            "INSERT INTO delivery_attempt (delivery_id, attempt_no, started_at, duration_ms, outcome, "
            "http_status, error, request_method, request_url, request_excerpt, response_excerpt) "
            "VALUES (?, (SELECT count(*) + 1 FROM delivery_attempt WHERE delivery_id = ?), "
            "?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ),
        [
            (
                c.delivery_id,
                c.delivery_id,
                drv.dt(c.attempt.started_at),
                c.attempt.duration_ms,
                c.attempt.outcome,
                c.attempt.http_status,
                c.attempt.error,
                c.attempt.request_method,
                c.attempt.request_url,
                c.attempt.request_excerpt,
                c.attempt.response_excerpt,
            )
            for c in done
        ],
    )
    for c in done:
        if c.state == "parked" and c.credential_id is not None:
            park_credential(session, credential_id=c.credential_id, reason=c.park_reason, now=now)
    return written


def _resumed(c: Completion, now: datetime) -> Completion:
    """A parked outcome whose credential an operator repaired meanwhile (a new refresh token or
    device code: the state is ``active`` again, and its parked deliveries were resumed before this
    one was written): the delivery is due again now instead of parked, where nothing would resume
    it. The attempt record still says what happened."""
    return replace(c, state="pending", next_attempt_at=now, credential_id=None, park_reason="")


def _new_state(c: Completion, drv: _DriverSql, at: object) -> tuple[object, ...]:
    """What a completion writes into its delivery row, in the order the UPDATEs below bind it:
    state, attempts to add, last status, last error, next attempt (None keeps it), delivered at."""
    return (
        c.state,
        1 if c.count_attempt else 0,
        c.attempt.http_status,
        c.attempt.error,
        drv.dt(c.next_attempt_at) if c.next_attempt_at is not None else None,
        at if c.state == "delivered" else None,
    )


def _apply_postgresql(
    conn: _Raw, drv: _DriverSql, completions: Sequence[Completion], at: object, parked: Sequence[int] = ()
) -> list[bool]:
    """The conditional state changes on PostgreSQL: the rows are read and locked first, in id
    order (``FOR UPDATE``: two replicas completing overlapping batches cannot deadlock), then the
    UPDATE runs for the completions whose claim matches (one executemany).

    ``parked``: the credentials whose deliveries this transaction will park (``park_credential``).
    Their undelivered rows are locked in the same statement, in the same order: parked one by one
    afterwards, two replicas' batches parking different credentials, each holding a delivery of the
    other's, locked them in opposite orders (a deadlock)."""
    ids = sorted({c.delivery_id for c in completions})
    batch = set(ids)
    where = "id IN ({in_list}) AND state = 'sending'"
    extra: tuple[object, ...] = ()
    if parked:  # rare: the common statement stays a plain seek of the batch's own rows
        where, extra = f"({where}) OR (credential_id = ANY(%s) AND state = 'pending')", (list(parked),)
    # Constant SQL in two shapes; every value is a parameter.
    sql = f"SELECT id, lease_owner, state FROM delivery WHERE {where} ORDER BY id FOR UPDATE"  # noqa: S608
    rows = drv.rows_in(conn, sql, ids, *extra)
    owners: dict[str, str | None] = {
        str(i): owner for i, owner, state in rows if str(i) in batch and state == "sending"
    }
    applied: list[bool] = []
    for c in completions:
        ok = owners.get(c.delivery_id) == c.claim
        if ok:
            owners.pop(c.delivery_id)  # the same claim cannot complete twice
        applied.append(ok)
    done = [c for c, ok in zip(completions, applied, strict=True) if ok]
    if done:
        conn.executemany(
            drv.sql(
                "UPDATE delivery SET lease_owner = NULL, lease_expires_at = NULL, updated_at = ?, "
                "state = ?, attempts = attempts + ?, last_status = ?, last_error = ?, "
                "next_attempt_at = COALESCE(?, next_attempt_at), delivered_at = COALESCE(?, delivered_at) "
                "WHERE id = ? AND lease_owner = ? AND state = 'sending'"
            ),
            [(at, *_new_state(c, drv, at), c.delivery_id, c.claim) for c in done],
        )
    return applied


def _apply_sqlite(conn: _Raw, drv: _DriverSql, completions: Sequence[Completion], at: object) -> list[bool]:
    """The conditional state changes on SQLite: one ``UPDATE ... FROM (VALUES ...) RETURNING``
    per piece of the batch (power-of-two sizes, a few statement texts), which applies exactly the
    completions whose claim still holds and names them, instead of a SELECT of the rows' claims
    followed by an executemany of UPDATEs (two statements, and a step per row).

    A delivery that appears more than once in the batch (this worker claimed it again while the
    first claim's task still ran) would join several VALUES rows, and RETURNING cannot say which
    claim matched: its first completion goes with the batch, the others one by one after it, each
    only if no earlier one applied. The write lock (BEGIN IMMEDIATE) keeps the rows as read.
    """
    first: list[int] = []
    again: list[int] = []
    seen: set[str] = set()
    for i, c in enumerate(completions):
        (again if c.delivery_id in seen else first).append(i)
        seen.add(c.delivery_id)
    updated: set[str] = set()
    start = 0
    for size in _pieces(len(first), 64):
        params: list[object] = [at]
        for i in first[start : start + size]:
            c = completions[i]
            params += (c.delivery_id, c.claim, *_new_state(c, drv, at))
        start += size
        updated.update(str(row[0]) for row in conn.rows(_complete_sql(size), params))
    applied = [False] * len(completions)
    for i in first:
        applied[i] = completions[i].delivery_id in updated
    for i in again:
        c = completions[i]
        if c.delivery_id not in updated and conn.rows(
            _complete_sql(1), (at, c.delivery_id, c.claim, *_new_state(c, drv, at))
        ):
            updated.add(c.delivery_id)
            applied[i] = True
    return applied


@functools.cache
def _complete_sql(rows: int) -> str:
    """``_apply_sqlite``'s UPDATE for ``rows`` completions; built once per (power-of-two) size.
    The VALUES columns: id, claim, then ``_new_state``'s six."""
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
    return (
        "UPDATE delivery SET lease_owner = NULL, lease_expires_at = NULL, updated_at = ?, "  # noqa: S608
        "state = v.column3, attempts = attempts + v.column4, last_status = v.column5, "
        "last_error = v.column6, next_attempt_at = COALESCE(v.column7, next_attempt_at), "
        "delivered_at = COALESCE(v.column8, delivered_at) "
        f"FROM (VALUES {values}) AS v "
        "WHERE delivery.id = v.column1 AND delivery.lease_owner = v.column2 AND delivery.state = 'sending' "
        "RETURNING delivery.id"
    )
