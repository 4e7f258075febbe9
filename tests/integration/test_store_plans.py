"""How SQLite runs the per-batch queries of the delivery path (store/deliveries.py): each must seek
an index by its keys, never walk the backlog, or ingest slows down in step with the undelivered
deliveries exactly when they pile up (a CRM outage, a replay of dead letters). SQLite keeps no
statistics here, so its plans do not depend on the rows: an empty database shows them."""

from __future__ import annotations

from sqlmodel import Session

from cti_bridge.store.db import Database
from cti_bridge.store.deliveries import pending_keys, undelivered_keys


def plans_of(database: Database, run: object) -> list[str]:
    """The query plan of every statement ``run(session)`` executes."""
    executed: list[str] = []
    with database.session() as session:
        driver = session.connection().connection.driver_connection
        driver.set_trace_callback(executed.append)  # type: ignore[union-attr]
        try:
            run(session)  # type: ignore[operator]
        finally:
            driver.set_trace_callback(None)  # type: ignore[union-attr]
        plans = []
        for sql in executed:
            if sql.lstrip().upper().startswith("SELECT"):
                rows = driver.execute("EXPLAIN QUERY PLAN " + sql).fetchall()  # type: ignore[union-attr]
                plans.append(" / ".join(str(r[3]) for r in rows))
    return plans


def test_the_ordering_key_lookups_seek_ix_delivery_order(sqlite_database: Database) -> None:
    keys = [f"call-{i}|{i % 7}" for i in range(40)]

    def lookups(session: Session) -> None:
        undelivered_keys(session, keys)
        pending_keys(session, keys)

    plans = plans_of(sqlite_database, lookups)
    assert len(plans) == 2, plans
    for plan in plans:
        assert "USING INDEX ix_delivery_order (ordering_key=?)" in plan, plan
        assert "ix_delivery_due" not in plan, plan
