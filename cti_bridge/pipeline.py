"""From a call event to deliveries, in one transaction (DESIGN.md §1, reliability.md §1-§2).

For each event: deduplicate by its key; for each CRM context of the integration, find the parties
that have credentials there (xelion-protocol.md §4), the mappings for that ``xelionEvent`` whose
``condition`` holds, and create one delivery per (event, mapping, user). The event and its
deliveries commit together, so an event counts as received only once nothing of it can be lost.
A condition that cannot be evaluated makes a dead delivery with the error and blocks nothing else.
Deliveries of a credential that needs re-authorisation start ``parked`` (its state is read in the
event's transaction, see ``_park_if_reauth_required``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from sqlmodel import Session, col, select

from cti_bridge.clock import Clock, SystemClock, xelion_time
from cti_bridge.el import TemplateError
from cti_bridge.events import dedupe_key, parties
from cti_bridge.render import RenderContext
from cti_bridge.routing import CredentialRoute, CrmRoute, RoutingCache
from cti_bridge.store.db import Database
from cti_bridge.store.deliveries import NewDelivery, insert_deliveries, insert_event
from cti_bridge.store.models import UserCredentials

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    event_id: int | None  # None: a duplicate
    delivery_ids: tuple[str, ...]

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

    The state is read here, in the event's transaction, not from the routing snapshot: the worker
    changes it (a dead grant) without telling the routing cache, and another replica's operator
    change reaches this one's cache only after its time-to-live. A stale snapshot started new
    deliveries ``pending`` behind parked ones of the same call (claimable never, shown as due), or
    ``parked`` for a credential already repaired (and nothing would ever resume them).
    """
    ids = {d.credential_id for d in new if d.state == "pending"}
    if not ids:
        return new
    reasons = {
        int(cred_id): reason
        for cred_id, reason in session.execute(
            select(col(UserCredentials.id), col(UserCredentials.state_reason)).where(
                col(UserCredentials.id).in_(ids), col(UserCredentials.state) != "active"
            )
        )
    }
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


class Pipeline:
    """Turns call events into stored deliveries and wakes the worker."""

    def __init__(
        self,
        db: Database,
        routing: RoutingCache,
        *,
        clock: Clock | None = None,
        on_committed: Callable[[IngestResult], None] | None = None,
    ) -> None:
        self.db = db
        self.routing = routing
        self.clock = clock or SystemClock()
        self.on_committed = on_committed

    async def ingest(
        self, xelion_context_id: int, notification_type: str, fields: dict[str, object]
    ) -> IngestResult:
        """Store the event and its deliveries; returns after the commit.

        Cancellation: the database work, once started, finishes (commit or rollback) in its thread;
        the caller just stops waiting for it.
        """
        result = await self.db.run(
            lambda s: self.ingest_sync(s, xelion_context_id, notification_type, fields)
        )
        if self.on_committed is not None:
            self.on_committed(result)
        return result

    def ingest_sync(
        self, session: Session, xelion_context_id: int, notification_type: str, fields: dict[str, object]
    ) -> IngestResult:
        now = self.clock.now()
        call_id = str(fields.get("callId") or "")
        event_id = insert_event(
            session,
            xelion_context_id=xelion_context_id,
            notification_type=notification_type,
            call_id=call_id,
            dedupe_key=dedupe_key(xelion_context_id, notification_type, fields),
            payload=fields,
            now=now,
        )
        if event_id is None:
            log.info("duplicate %s for call %s ignored", notification_type, call_id)
            return IngestResult(None, ())
        routing = self.routing.get(session, xelion_context_id)
        found = parties(fields)
        new: list[NewDelivery] = []
        now_text = xelion_time(now)
        for crm in routing.crms:
            mappings = crm.mappings.get(notification_type)
            if not mappings:
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
                for m in mappings:
                    state, error = "pending", None
                    try:
                        if not m.compiled.condition_holds(ctx):
                            continue
                    except TemplateError as exc:
                        state, error = "dead", f"condition: {exc}"
                    new.append(
                        NewDelivery(
                            crm_context_id=crm.crm_context_id,
                            mapping_id=m.mapping_id,
                            credential_id=cred.credential_id,
                            xelion_username=cred.xelion_username,
                            user_role=party.role,
                            state=state,
                            last_error=error,
                        )
                    )
        new = _park_if_reauth_required(session, new)
        ids = insert_deliveries(
            session,
            event_id=event_id,
            xelion_context_id=xelion_context_id,
            call_id=call_id,
            deliveries=new,
            now=now,
        )
        return IngestResult(event_id, tuple(ids))
