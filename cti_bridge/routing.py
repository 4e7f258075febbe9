"""Which CRM requests an event makes: the integration's CRM contexts, their compiled mappings and
their users' credentials, cached in memory so that an event costs no configuration queries.

Mapping rows are immutable (a PUT retires them and inserts new rows), so compiled mappings are
cached by id forever. The per-integration routing snapshot is dropped whenever the admin API
reports a change (``invalidate``); a short time-to-live bounds staleness for changes made by another
replica on a shared PostgreSQL database.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlmodel import Session, col, select

from cti_bridge.el import TemplateError
from cti_bridge.render import CompiledMapping, MappingSpec, compile_mapping
from cti_bridge.store.models import CrmContext, EventUriMapping, UserCredentials

log = logging.getLogger(__name__)


def spec_of(row: EventUriMapping) -> MappingSpec:
    """The template-language view of a stored mapping row."""
    headers: Mapping[str, str] | None = json.loads(row.headers) if row.headers else None
    payload: object = json.loads(row.crm_resource_payload) if row.crm_resource_payload is not None else None
    return MappingSpec(
        xelion_event=row.xelion_event,
        crm_resource_uri=row.crm_resource_uri,
        crm_resource_payload=payload,
        method=row.method,
        headers=headers,
        content_type=row.content_type,
        condition=row.condition,
    )


@dataclass(frozen=True)
class CredentialRoute:
    credential_id: int
    xelion_username: str
    xelion_oid: str | None


@dataclass(frozen=True)
class MappingRoute:
    mapping_id: int
    compiled: CompiledMapping


class EventMappings:
    """The mappings of one event type of one CRM context, in order, with those whose condition is
    ``name == 'text'`` indexed by the text (``render._name_equals_string``): an event is matched
    against many such mappings (one per number or queue) with one lookup per name instead of one
    condition per mapping, so its cost does not grow with their number.
    """

    __slots__ = ("_by_name", "_general", "routes")

    def __init__(self, routes: list[MappingRoute]) -> None:
        self.routes = routes
        self._general: list[tuple[int, MappingRoute]] = []
        # name -> (text -> mappings), and every mapping of the name (for a value that is not a string)
        self._by_name: dict[
            str, tuple[dict[str, list[tuple[int, MappingRoute]]], list[tuple[int, MappingRoute]]]
        ] = {}
        for pos, route in enumerate(routes):
            equals = route.compiled.condition_equals
            if equals is None:
                self._general.append((pos, route))
                continue
            name, text = equals
            table, every = self._by_name.setdefault(name, ({}, []))
            table.setdefault(text, []).append((pos, route))
            every.append((pos, route))

    def applicable(self, names: dict[str, object]) -> list[tuple[MappingRoute, TemplateError | None]]:
        """The mappings whose condition holds for ``names`` (``render.context_names``), in order,
        and those whose condition could not be evaluated, with the error (a dead delivery)."""
        found: list[tuple[int, MappingRoute, TemplateError | None]] = []
        for pos, route in self._general:
            try:
                if route.compiled.condition_holds_in(names):
                    found.append((pos, route, None))
            except TemplateError as exc:
                found.append((pos, route, exc))
        for name, (table, every) in self._by_name.items():
            value = names.get(name)
            if type(value) is str:
                found += [(pos, route, None) for pos, route in table.get(value, ())]
            elif value is not None:  # a number, a boolean...: EL's coercions decide, so evaluate
                for pos, route in every:
                    try:
                        if route.compiled.condition_holds_in(names):
                            found.append((pos, route, None))
                    except TemplateError as exc:
                        found.append((pos, route, exc))
            # null == 'text' is false: none of them
        if len(self._by_name) + bool(self._general) > 1:
            found.sort(key=lambda f: f[0])
        return [(route, error) for _, route, error in found]


@dataclass
class CrmRoute:
    crm_context_id: int
    # What a handed-off delivery needs without a query (pipeline.py); claims read it from the row.
    authorization_header_prefix: str = "Bearer "
    mappings: dict[str, EventMappings] = field(default_factory=dict)  # by xelionEvent
    by_username: dict[str, CredentialRoute] = field(default_factory=dict)
    by_oid: dict[str, CredentialRoute] = field(default_factory=dict)


@dataclass
class Routing:
    xelion_context_id: int
    crms: list[CrmRoute]
    loaded_at: float


#: Compiled mappings kept at most. Every PUT of a context's mappings makes new rows (the old ones
#: are retired, still compiled for their deliveries), so a script that PUTs the same mappings
#: every minute added thousands a day, for the process's life. Past the bound the oldest quarter
#: is dropped; a mapping still in use is compiled again from its row when next needed.
MAX_COMPILED = 4096


class MappingCache:
    """Compiled mappings by id: compiled once per mapping row, while it is among the newest
    ``max_compiled``."""

    def __init__(self, max_compiled: int = MAX_COMPILED) -> None:
        self._compiled: dict[int, CompiledMapping] = {}
        self._lock = threading.Lock()
        self._max = max_compiled

    def peek(self, mapping_id: int) -> CompiledMapping | None:
        """The compiled mapping if it is cached (no database access)."""
        return self._compiled.get(mapping_id)

    def get(self, session: Session, mapping_id: int) -> CompiledMapping:
        found = self._compiled.get(mapping_id)
        if found is not None:
            return found
        row = session.get(EventUriMapping, mapping_id)
        if row is None:
            raise LookupError(f"mapping {mapping_id} does not exist")
        return self.put(row)

    def put(self, row: EventUriMapping) -> CompiledMapping:
        assert row.id is not None
        compiled = compile_mapping(spec_of(row))
        with self._lock:
            self._compiled[row.id] = compiled
            if len(self._compiled) > self._max:
                # Insertion order: the least recently compiled first.
                for old in list(self._compiled)[: len(self._compiled) - self._max * 3 // 4]:
                    del self._compiled[old]
        return compiled

    def __len__(self) -> int:
        return len(self._compiled)


class RoutingCache:
    """Routing snapshots per integration, loaded lazily, dropped on change or after ``ttl`` seconds."""

    def __init__(self, mappings: MappingCache, ttl: float = 10.0) -> None:
        self.mappings = mappings
        self.ttl = ttl
        self._routes: dict[int, Routing] = {}
        self._lock = threading.Lock()

    def invalidate(self, xelion_context_id: int | None = None) -> None:
        with self._lock:
            if xelion_context_id is None:
                self._routes.clear()
            else:
                self._routes.pop(xelion_context_id, None)

    def get(self, session: Session, xelion_context_id: int) -> Routing:
        now = time.monotonic()
        found = self._routes.get(xelion_context_id)
        if found is not None and now - found.loaded_at < self.ttl:
            return found
        routing = self._load(session, xelion_context_id, now)
        with self._lock:
            self._routes[xelion_context_id] = routing
        return routing

    def _load(self, session: Session, xelion_context_id: int, now: float) -> Routing:
        crms: list[CrmRoute] = []
        contexts = session.exec(
            select(CrmContext).where(col(CrmContext.xelion_context_id) == xelion_context_id)
        ).all()
        for ctx in contexts:
            assert ctx.id is not None
            route = CrmRoute(
                crm_context_id=ctx.id, authorization_header_prefix=ctx.authorization_header_prefix
            )
            # Ids and event types first; whole rows only for mappings not compiled yet (rows are
            # immutable, so a compiled one is current).
            listed = session.execute(
                select(EventUriMapping.id, EventUriMapping.xelion_event)
                .where(col(EventUriMapping.crm_context_id) == ctx.id, col(EventUriMapping.retired).is_(False))
                .order_by(col(EventUriMapping.position), col(EventUriMapping.id))
            ).all()
            compiled: dict[int, CompiledMapping] = {}
            for mapping_id, _ in listed:
                if (found := self.mappings.peek(mapping_id)) is not None:
                    compiled[mapping_id] = found
            missing = [mapping_id for mapping_id, _ in listed if mapping_id not in compiled]
            if missing:
                for row in session.exec(select(EventUriMapping).where(col(EventUriMapping.id).in_(missing))):
                    assert row.id is not None
                    try:
                        compiled[row.id] = self.mappings.put(row)
                    except TemplateError as exc:
                        # Saved by an earlier release whose compiler took it (saving compiles
                        # with this one): left out of routing, loudly, at every reload. Raised
                        # here, it failed the ingest of every event of the integration, and the
                        # calls of its other mappings and CRMs were lost with it.
                        log.error(
                            "integration %d: mapping %d (%s) does not compile with this release and "
                            "is left out; its events make no delivery until it is saved again: %s",
                            xelion_context_id,
                            row.id,
                            row.xelion_event,
                            exc,
                        )
            by_event: dict[str, list[MappingRoute]] = {}
            for mapping_id, xelion_event in listed:
                if (one := compiled.get(mapping_id)) is not None:
                    by_event.setdefault(xelion_event, []).append(MappingRoute(mapping_id, one))
            route.mappings = {event: EventMappings(ms) for event, ms in by_event.items()}
            # Three columns, not the rows: a tenant's thousand users are read at every reload, in
            # an ingest transaction, and whole ORM rows (with their encrypted tokens) cost ~10x.
            creds = session.execute(
                select(UserCredentials.id, UserCredentials.xelion_username, UserCredentials.xelion_oid).where(
                    col(UserCredentials.crm_context_id) == ctx.id
                )
            ).all()
            for cred_id, username, oid in creds:
                cr = CredentialRoute(credential_id=cred_id, xelion_username=username, xelion_oid=oid)
                route.by_username[username] = cr
                if oid:
                    route.by_oid[oid] = cr
            crms.append(route)
        return Routing(xelion_context_id=xelion_context_id, crms=crms, loaded_at=now)
