"""Leases and per-call order in the delivery store (reliability.md §3, §4), driven directly with a
fake ``now``: an expired lease is claimed again, a completion from the stale claim changes nothing,
order by event holds across a reclaim and a retry, and concurrent claimers never share a delivery.
On SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlmodel import Session, col

from cti_bridge.store.db import Database
from cti_bridge.store.deliveries import (
    AttemptRecord,
    NewDelivery,
    _due_sql,
    claim_due,
    complete,
    insert_deliveries,
    insert_event,
    next_due_at,
    release,
)
from cti_bridge.store.models import (
    CrmContext,
    Delivery,
    DeliveryAttempt,
    EventUriMapping,
    UserCredentials,
    XelionContext,
)

T0 = datetime(2026, 1, 5, 9, 0, 0, tzinfo=UTC)
LEASE = 10.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@dataclass
class World:
    db: Database
    xelion_context_id: int
    crm_context_id: int
    mapping_id: int
    credential_id: int
    serial: itertools.count[int]

    def event(self, call_id: str, now: datetime = T0) -> str:
        """One event of ``call_id`` with one delivery (this world's mapping and user); its id."""
        n = next(self.serial)

        def write(session: Session) -> str:
            event_id = insert_event(
                session,
                xelion_context_id=self.xelion_context_id,
                notification_type="callConnectedEvent",
                call_id=call_id,
                dedupe_key=f"key-{n}",
                payload={"callId": call_id, "n": n},
                now=now,
            )
            assert event_id is not None
            (delivery_id,) = insert_deliveries(
                session,
                event_id=event_id,
                xelion_context_id=self.xelion_context_id,
                call_id=call_id,
                deliveries=[
                    NewDelivery(
                        crm_context_id=self.crm_context_id,
                        mapping_id=self.mapping_id,
                        credential_id=self.credential_id,
                        xelion_username="anne",
                        user_role="callee",
                    )
                ],
                now=now,
            )
            return delivery_id

        return self.db.run_sync(write)

    def claim(self, now: datetime, limit: int = 10) -> list[tuple[str, str]]:
        """(delivery id, claim) of what a worker claiming at ``now`` gets."""
        claimed = self.db.run_sync(lambda s: claim_due(s, now=now, limit=limit, lease_seconds=LEASE))
        return [(c.id, c.claim) for c in claimed]

    def complete(
        self, delivery_id: str, claim: str, state: str, now: datetime, retry_at: datetime | None = None
    ) -> bool:
        attempt = AttemptRecord(
            started_at=now,
            duration_ms=5,
            outcome=state,
            http_status=201 if state == "delivered" else 503,
            error=None if state == "delivered" else "HTTP 503",
            request_method="POST",
            request_url="https://crm.example/calls",
            request_excerpt=None,
            response_excerpt=None,
        )
        return self.db.run_sync(
            lambda s: complete(
                s,
                delivery_id=delivery_id,
                claim=claim,
                state=state,
                now=now,
                attempt=attempt,
                next_attempt_at=retry_at,
            )
        )

    def row(self, delivery_id: str) -> Delivery:
        found = self.db.run_sync(lambda s: s.get(Delivery, delivery_id))
        assert found is not None
        return found

    def attempts(self, delivery_id: str) -> int:
        return int(
            self.db.run_sync(
                lambda s: s.execute(
                    select(func.count())
                    .select_from(DeliveryAttempt)
                    .where(col(DeliveryAttempt.delivery_id) == delivery_id)
                ).scalar_one()
            )
        )


def make_world(db: Database) -> World:
    def write(session: Session) -> World:
        xc = XelionContext(host="xelion.example", tenant="t", admin_username="admin", admin_password_enc="x")
        session.add(xc)
        session.flush()
        assert xc.id is not None
        crm = CrmContext(xelion_context_id=xc.id, authorization_server_uri="https://crm.example/token")
        session.add(crm)
        session.flush()
        assert crm.id is not None
        mapping = EventUriMapping(
            crm_context_id=crm.id,
            xelion_event="callConnectedEvent",
            crm_resource_uri="https://crm.example/calls",
        )
        cred = UserCredentials(crm_context_id=crm.id, xelion_username="anne")
        session.add(mapping)
        session.add(cred)
        session.flush()
        assert mapping.id is not None and cred.id is not None
        return World(db, xc.id, crm.id, mapping.id, cred.id, itertools.count(1))

    return db.run_sync(write)


def test_an_expired_lease_is_reclaimed_and_the_stale_completion_changes_nothing(database: Database) -> None:
    w = make_world(database)
    d1 = w.event("call-1")
    ((got, first),) = w.claim(T0)
    assert got == d1
    assert w.row(d1).state == "sending"
    assert w.claim(at(5)) == []  # the lease holds
    assert w.claim(at(LEASE)) == []  # still held at its very end

    ((got, second),) = w.claim(at(LEASE + 1))  # the first worker crashed: its lease ran out
    assert got == d1 and second != first

    # The first worker comes back and reports: nothing changes, nothing is recorded.
    assert not w.complete(d1, first, "delivered", at(LEASE + 2))
    assert not w.db.run_sync(lambda s: release(s, delivery_ids=[d1], claim=first, now=at(LEASE + 2)))
    row = w.row(d1)
    assert (row.state, row.lease_owner, row.attempts, row.delivered_at) == ("sending", second, 0, None)
    assert w.attempts(d1) == 0

    # The second claim decides.
    assert w.complete(d1, second, "delivered", at(LEASE + 3))
    row = w.row(d1)
    assert (row.state, row.lease_owner, row.attempts) == ("delivered", None, 1)
    assert w.attempts(d1) == 1
    # A late report from either claim can no longer undo it.
    assert not w.complete(d1, first, "pending", at(LEASE + 4), retry_at=at(LEASE + 5))
    assert not w.complete(d1, second, "dead", at(LEASE + 4))
    assert w.row(d1).state == "delivered"
    assert w.attempts(d1) == 1
    assert w.claim(at(1000)) == []


def test_per_call_order_holds_across_reclaim_and_retry(database: Database) -> None:
    w = make_world(database)
    a1, a2, a3 = (w.event("call-A") for _ in range(3))
    b1 = w.event("call-B")

    first = dict(w.claim(T0))
    assert set(first) == {a1, b1}  # a2 and a3 wait for a1; another call goes in parallel
    assert w.complete(b1, first[b1], "delivered", at(1))

    # a1's worker dies; after the lease a1 is claimed again, still ahead of a2.
    again = dict(w.claim(at(LEASE + 1)))
    assert set(again) == {a1}
    # It fails and is scheduled for a retry: a2 keeps waiting although it is due.
    assert w.complete(a1, again[a1], "pending", at(LEASE + 2), retry_at=at(30))
    assert w.claim(at(20)) == []
    # The worker sleeps until a1's retry, not a2's (long past) own time.
    assert w.db.run_sync(next_due_at) == at(30)

    ((got, claim),) = w.claim(at(30))
    assert got == a1
    assert w.complete(a1, claim, "dead", at(31))  # a dead delivery no longer holds the call up
    ((got, claim),) = w.claim(at(31))
    assert got == a2
    assert w.complete(a2, claim, "delivered", at(32))
    ((got, claim),) = w.claim(at(32))
    assert got == a3


def test_a_claim_leaves_out_the_expired_leases_its_caller_is_still_running(database: Database) -> None:
    """After the wall clock steps forward past a lease, the worker that holds it (by its monotonic
    clock) is still sending it: its own claim must not take it again (``skip_ids``); the others'
    expired leases, and pending deliveries, it still takes, up to its limit."""
    w = make_world(database)
    running, stale = w.event("call-1"), w.event("call-2")
    fresh = [w.event(f"call-{n}") for n in (3, 4)]
    held = dict(
        (c.id, c.claim)
        for c in database.run_sync(lambda s: claim_due(s, now=T0, limit=2, lease_seconds=LEASE))
    )
    assert set(held) == {running, stale}
    later = at(LEASE + 3600)  # the step

    def claim(limit: int) -> list[str]:
        got = database.run_sync(
            lambda s: claim_due(s, now=later, limit=limit, lease_seconds=LEASE, skip_ids=[running, "x"])
        )
        return [c.id for c in got]

    assert claim(1) == [stale]  # the expired lease another worker left, first
    assert w.row(running).lease_owner == held[running]  # still the running claim's
    assert claim(10) == fresh  # then what is due; never the one still running here
    assert w.row(running).lease_owner == held[running]
    # Nor does its lease count for when the worker should claim next: long past after the step,
    # it made the worker claim and ask again 15 times a second while the request ran.
    assert database.run_sync(lambda s: next_due_at(s, skip_ids=[running])) == at(LEASE + 3600 + LEASE)
    assert database.run_sync(next_due_at) == at(LEASE)  # without: the running one's, long past
    # Without skip_ids the expired lease is taken like any other (a crashed worker's).
    ((again, other),) = w.claim(later)
    assert again == running and other != held[running]


def test_claims_skip_mappings_without_room(database: Database) -> None:
    w = make_world(database)
    d1 = w.event("call-1")
    skipped = database.run_sync(
        lambda s: claim_due(s, now=T0, limit=10, lease_seconds=LEASE, skip_mappings=[w.mapping_id])
    )
    assert skipped == []
    assert database.run_sync(lambda s: next_due_at(s, skip_mappings=[w.mapping_id])) is None
    assert [d for d, _ in w.claim(T0)] == [d1]


def test_skip_lists_of_any_length_make_a_few_statement_texts(database: Database) -> None:
    """The due SELECT's text was made and cached once per length of the skip list: with a slow
    CRM and up to 4,096 known mappings, thousands of texts (a review measured 54.8 MB), each
    prepared anew. Lengths 1 to 100 now make the powers of two up to 128: eight texts per kind
    of due, and claims skip what they must still."""
    w = make_world(database)
    d1 = w.event("call-1")
    before = _due_sql.cache_info().currsize
    for n in range(1, 101):
        skipped = [w.mapping_id, *range(10_000, 10_000 + n - 1)]
        assert (
            database.run_sync(
                lambda s, skipped=skipped: claim_due(
                    s, now=T0, limit=10, lease_seconds=LEASE, skip_mappings=skipped
                )
            )
            == []
        )
    assert _due_sql.cache_info().currsize - before <= 2 * 8
    assert [d for d, _ in w.claim(T0)] == [d1]


def test_concurrent_claimers_never_share_a_delivery(database: Database) -> None:
    """Eight claimers at once (threads with their own connections, like replicas): every due
    delivery is claimed exactly once."""
    w = make_world(database)
    ids = {w.event(f"call-{n}") for n in range(40)}

    def claimer(_: int) -> list[str]:
        got: list[str] = []
        while True:
            batch = w.claim(at(1), limit=3)
            if not batch:
                return got
            got.extend(d for d, _ in batch)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(claimer, range(8)))
    claimed = [d for got in results for d in got]
    assert sorted(claimed) == sorted(ids)
