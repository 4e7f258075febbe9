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
import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlmodel import Session, col

from cti_bridge.clock import utcnow
from cti_bridge.store.crypto import SecretBox
from cti_bridge.store.db import Database
from cti_bridge.store.deliveries import (
    Completion,
    claim_due,
    complete_many,
    inactive_credentials,
    park_credential,
)
from cti_bridge.store.integrations import update_secret
from cti_bridge.store.models import Delivery, UserCredentials
from tests.integration.test_delivery_batching import KIND, LEASE, attempt, fields, make_world, pipeline


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


async def test_the_repair_resumes_parked_deliveries_in_its_own_transaction(
    database: Database, secret_box: SecretBox
) -> None:
    w = make_world(database)
    p = pipeline(database)
    results = await asyncio.gather(*(p.submit(w.xelion_context_id, KIND, fields(f"c{i}")) for i in range(3)))
    mark_reauth_required(database, w.credential_id)
    database.run_sync(
        lambda s: park_credential(s, credential_id=w.credential_id, reason="dead", now=utcnow())
    )
    assert set(states(database).values()) == {"parked"}

    database.run_sync(lambda s: repair(s, secret_box, w.credential_id))
    # Nothing else ran (the admin API's background task, a worker): the commit itself resumed them.
    assert states(database) == {r.delivery_ids[0]: "pending" for r in results}


async def test_a_parked_outcome_written_after_the_repair_leaves_the_delivery_due(
    database: Database, secret_box: SecretBox
) -> None:
    """The token manager marked the grant dead and the worker queued a parked outcome; the operator
    repaired the grant before the outcome was written."""
    w = make_world(database)
    p = pipeline(database)
    results = await asyncio.gather(*(p.submit(w.xelion_context_id, KIND, fields(f"c{i}")) for i in range(3)))
    now = utcnow() + timedelta(seconds=1)
    claimed = database.run_sync(lambda s: claim_due(s, now=now, limit=1, lease_seconds=LEASE))
    mark_reauth_required(database, w.credential_id)
    database.run_sync(lambda s: repair(s, secret_box, w.credential_id))

    outcome = Completion(
        claimed[0].id,
        claimed[0].claim,
        "parked",
        attempt("parked"),
        count_attempt=False,
        credential_id=w.credential_id,
        park_reason="re-authorisation required: invalid_grant",
    )
    assert database.run_sync(lambda s: complete_many(s, [outcome], now=now)) == [True]
    assert states(database) == {r.delivery_ids[0]: "pending" for r in results}
    due = database.run_sync(lambda s: s.get(Delivery, claimed[0].id))
    assert due is not None and due.next_attempt_at == now and due.lease_owner is None


async def test_a_parked_outcome_while_the_grant_is_still_dead_parks_the_user(database: Database) -> None:
    w = make_world(database)
    p = pipeline(database)
    await asyncio.gather(*(p.submit(w.xelion_context_id, KIND, fields(f"c{i}")) for i in range(3)))
    now = utcnow() + timedelta(seconds=1)
    claimed = database.run_sync(lambda s: claim_due(s, now=now, limit=1, lease_seconds=LEASE))
    mark_reauth_required(database, w.credential_id)
    outcome = Completion(
        claimed[0].id, claimed[0].claim, "parked", attempt("parked"), count_attempt=False,
        credential_id=w.credential_id, park_reason="re-authorisation required: invalid_grant",
    )  # fmt: skip
    assert database.run_sync(lambda s: complete_many(s, [outcome], now=now)) == [True]
    assert set(states(database).values()) == {"parked"}


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
    p = pipeline(database)
    results = await asyncio.gather(*(p.submit(w.xelion_context_id, KIND, fields(f"c{i}")) for i in range(3)))
    now = utcnow() + timedelta(seconds=1)
    claimed = database.run_sync(lambda s: claim_due(s, now=now, limit=1, lease_seconds=LEASE))
    mark_reauth_required(database, w.credential_id)
    outcome = Completion(
        claimed[0].id, claimed[0].claim, "parked", attempt("parked"), count_attempt=False,
        credential_id=w.credential_id, park_reason="re-authorisation required: invalid_grant",
    )  # fmt: skip
    done = while_a_repair_commits(
        database, secret_box, w.credential_id, lambda s: complete_many(s, [outcome], now=now)
    )
    assert done == {"result": [True], "before_commit": False}
    assert states(database) == {r.delivery_ids[0]: "pending" for r in results}
