"""From call events to deliveries, committed together (DESIGN.md §1, reliability.md §1-§2).

Group commit: ``ingest``/``submit`` queue the event, and one ingest task writes everything queued
(up to ``BATCH_MAX`` events) in ONE transaction with set-based statements: one multi-row INSERT of
the events (``ON CONFLICT (dedupe_key) DO NOTHING RETURNING``), one UPDATE counting duplicates (if
any), one UPDATE of the integrations' ``last_event_at`` (at most once a second each), one SELECT of
the credentials that are not active, one SELECT of the ordering keys still held by undelivered
deliveries, one executemany INSERT of the deliveries; on PostgreSQL first the advisory locks of the
batch's calls (``lock_calls``). Each caller's future resolves after the commit; if the transaction
fails, every future of the batch fails with the exception and nothing of the batch is stored.
Batches are written one after another in arrival order, so event ids follow arrival order
(per-call order, §3).

Hand-off: a new delivery that is first in line for its ordering key (no undelivered delivery of the
key in the database, none earlier in the batch) is inserted already leased (``sending``, a claim
token, a lease) when the worker has room for it (asked before the transaction, ``Handoff.reserve``),
and given to the worker in memory after the commit (``Handoff.accept``), which saves the claim
query. The lease is taken in the inserting transaction, so a crash or another replica sees an
ordinary claim. Everything else stays ``pending`` for the worker's claim loop.

For each event: deduplicate by its key; for each CRM context of the integration, find the parties
that have credentials there (xelion-protocol.md §4), the mappings for that ``xelionEvent`` whose
``condition`` holds, and create one delivery per (event, mapping, user). The event and its
deliveries commit together, so an event counts as received only once nothing of it can be lost.
A condition that cannot be evaluated makes a dead delivery with the error and blocks nothing else.
Deliveries of a credential that needs re-authorisation start ``parked`` (its state is read in the
event's transaction, see ``_park_if_reauth_required``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import partial
from typing import Protocol

from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from cti_bridge import jsontext
from cti_bridge.clock import Clock, SystemClock, xelion_time
from cti_bridge.events import dedupe_key, parties
from cti_bridge.render import RenderContext, context_names
from cti_bridge.routing import CredentialRoute, CrmRoute, RoutingCache
from cti_bridge.store.db import Database, retry_transient
from cti_bridge.store.deliveries import (
    Claimed,
    NewDelivery,
    NewEvent,
    count_duplicates,
    delivery_row,
    inactive_credentials,
    insert_delivery_rows,
    insert_events,
    lock_calls,
    new_delivery_id,
    ordering_key,
    payload_text,
    touch_contexts,
    undelivered_keys,
)

log = logging.getLogger(__name__)

#: At most this many events in one ingest transaction.
BATCH_MAX = 256
#: Seconds between two writes of an integration's ``last_event_at``.
TOUCH_EVERY = 1.0


@dataclass(frozen=True)
class IngestResult:
    event_id: int | None  # None: a duplicate
    delivery_ids: tuple[str, ...]
    handed_off: int = 0  # how many of them were given to the worker already leased

    @property
    def duplicate(self) -> bool:
        return self.event_id is None


def _match(
    route: CrmRoute, username: str | None, oid: str | None, common_name: str | None
) -> CredentialRoute | None:
    if username and username in route.by_username:
        return route.by_username[username]
    if oid and oid in route.by_oid:
        return route.by_oid[oid]
    if common_name and common_name in route.by_username:
        return route.by_username[common_name]
    return None


def _park_if_reauth_required(session: Session, new: list[NewDelivery]) -> list[NewDelivery]:
    """Start the deliveries of a credential that needs re-authorisation ``parked`` (§13).

    The state is read here, in the event's transaction (one query per batch), not from the routing
    snapshot: the worker changes it (a dead grant) without telling the routing cache, and another
    replica's operator change reaches this one's cache only after its time-to-live. A stale snapshot
    started new deliveries ``pending`` behind parked ones of the same call (claimable never, shown
    as due), or ``parked`` for a credential already repaired (and nothing would ever resume them).
    """
    reasons = inactive_credentials(session, [d.credential_id for d in new if d.state == "pending"])
    if not reasons:
        return new
    return [
        replace(
            d,
            state="parked",
            last_error=f"re-authorisation required: {reasons[d.credential_id] or 'the grant is dead'}",
        )
        if d.state == "pending" and d.credential_id in reasons
        else d
        for d in new
    ]


@dataclass
class HandoffRoom:
    """What the worker can take from one ingest batch: reserved before the transaction, used in it
    (in the database thread), returned with ``Handoff.accept``.

    ``slots`` places in total; per CRM host (a mapping's host is ``mapping_host``, else a host of its
    own, as the worker counts them) at most ``host_room.get(host, default_host_room)``.
    """

    slots: int
    lease_seconds: float
    host_room: dict[str, int]
    default_host_room: int
    mapping_host: dict[int, str]
    reserved: int = 0  # what the worker reserved (returned in ``accept``)
    leased_at: float | None = None  # monotonic, before the transaction: its leases start later

    def take(self, mapping_id: int) -> bool:
        """Use one place for a delivery of ``mapping_id`` if there is one."""
        if self.slots <= 0:
            return False
        host = self.mapping_host.get(mapping_id) or f"mapping {mapping_id}"
        left = self.host_room.get(host, self.default_host_room)
        if left <= 0:
            return False
        self.host_room[host] = left - 1
        self.slots -= 1
        return True


class Handoff(Protocol):
    """The worker as the pipeline sees it (``DeliveryWorker`` implements it)."""

    def reserve(self, want: int) -> HandoffRoom | None:
        """Reserve room for up to ``want`` deliveries; None: no room (or stopping)."""
        ...

    def accept(
        self,
        room: HandoffRoom | None,
        claimed: Sequence[Claimed],
        queued_mappings: Sequence[int],
        blocked_keys: Sequence[str],
    ) -> None:
        """After the commit: start ``claimed`` and give back the reservation. ``queued_mappings``:
        the mappings of deliveries left ``pending`` that may be claimable now (no room), one entry
        per delivery; ``blocked_keys``: the ordering keys of those waiting behind an earlier
        undelivered delivery of their key."""
        ...


@dataclass
class _Queued:
    xelion_context_id: int
    notification_type: str
    fields: dict[str, object]
    future: asyncio.Future[IngestResult]


@dataclass
class _BatchOutcome:
    results: list[IngestResult]
    claimed: list[Claimed] = field(default_factory=list)
    queued_mappings: list[int] = field(default_factory=list)
    blocked_keys: list[str] = field(default_factory=list)
    touched: list[tuple[int, float]] = field(default_factory=list)  # (integration, monotonic time)


class Pipeline:
    """Turns call events into stored deliveries (group commit) and hands fresh ones to the worker."""

    def __init__(
        self,
        db: Database,
        routing: RoutingCache,
        *,
        clock: Clock | None = None,
        on_committed: Callable[[IngestResult], None] | None = None,
        handoff: Handoff | None = None,
        batch_max: int = BATCH_MAX,
    ) -> None:
        self.db = db
        self.routing = routing
        self.clock = clock or SystemClock()
        self.on_committed = on_committed
        self.handoff = handoff
        self.batch_max = batch_max
        self._queue: list[_Queued] = []
        self._task: asyncio.Task[None] | None = None
        self._touched: dict[int, float] = {}  # integration -> when its last_event_at was last written

    # -- the asynchronous front ------------------------------------------------------------------

    def submit(
        self, xelion_context_id: int, notification_type: str, fields: dict[str, object]
    ) -> asyncio.Future[IngestResult]:
        """Queue the event for the next ingest transaction; the future resolves after its commit
        (or fails with the transaction's exception). Events are committed in submission order."""
        future: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(xelion_context_id, notification_type, fields, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="ingest")
        return future

    async def ingest(
        self, xelion_context_id: int, notification_type: str, fields: dict[str, object]
    ) -> IngestResult:
        """Store the event and its deliveries; returns after the commit.

        Cancellation: the event stays queued and is committed all the same; the caller just stops
        waiting for it.
        """
        return await asyncio.shield(self.submit(xelion_context_id, notification_type, fields))

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed or failed (a clean stop)."""
        while self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    @property
    def queued(self) -> int:
        """Events submitted and not yet taken into a transaction."""
        return len(self._queue)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self.batch_max]
                del self._queue[: self.batch_max]
                await self._write(batch)
        except BaseException as exc:  # cancelled: nothing queued may wait forever
            for q in self._queue:
                if not q.future.done():
                    q.future.set_exception(
                        exc if isinstance(exc, Exception) else RuntimeError("ingest stopped")
                    )
            self._queue.clear()
            raise

    async def _write(self, batch: list[_Queued]) -> None:
        items = [(q.xelion_context_id, q.notification_type, q.fields) for q in batch]

        async def attempt(_again: bool) -> tuple[_BatchOutcome, HandoffRoom | None]:
            # A fresh reservation per try; a failed try gives its own back.
            room = self.handoff.reserve(len(batch)) if self.handoff is not None else None
            try:
                return await self.db.run(
                    partial(self._ingest_batch, items=items, room=room), quick=True
                ), room
            except BaseException:
                if self.handoff is not None:
                    self.handoff.accept(room, (), (), ())
                raise

        try:
            # A database briefly away: the same batch again. Safe: the dedupe key makes a batch that
            # did commit before the error a set of duplicates on the next try.
            outcome, room = await retry_transient(attempt, f"committing {len(batch)} events")
        except OperationalError as exc:
            await self._fail(batch, exc)
            return
        except Exception as exc:
            if len(batch) > 1:
                # Not transient: most likely one event's fault (an integration or a user deleted
                # while its events waited). Write the events one by one, so only that one fails
                # and the other integrations' events are kept.
                log.warning("a batch of %d events failed (%s); writing them one by one", len(batch), exc)
                for q in batch:
                    await self._write([q])
                return
            await self._fail(batch, exc)
            return
        except BaseException as exc:
            await self._fail(batch, exc)
            raise
        self._touched.update(outcome.touched)  # committed: the next second's batches may skip it
        # The callers first: a failing hook below must not leave a committed event unanswered.
        for q, result in zip(batch, outcome.results, strict=True):
            if not q.future.done():
                q.future.set_result(result)
        if self.handoff is not None:
            self.handoff.accept(room, outcome.claimed, outcome.queued_mappings, outcome.blocked_keys)
        if self.on_committed is not None:
            for result in outcome.results:
                try:
                    self.on_committed(result)
                except Exception:
                    log.exception("on_committed failed")

    async def _fail(self, batch: list[_Queued], exc: BaseException) -> None:
        """Fail every caller of a batch that could not be committed."""
        log.error("committing %d events failed: %s", len(batch), exc)
        for q in batch:
            if not q.future.done():
                q.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("ingest stopped"))

    # -- the transaction -------------------------------------------------------------------------

    def ingest_sync(
        self, session: Session, xelion_context_id: int, notification_type: str, fields: dict[str, object]
    ) -> IngestResult:
        """One event in the caller's transaction (no hand-off): the batch of one."""
        return self._ingest_batch(session, [(xelion_context_id, notification_type, fields)], None).results[0]

    def _ingest_batch(
        self,
        session: Session,
        items: Sequence[tuple[int, str, dict[str, object]]],
        room: HandoffRoom | None,
    ) -> _BatchOutcome:
        """Store a batch of events with their deliveries in ``session``'s transaction."""
        now = self.clock.now()
        now_text = xelion_time(now)
        # Deduplicate within the batch first: the first occurrence is the event, later ones count.
        keys = [dedupe_key(ctx, kind, fields) for ctx, kind, fields in items]
        first: dict[str, int] = {}
        repeats: dict[str, int] = {}
        events: list[NewEvent] = []
        payloads: list[str] = []
        for i, ((ctx, kind, fields), key) in enumerate(zip(items, keys, strict=True)):
            payload = payload_text(fields)
            payloads.append(payload)
            if key in first:
                repeats[key] = repeats.get(key, 0) + 1
                continue
            first[key] = i
            events.append(NewEvent(ctx, kind, str(fields.get("callId") or ""), key, payload))
        lock_calls(session, [e.call_id for e in events])
        ids = insert_events(session, events, now=now)
        for e in events:
            if e.dedupe_key not in ids:
                repeats[e.dedupe_key] = repeats.get(e.dedupe_key, 0) + 1
        count_duplicates(session, repeats)
        # ``last_event_at`` is shown to the second: once a second per integration is enough, and
        # saves a statement in nearly every transaction (a round trip on PostgreSQL).
        mono = self.clock.monotonic()
        stored = {e.xelion_context_id for e in events if e.dedupe_key in ids}
        touched = [c for c in stored if mono - self._touched.get(c, -TOUCH_EVERY) >= TOUCH_EVERY]
        touch_contexts(session, touched, now=now)

        # Deliveries per stored event, in event order.
        planned: list[tuple[int, list[NewDelivery]]] = []  # (index in items, its deliveries)
        routes: dict[int, dict[int, CrmRoute]] = {}
        for i, ((ctx, kind, fields), key) in enumerate(zip(items, keys, strict=True)):
            if first.get(key) != i or key not in ids:
                log.info("duplicate %s for call %s ignored", kind, fields.get("callId") or "")
                continue
            routing = self.routing.get(session, ctx)
            routes[ctx] = {c.crm_context_id: c for c in routing.crms}
            planned.append((i, self._plan(routing.crms, kind, fields, now_text)))
        parked = _park_if_reauth_required(session, [d for _, ds in planned for d in ds])
        it = iter(parked)
        planned = [(i, [next(it) for _ in ds]) for i, ds in planned]

        # Hand-off: which pending deliveries are first in line for their ordering key.
        call_ids = {i: str(items[i][2].get("callId") or "") for i, _ in planned}
        live = [(i, d) for i, ds in planned for d in ds if d.state in ("pending", "parked")]
        held = (
            undelivered_keys(session, [ordering_key(call_ids[i], d.credential_id) for i, d in live])
            if room
            else set()
        )
        claim = uuid.uuid4().hex
        lease_until = now + timedelta(seconds=room.lease_seconds) if room is not None else None
        outcome = _BatchOutcome(results=[IngestResult(None, ())] * len(items))
        rows: list[dict[str, object]] = []
        seen_keys: set[str] = set()
        for i, ds in planned:
            ctx, kind, fields = items[i]
            call_id = call_ids[i]
            event_id = ids[keys[i]]
            delivery_ids: list[str] = []
            handed = 0
            # The claim order within an event is by mapping id (store/deliveries.py).
            for d in sorted(ds, key=lambda d: d.mapping_id):
                key = ordering_key(call_id, d.credential_id)
                state = d.state
                lease_owner = None
                if state == "pending":
                    blocked = key in seen_keys or key in held
                    if room is not None and not blocked and room.take(d.mapping_id):
                        state, lease_owner = "sending", claim
                    elif blocked:
                        outcome.blocked_keys.append(key)
                    else:
                        outcome.queued_mappings.append(d.mapping_id)
                if d.state in ("pending", "parked"):
                    seen_keys.add(key)
                delivery_id = new_delivery_id()
                delivery_ids.append(delivery_id)
                rows.append(
                    delivery_row(
                        d,
                        delivery_id=delivery_id,
                        event_id=event_id,
                        xelion_context_id=ctx,
                        call_id=call_id,
                        state=state,
                        now=now,
                        lease_owner=lease_owner,
                        lease_until=lease_until,
                    )
                )
                if lease_owner is not None:
                    handed += 1
                    crm = routes[ctx][d.crm_context_id]
                    outcome.claimed.append(
                        Claimed(
                            id=delivery_id,
                            claim=claim,
                            attempts=0,
                            event_id=event_id,
                            notification_type=kind,
                            payload=jsontext.loads(payloads[i]),  # exactly what a claim would read
                            mapping_id=d.mapping_id,
                            credential_id=d.credential_id,
                            xelion_username=d.xelion_username,
                            xelion_oid=d.xelion_oid,
                            user_role=d.user_role,
                            authorization_header_prefix=crm.authorization_header_prefix,
                            ordering_key=key,
                        )
                    )
            # Keep the order the deliveries were planned in for the result (as before).
            by_mapping = dict(zip(sorted(ds, key=lambda d: d.mapping_id), delivery_ids, strict=True))
            outcome.results[i] = IngestResult(event_id, tuple(by_mapping[d] for d in ds), handed)
        insert_delivery_rows(session, rows)
        outcome.touched = [(c, mono) for c in touched]
        return outcome

    def _plan(
        self, crms: Sequence[CrmRoute], notification_type: str, fields: dict[str, object], now_text: str
    ) -> list[NewDelivery]:
        """The deliveries one event makes: per CRM context, per party with credentials there, per
        mapping of the event type whose condition holds."""
        found = parties(fields)
        new: list[NewDelivery] = []
        for crm in crms:
            mappings = crm.mappings.get(notification_type)
            if mappings is None:
                continue
            seen: set[int] = set()
            for party in found:
                cred = _match(crm, party.username, party.oid, party.common_name)
                if cred is None or cred.credential_id in seen:
                    continue
                seen.add(cred.credential_id)
                ctx = RenderContext(
                    event=fields,
                    xelion_event=notification_type,
                    user={
                        "xelionUsername": cred.xelion_username,
                        "xelionOid": cred.xelion_oid,
                        "role": party.role,
                    },
                    token=None,
                    delivery_id=None,
                    now=now_text,
                )
                for m, exc in mappings.applicable(context_names(ctx)):
                    state, error = ("pending", None) if exc is None else ("dead", f"condition: {exc}")
                    new.append(
                        NewDelivery(
                            crm_context_id=crm.crm_context_id,
                            mapping_id=m.mapping_id,
                            credential_id=cred.credential_id,
                            xelion_username=cred.xelion_username,
                            user_role=party.role,
                            state=state,
                            last_error=error,
                            xelion_oid=cred.xelion_oid,
                        )
                    )
        return new
