"""Parked deliveries resume when the operator repairs the grant, whatever runs meanwhile
(reliability.md §13), on SQLite and PostgreSQL.

Parking writes three places: the token manager marks the credential ``reauth_required``, the worker's
completion parks the user's deliveries, and the ingest starts new ones parked. The operator's repair
(``update_secret``: a new refresh token or device code) makes the credential ``active`` and resumes
the parked deliveries, in one transaction. These tests race each parking write against the repair
and check that nothing is left parked behind an active credential, where nothing would ever resume
it. The PostgreSQL races hold the repair's transaction open in one session while the other write
runs in another.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlmodel import Session, col

from cti_bridge import pipeline as pipeline_module
from cti_bridge.clock import utcnow
from cti_bridge.delivery.worker import _Result
from cti_bridge.metrics import Metrics
from cti_bridge.pipeline import IngestResult
from cti_bridge.store import deliveries as deliveries_module
from cti_bridge.store.crypto import SecretBox
from cti_bridge.store.db import Database
from cti_bridge.store.deliveries import (
    Claimed,
    Completion,
    claim_due,
    complete_many,
    inactive_credentials,
    park_credential,
)
from cti_bridge.store.integrations import delete_credential, update_secret
from cti_bridge.store.models import CrmContext, Delivery, EventUriMapping, UserCredentials, XelionContext
from tests.integration.test_delivery_batching import (
    KIND,
    LEASE,
    attempt,
    fields,
    finishing_worker,
    make_world,
    pipeline,
)


def states(db: Database) -> dict[str, str]:
    return db.run_sync(lambda s: dict(s.execute(select(Delivery.id, Delivery.state)).all()))  # type: ignore[arg-type]


def mark_reauth_required(db: Database, credential_id: int) -> None:
    """What the token manager does after invalid_grant."""
    db.run_sync(
        lambda s: s.execute(
            update(UserCredentials)
            .where(col(UserCredentials.id) == credential_id)
            .values(state="reauth_required", state_reason="invalid_grant")
        )
    )


def repair(s: Session, box: SecretBox, credential_id: int) -> None:
    """The operator's new refresh token (POST api/users/{id}/refreshtoken/update)."""
    assert update_secret(s, box, credential_id, "refreshtoken", "rt-new", now=utcnow()) is not None


async def three_calls(database: Database, w: Any) -> list[IngestResult]:
    """One event of anne's (one delivery) in each of three calls."""
    p = pipeline(database)
    return await asyncio.gather(*(p.submit(w.xelion_context_id, KIND, fields(f"c{i}")) for i in range(3)))


def lease(database: Database, limit: int) -> tuple[datetime, list[Claimed]]:
    """A worker's claim of ``limit`` due deliveries (in flight from here), a second from now."""
    now = utcnow() + timedelta(seconds=1)
    return now, database.run_sync(lambda s: claim_due(s, now=now, limit=limit, lease_seconds=LEASE))


def parked_outcome(
    c: Claimed, credential_id: int, reason: str = "re-authorisation required: invalid_grant"
) -> Completion:
    """The worker's outcome of an attempt that met the user's dead grant."""
    return Completion(
        c.id, c.claim, "parked", attempt("parked"), count_attempt=False,
        credential_id=credential_id, park_reason=reason,
    )  # fmt: skip


async def test_the_repair_resumes_parked_deliveries_in_its_own_transaction(
    database: Database, secret_box: SecretBox
) -> None:
    w = make_world(database)
    results = await three_calls(database, w)
    mark_reauth_required(database, w.credential_id)
    database.run_sync(
        lambda s: park_credential(s, credential_id=w.credential_id, reason="dead", now=utcnow())
    )
    assert set(states(database).values()) == {"parked"}

    database.run_sync(lambda s: repair(s, secret_box, w.credential_id))
    # Nothing else ran (the admin API's background task, a worker): the commit itself resumed them.
    assert states(database) == {r.delivery_ids[0]: "pending" for r in results}


@pytest.mark.parametrize("kind", ["clientid", "clientsecret"])
async def test_a_new_client_id_or_secret_resumes_a_parked_user_too(
    database: Database, secret_box: SecretBox, kind: str
) -> None:
    """``reauth_required`` also comes from the client (no client id, ``invalid_client``): a new
    client id or secret makes the user active and its parked deliveries due, in one transaction."""
    w = make_world(database)
    results = await three_calls(database, w)
    mark_reauth_required(database, w.credential_id)
    database.run_sync(
        lambda s: park_credential(
            s, credential_id=w.credential_id, reason="no client id is set", now=utcnow()
        )
    )
    assert set(states(database).values()) == {"parked"}
    view = database.run_sync(
        lambda s: update_secret(s, secret_box, w.credential_id, kind, "new", now=utcnow())
    )
    assert view is not None
    assert states(database) == {r.delivery_ids[0]: "pending" for r in results}
    row = database.run_sync(lambda s: s.get(UserCredentials, w.credential_id))
    assert row is not None and (row.state, row.state_reason) == ("active", None)


async def test_a_new_client_secret_leaves_an_active_user_as_it_was(
    database: Database, secret_box: SecretBox
) -> None:
    w = make_world(database)
    results = await three_calls(database, w)
    assert set(states(database).values()) == {"pending"}
    view = database.run_sync(
        lambda s: update_secret(s, secret_box, w.credential_id, "clientsecret", "rotated", now=utcnow())
    )
    assert view is not None
    assert states(database) == {r.delivery_ids[0]: "pending" for r in results}
    row = database.run_sync(lambda s: s.get(UserCredentials, w.credential_id))
    assert row is not None and (row.state, row.state_reason) == ("active", None)


async def test_deleting_a_user_ends_its_parked_deliveries_as_dead(database: Database) -> None:
    """Parked behind a user that no longer exists (the foreign key sets their credential to NULL),
    nothing could resume them and retention keeps unfinished work: they stayed parked for ever.
    They end ``dead`` with the reason in the deletion's transaction; other users' are untouched."""
    w = make_world(database)
    results = await three_calls(database, w)
    mark_reauth_required(database, w.credential_id)
    database.run_sync(
        lambda s: park_credential(s, credential_id=w.credential_id, reason="dead", now=utcnow())
    )
    assert database.run_sync(lambda s: delete_credential(s, w.credential_id, now=utcnow()))
    rows = database.run_sync(lambda s: s.execute(select(Delivery.state, Delivery.last_error)).all())  # type: ignore[arg-type]
    assert sorted(tuple(r) for r in rows) == [("dead", "the user's credentials were deleted")] * len(results)


async def test_deleting_a_user_while_its_deliveries_are_being_parked_leaves_none_parked(
    database: Database,
) -> None:
    """The worker's completion parks a delivery (its grant is dead) and holds the user's row until
    it commits; the operator deletes the user meanwhile. The deletion buried the parked ones it
    found, before the completion's were committed, which then lost their credential and stayed
    parked for ever on PostgreSQL (a second reading's finding). It locks the user first."""
    w = make_world(database)
    await three_calls(database, w)
    now, claimed = lease(database, 1)
    mark_reauth_required(database, w.credential_id)
    deleted = threading.Event()

    def delete() -> None:
        assert database.run_sync(lambda s: delete_credential(s, w.credential_id, now=utcnow()))
        deleted.set()

    with Session(database.engine) as completing:
        assert complete_many(completing, [parked_outcome(claimed[0], w.credential_id)], now=now) == ["parked"]
        operator = threading.Thread(target=delete)
        operator.start()
        await asyncio.sleep(0.5)  # the deletion waits for the completion's lock (or SQLite's writer)
        completing.commit()
    operator.join(30)
    assert deleted.is_set()
    assert set(states(database).values()) == {"dead"}


async def test_a_parked_outcome_written_after_the_repair_leaves_the_delivery_due(
    database: Database, secret_box: SecretBox
) -> None:
    """The token manager marked the grant dead and the worker queued a parked outcome; the operator
    repaired the grant before the outcome was written."""
    w = make_world(database)
    results = await three_calls(database, w)
    now, claimed = lease(database, 1)
    mark_reauth_required(database, w.credential_id)
    database.run_sync(lambda s: repair(s, secret_box, w.credential_id))

    outcome = parked_outcome(claimed[0], w.credential_id)
    # The worker counts and wakes for what was written, so the answer says "pending", not "parked".
    assert database.run_sync(lambda s: complete_many(s, [outcome], now=now)) == ["pending"]
    assert states(database) == {r.delivery_ids[0]: "pending" for r in results}
    due = database.run_sync(lambda s: s.get(Delivery, claimed[0].id))
    assert due is not None and due.next_attempt_at == now and due.lease_owner is None


@pytest.mark.parametrize("repaired", [False, True])
async def test_the_worker_counts_and_wakes_for_the_state_written(
    database: Database, secret_box: SecretBox, repaired: bool
) -> None:
    """The worker's attempt met the dead grant; when the operator repaired it before the outcome was
    stored, the delivery is due again: the metrics say ``pending``, not ``parked``, and the worker's
    loop is woken to send it, instead of waiting for its next look at the due times."""
    w = make_world(database)
    await three_calls(database, w)
    now, claimed = lease(database, 1)
    mark_reauth_required(database, w.credential_id)
    if repaired:
        database.run_sync(lambda s: repair(s, secret_box, w.credential_id))
    metrics = Metrics(database)
    worker = finishing_worker(database, metrics)
    worker._wake.clear()
    parked = _Result(state="parked", outcome="parked", error="re-authorisation required: invalid_grant")
    await asyncio.wait_for(worker._finish(claimed[0], parked, now, 1), 10)
    written = "pending" if repaired else "parked"
    assert database.run_sync(lambda s: s.get(Delivery, claimed[0].id)).state == written  # type: ignore[union-attr]
    counted = {
        state: metrics.registry.get_sample_value("cti_bridge_deliveries_finished_total", {"state": state})
        for state in ("parked", "pending")
    }
    assert counted == {written: 1.0, ({"parked", "pending"} - {written}).pop(): None}
    assert worker._wake.is_set() is repaired


async def test_a_parked_outcome_while_the_grant_is_still_dead_parks_the_user(database: Database) -> None:
    w = make_world(database)
    await three_calls(database, w)
    now, claimed = lease(database, 1)
    mark_reauth_required(database, w.credential_id)
    outcome = parked_outcome(claimed[0], w.credential_id)
    assert database.run_sync(lambda s: complete_many(s, [outcome], now=now)) == ["parked"]
    assert set(states(database).values()) == {"parked"}


def two_users_world(s: Session) -> tuple[int, int, int]:
    """One integration, one mapping, anne and bob with credentials (anne's id the lower)."""
    xc = XelionContext(host="xelion.example", tenant="t", admin_username="admin", admin_password_enc="x")
    s.add(xc)
    s.flush()
    assert xc.id is not None
    crm = CrmContext(xelion_context_id=xc.id, authorization_server_uri="https://crm.example/token")
    s.add(crm)
    s.flush()
    assert crm.id is not None
    s.add(EventUriMapping(crm_context_id=crm.id, xelion_event=KIND, crm_resource_uri="https://crm.example/c"))
    y = UserCredentials(crm_context_id=crm.id, xelion_username="anne")
    s.add(y)
    s.flush()
    x = UserCredentials(crm_context_id=crm.id, xelion_username="bob")
    s.add(x)
    s.flush()
    assert y.id is not None and x.id is not None
    return xc.id, y.id, x.id


def while_a_repair_commits(database: Database, box: SecretBox, credential_id: int, work: object) -> object:
    """Run ``work(session)`` in another thread while the repair's transaction is open here; commit
    the repair after a moment. Returns what ``work`` returned, and whether it had returned before
    the repair committed."""
    assert callable(work)
    outcome: dict[str, object] = {}
    committed = threading.Event()

    def other() -> None:
        outcome["result"] = database.run_sync(work)
        outcome["before_commit"] = not committed.is_set()

    with Session(database.engine) as repairing:
        repair(repairing, box, credential_id)
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(0.5)  # a write that does not wait for the repair is done by now
        committed.set()
        repairing.commit()
    thread.join(10)
    assert not thread.is_alive()
    return outcome


async def test_an_ingest_reading_a_dead_grant_during_the_repair_waits_for_it(
    database: Database, secret_box: SecretBox
) -> None:
    if database.is_sqlite:
        pytest.skip("SQLite has one writer at a time (BEGIN IMMEDIATE): a repair and a batch cannot overlap")
    w = make_world(database)
    mark_reauth_required(database, w.credential_id)
    outcome = while_a_repair_commits(
        database, secret_box, w.credential_id, lambda s: inactive_credentials(s, [w.credential_id])
    )
    # Without waiting, the batch saw the dead grant and started its deliveries parked, after the
    # repair had resumed the parked ones it could see.
    assert outcome == {"result": {}, "before_commit": False}


async def test_a_parked_outcome_written_during_the_repair_waits_for_it(
    database: Database, secret_box: SecretBox
) -> None:
    if database.is_sqlite:
        pytest.skip("SQLite has one writer at a time: a repair and a completion cannot overlap")
    w = make_world(database)
    results = await three_calls(database, w)
    now, claimed = lease(database, 1)
    mark_reauth_required(database, w.credential_id)
    outcome = parked_outcome(claimed[0], w.credential_id)
    done = while_a_repair_commits(
        database, secret_box, w.credential_id, lambda s: complete_many(s, [outcome], now=now)
    )
    assert done == {"result": ["pending"], "before_commit": False}
    assert states(database) == {r.delivery_ids[0]: "pending" for r in results}


async def test_an_ingest_and_a_parking_completion_do_not_deadlock(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: an ingest batch holds a share lock on a dead credential X (``inactive_credentials``)
    while a completion parks Y and X. The completion locks its credentials in id order, so it holds Y
    and waits for X; the ingest then inserts a delivery of Y, whose foreign-key check takes a
    key-share lock on Y. With FOR UPDATE on the credentials that check waited for the completion,
    and the completion for the ingest: a deadlock, which aborted the completion (its outcomes
    unrecorded, the deliveries sent again after their lease). FOR NO KEY UPDATE lets the check by."""
    if database.is_sqlite:
        pytest.skip("SQLite has one writer at a time: an ingest and a completion cannot overlap")

    ctx, y, x = database.run_sync(two_users_world)
    assert y < x
    p = pipeline(database)
    await p.submit(ctx, KIND, {"callId": "c1", "calleeUser": "anne"})
    await p.submit(ctx, KIND, {"callId": "c2", "calleeUser": "bob"})
    now = utcnow() + timedelta(seconds=1)
    claimed = {
        c.credential_id: c
        for c in database.run_sync(lambda s: claim_due(s, now=now, limit=10, lease_seconds=LEASE))
    }
    assert set(claimed) == {x, y}
    mark_reauth_required(database, x)

    outcome: dict[str, object] = {}

    def completion() -> None:
        parked = [parked_outcome(claimed[c], c, "re-authorisation required") for c in (y, x)]
        try:
            outcome["completion"] = database.run_sync(lambda s: complete_many(s, parked, now=now))
        except Exception as exc:
            outcome["completion"] = type(exc).__name__

    completing = threading.Thread(target=completion)
    real = pipeline_module.inactive_credentials

    def then_ys_grant_dies_and_a_completion_parks(
        session: Session, ids: Sequence[int]
    ) -> dict[int, str | None]:
        found = real(session, ids)  # FOR SHARE on x, the dead one
        mark_reauth_required(database, y)  # the token manager: anne's grant died a moment ago
        completing.start()
        completing.join(0.3)  # the completion now holds y and waits for x
        return found

    monkeypatch.setattr(pipeline_module, "inactive_credentials", then_ys_grant_dies_and_a_completion_parks)
    batch = [
        (ctx, KIND, {"callId": "c3", "calleeUser": "anne"}),
        (ctx, KIND, {"callId": "c4", "calleeUser": "bob"}),
    ]
    database.run_sync(lambda s: p._ingest_batch(s, batch, None))  # inserts a delivery of y
    completing.join(10)
    assert outcome == {"completion": ["parked", "parked"]}
    assert set(states(database).values()) == {"parked"}


async def test_two_completions_parking_different_users_do_not_deadlock(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL, two replicas: one batch parks anne and holds a retry of bob's, the other parks bob
    and holds a delivered one of anne's. Parking took each user's other rows after the batch's own,
    in opposite orders: a deadlock, which aborted one batch. The rows a batch will park are now
    locked with its own, in one statement in id order, so one batch waits for the other."""
    if database.is_sqlite:
        pytest.skip("SQLite has one writer at a time: two completions cannot overlap")
    ctx, anne, bob = database.run_sync(two_users_world)
    p = pipeline(database)
    for i, user in enumerate(("anne", "anne", "bob", "bob")):
        await p.submit(ctx, KIND, {"callId": f"c{i}", "calleeUser": user})
    now = utcnow() + timedelta(seconds=1)
    leased = database.run_sync(lambda s: claim_due(s, now=now, limit=10, lease_seconds=LEASE))
    annes = [c for c in leased if c.credential_id == anne]
    bobs = [c for c in leased if c.credential_id == bob]
    mark_reauth_required(database, anne)
    mark_reauth_required(database, bob)

    def done(c: Claimed, state: str, parks: int | None = None) -> Completion:
        return Completion(
            c.id, c.claim, state, attempt(state), next_attempt_at=now if state == "pending" else None,
            credential_id=parks, park_reason="re-authorisation required",
        )  # fmt: skip

    batches = {
        "one": [done(annes[0], "parked", anne), done(bobs[0], "pending")],
        "two": [done(bobs[1], "parked", bob), done(annes[1], "delivered")],
    }
    both_at_parking = threading.Barrier(2)
    real_park = deliveries_module.park_credential

    def park_once_both_got_here(session: Session, **kw: Any) -> int:
        # Without the shared lock both batches get here, each holding its own rows: the deadlock.
        # With it the second waits in its first statement, and this wait just times out.
        with contextlib.suppress(threading.BrokenBarrierError):
            both_at_parking.wait(1.0)
        return int(real_park(session, **kw))

    monkeypatch.setattr(deliveries_module, "park_credential", park_once_both_got_here)
    outcome: dict[str, object] = {}

    def run(name: str) -> None:
        try:
            outcome[name] = database.run_sync(lambda s: complete_many(s, batches[name], now=now))
        except Exception as exc:
            outcome[name] = type(exc).__name__

    threads = [threading.Thread(target=run, args=(name,)) for name in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    # Both committed whole (a deadlock aborts one: its value would name the error). Parking leaves
    # the other batch's in-flight delivery alone: its own outcome decides.
    assert outcome == {"one": ["parked", "pending"], "two": ["parked", "delivered"]}
    final = states(database)
    assert final[annes[1].id] == "delivered"
    assert final[annes[0].id] == final[bobs[1].id] == "parked"
    # bob's retry is parked if bob's parking came after it, else it parks on its next attempt.
    assert final[bobs[0].id] in ("parked", "pending")


async def test_parking_leaves_a_delivery_in_flight_to_its_own_outcome(database: Database) -> None:
    """Two of anne's deliveries are in flight when the first meets her dead grant. Parking took the
    second's lease too, so its 2xx answer was not recorded (the claim no longer held) and it was sent
    again once the grant was repaired. Now its own outcome stands."""
    w = make_world(database)
    results = await three_calls(database, w)
    now, (first, second) = lease(database, 2)
    mark_reauth_required(database, w.credential_id)
    parked = parked_outcome(first, w.credential_id)
    assert database.run_sync(lambda s: complete_many(s, [parked], now=now)) == ["parked"]
    delivered = Completion(second.id, second.claim, "delivered", attempt())
    assert database.run_sync(lambda s: complete_many(s, [delivered], now=now)) == ["delivered"]
    final = states(database)
    assert final[second.id] == "delivered"
    assert final[first.id] == "parked"
    third = next(r.delivery_ids[0] for r in results if r.delivery_ids[0] not in (first.id, second.id))
    assert final[third] == "parked"  # the one waiting to be sent
