"""How the databases run the ingest's per-batch look-up of ordering keys (store/deliveries.py
``keys_in_states_sql``): it must seek ``ix_delivery_order`` by its keys, never walk the undelivered
deliveries, or ingest slows down in step with the backlog exactly when it piles up (a CRM outage, a
replay of dead letters).

Both planners preferred an index on ``state`` here: SQLite (which keeps no statistics for this
daemon, so its plan does not depend on the rows) ``ix_delivery_due``; PostgreSQL, with statistics
taken while the backlog was small, the partial credential index (then
``ix_delivery_credential_undelivered``, now ``ix_delivery_credential_waiting``). The test
builds that case: history delivered and analysed, then a backlog the statistics have not seen."""

from __future__ import annotations

from sqlalchemy import text
from sqlmodel import Session, col, update

from cti_bridge.store.db import Database
from cti_bridge.store.deliveries import (
    UNDELIVERED,
    _driver,
    _in_statement,
    keys_in_states_sql,
    pending_keys,
    undelivered_keys,
)
from cti_bridge.store.models import Delivery
from tests.integration.test_delivery_leases import World, make_world

HISTORY = 5000  # enough pages that PostgreSQL prefers an index to reading the table


def bulk_history(database: Database, world: World) -> None:
    """``HISTORY`` delivered events with one delivery each, in two statements (either database)."""
    ctx, crm, mapping, cred = (
        world.xelion_context_id,
        world.crm_context_id,
        world.mapping_id,
        world.credential_id,
    )
    series = f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {HISTORY}) "
    at = "'2026-01-01 00:00:00.000000'"
    with database.engine.begin() as conn:
        conn.execute(
            text(
                series + "INSERT INTO call_event (xelion_context_id, notification_type, call_id, dedupe_key, "
                "payload, duplicates, received_at) "
                f"SELECT {ctx}, 'callConnectedEvent', 'call-' || i, 'bulk-' || i, '{{}}', 0, {at} "
                "FROM n"
            )
        )
        conn.execute(
            text(
                "INSERT INTO delivery (id, event_id, xelion_context_id, crm_context_id, mapping_id, "
                "credential_id, xelion_username, user_role, call_id, ordering_key, state, attempts, "
                "next_attempt_at, created_at, updated_at) "
                f"SELECT 'bulk-' || id, id, {ctx}, {crm}, {mapping}, {cred}, "
                f"'anne', 'callee', call_id, call_id || '|{cred}', 'delivered', 1, {at}, {at}, {at} "
                "FROM call_event WHERE dedupe_key LIKE 'bulk-%'"
            )
        )


def explain(session: Session, sql: str, params: tuple[object, ...]) -> str:
    conn, drv = _driver(session)
    if drv.postgresql:
        return "\n".join(str(r[0]) for r in conn.rows("EXPLAIN " + sql, params))
    return "\n".join(str(r[3]) for r in conn.rows("EXPLAIN QUERY PLAN " + sql, params))


def test_the_ordering_key_look_up_seeks_ix_delivery_order_whatever_the_backlog(database: Database) -> None:
    world = make_world(database)
    bulk_history(database, world)
    if not database.is_sqlite:
        with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE delivery"))

    def backlog(session: Session) -> None:  # a CRM outage: half of it pending, unseen by ANALYZE
        session.execute(
            update(Delivery)
            .where(col(Delivery.call_id).in_([f"call-{i}" for i in range(0, HISTORY, 2)]))
            .values(state="pending")
        )

    database.run_sync(backlog)

    def check(session: Session) -> None:
        _, drv = _driver(session)
        keys = [f"call-{i}|{world.credential_id}" for i in range(2, 34, 2)]  # pending ones
        sql = _in_statement(drv, keys_in_states_sql(drv, len(UNDELIVERED)), len(keys))
        plan = explain(session, sql, (*keys, *UNDELIVERED))
        assert "ix_delivery_order" in plan, plan
        assert "ix_delivery_due" not in plan and "ix_delivery_credential" not in plan, plan
        # and it answers what it is asked
        delivered = f"call-1|{world.credential_id}"
        assert undelivered_keys(session, [*keys, delivered, "nobody|1"]) == set(keys)
        assert pending_keys(session, keys[:3]) == set(keys[:3])

    database.run_sync(check)
