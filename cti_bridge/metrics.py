"""Prometheus metrics (reliability.md §21), served as text at ``api/metrics``.

Counters live in the process (attempts by status class, token refreshes, finished deliveries,
source reconnects). Figures that the database knows better (deliveries by state, the age of the
oldest due delivery, credentials and app contexts needing re-authorisation, source states) are
read at scrape time by a collector, so they are right even after a restart or with several
replicas. The process's
own figures come from prometheus_client's standard collectors: resident memory and CPU seconds
(``process_*``) and the garbage collector's collections per generation (``python_gc_*``: the
daemon freezes its start-up heap, cli.tune_gc, and an operator can see what collections remain).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, GCCollector, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlmodel import Session, col

from cti_bridge.clock import utcnow
from cti_bridge.ports import STATE_REAUTH_REQUIRED
from cti_bridge.store.db import Database
from cti_bridge.store.deliveries import STATES
from cti_bridge.store.models import AppContext, Delivery, UserCredentials, XelionContext

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def status_class(status: int | None) -> str:
    return "error" if status is None else f"{status // 100}xx"


#: The re-authorisation gauges: per kind of credential, its table, the metric and its help.
_REAUTH_GAUGES: tuple[tuple[type[UserCredentials] | type[AppContext], str, str], ...] = (
    (
        UserCredentials,
        "cti_bridge_credentials_reauth_required",
        "User credentials whose grant is dead (re-authorise)",
    ),
    (
        AppContext,
        "cti_bridge_app_contexts_reauth_required",
        "App contexts (external API access) whose grant is dead (set a new secret)",
    ),
)


class _StoreCollector(Collector):
    def __init__(self, db: Database, sources: Callable[[], dict[int, tuple[str, int]]] | None) -> None:
        self.db = db
        self.sources = sources

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with Session(self.db.engine) as session:
            yield from self._collect(session)

    def _collect(self, session: Session) -> Iterator[GaugeMetricFamily]:
        by_state = GaugeMetricFamily("cti_bridge_deliveries", "Deliveries by state", labels=["state"])
        counts: dict[str, int] = {
            str(state): int(n)
            for state, n in session.execute(
                select(col(Delivery.state), func.count()).group_by(col(Delivery.state))
            )
        }
        for state in STATES:
            by_state.add_metric([state], float(counts.get(state, 0)))
        yield by_state
        oldest = session.execute(
            select(func.min(Delivery.next_attempt_at)).where(col(Delivery.state) == "pending")
        ).scalar_one_or_none()
        age = GaugeMetricFamily(
            "cti_bridge_oldest_due_delivery_age_seconds", "Age of the oldest due pending delivery"
        )
        age.add_metric([], max(0.0, (utcnow() - oldest).total_seconds()) if oldest else 0.0)
        yield age
        # Both kinds of credential die alike, and silently: the external API's app users
        # (``cti-app-context``) too, every call of the app refused until an operator sets a new secret.
        for model, name, help_text in _REAUTH_GAUGES:
            dead = session.execute(
                select(func.count()).select_from(model).where(col(model.state) == STATE_REAUTH_REQUIRED)
            ).scalar_one()
            fam = GaugeMetricFamily(name, help_text)
            fam.add_metric([], float(dead))
            yield fam
        states = GaugeMetricFamily(
            "cti_bridge_source_up",
            "1 when the integration's websocket is subscribed",
            labels=["xelion_context_id", "state"],
        )
        rows = session.execute(select(col(XelionContext.id), col(XelionContext.source_state))).all()
        live = self.sources() if self.sources else {}
        reconnects = GaugeMetricFamily(
            "cti_bridge_source_reconnects",
            "Reconnects of the integration's websocket since start",
            labels=["xelion_context_id"],
        )
        for ctx_id, state in rows:
            state_now, count = live.get(int(ctx_id), (state, 0))
            states.add_metric([str(ctx_id), state_now], 1.0 if state_now == "subscribed" else 0.0)
            reconnects.add_metric([str(ctx_id)], float(count))
        yield states
        yield reconnects


class Metrics:
    """The daemon's metrics registry: one per app, never module-global (tests stay independent)."""

    def __init__(self, db: Database, sources: Callable[[], dict[int, tuple[str, int]]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.attempts = Counter(
            "cti_bridge_delivery_attempts",
            "Delivery attempts by HTTP status class",
            ["status_class"],
            registry=self.registry,
        )
        self.finished_total = Counter(
            "cti_bridge_deliveries_finished",
            "Delivery attempts by resulting state",
            ["state"],
            registry=self.registry,
        )
        # Attempts that ended before any request: the CRM saw nothing, so the status classes above
        # do not count them, and a rise of dead or parked deliveries would otherwise have no cause.
        self.not_sent_counter = Counter(
            "cti_bridge_delivery_not_sent",
            "Delivery attempts that ended before a request, by reason "
            "(credentials, mapping, reauth_required, token_endpoint, render, lease)",
            ["reason"],
            registry=self.registry,
        )
        self.refreshes = Counter(
            "cti_bridge_token_refreshes", "Token endpoint calls by result", ["result"], registry=self.registry
        )
        self.events = Counter(
            "cti_bridge_events", "Call events received by result", ["result"], registry=self.registry
        )
        self.pruned = Counter(
            "cti_bridge_retention_deleted",
            "Rows the retention job deleted, by kind (deliveries, attempts, events, gaps)",
            ["kind"],
            registry=self.registry,
        )
        # The store's gauges in a registry of their own: rendered from a database thread, and left
        # out (``cti_bridge_database_up 0``) when the database does not answer, so that the
        # in-process counters and the process metrics are still scraped during an outage.
        self.store_registry = CollectorRegistry(auto_describe=False)
        self.store_registry.register(_StoreCollector(db, sources))
        # Counted per event and per delivery: each labelled child is looked up once, not per count
        # (``labels()`` validates the label values and takes a lock on every call).
        self._children: dict[tuple[Counter, str], Any] = {}

    def _inc(self, counter: Counter, label: str) -> None:
        child = self._children.get((counter, label))
        if child is None:
            child = self._children[(counter, label)] = counter.labels(label)
        child.inc()

    def attempt(self, status: int | None) -> None:
        self._inc(self.attempts, status_class(status))

    def not_sent(self, reason: str) -> None:
        self._inc(self.not_sent_counter, reason)

    def finished(self, state: str) -> None:
        self._inc(self.finished_total, state)

    def event(self, duplicate: bool) -> None:
        self._inc(self.events, "duplicate" if duplicate else "stored")

    def render(self) -> bytes:
        """Everything, the store's gauges included (reads the database: call it off the loop)."""
        return self.render_process() + self.render_store()

    def render_process(self) -> bytes:
        """The in-process counters and the process metrics: no database read."""
        return generate_latest(self.registry)

    def render_store(self) -> bytes:
        """The store's gauges and ``cti_bridge_database_up 1`` (reads the database)."""
        return generate_latest(self.store_registry) + _database_up(1)


def _database_up(value: int) -> bytes:
    return (
        b"# HELP cti_bridge_database_up 1 when the database answered this scrape\n"
        b"# TYPE cti_bridge_database_up gauge\n"
        b"cti_bridge_database_up " + (b"1.0" if value else b"0.0") + b"\n"
    )


#: What the scrape says of the store when the database does not answer.
DATABASE_DOWN = _database_up(0)
