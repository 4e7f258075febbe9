"""``api/deliveries``: see what was sent and what failed, replay and dismiss (beyond the manual).

Lists answer ``{"total": N, "offset": k, "items": [...], "next": cursor}`` (DESIGN.md §4, plus
``next``: a cursor for the page behind this one, stable while deliveries arrive; null on the last
page). A session token sees only
its own integration's deliveries; another integration's delivery id is a 404. Attempt records carry
request and response excerpts whose secrets were masked when they were recorded.

Bad input is refused before the database sees it, as on the manual's routes (``admin.common``): a
query value out of range or holding a NUL, or a date-time beyond what converts to UTC, is 422 naming
it; a delivery id that is not a UUID is 422 naming ``path.delivery_id`` (as a non-integer id is on
the manual's routes), an unknown one 404. The bulk replay reads its body through ``admin.body``, so
malformed JSON is 400 with the line and column.
"""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field
from sqlmodel import Session

from cti_bridge.admin.app import AdminDeps, get_deps
from cti_bridge.admin.auth import Principal, require_principal
from cti_bridge.admin.body import read_model
from cti_bridge.admin.common import MAX_ID, Offset, query_filter
from cti_bridge.errors import ApiError, ErrorCode, invalid_request, not_found
from cti_bridge.store import deliveries as store
from cti_bridge.store.models import CallEvent, Delivery, DeliveryAttempt, XelionContext

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/deliveries", tags=["deliveries"])


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _utc(name: str, dt: datetime | None) -> datetime | None:
    """``dt`` in UTC (naive means UTC). The columns hold UTC, so the database converts every bound
    date-time: one near year 1 or 9999 whose UTC falls outside the calendar is refused here, by name,
    rather than raising ``OverflowError`` in the driver (a 500)."""
    if dt is None:
        return None
    try:
        return dt.astimezone(UTC) if dt.tzinfo else dt.replace(tzinfo=UTC)
    except OverflowError:
        raise invalid_request(
            f"{name}: out of range", f"{name} must fall between the years 1 and 9999 in UTC"
        ) from None


def _parse_time(name: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise invalid_request(
            f"{name}: not a date-time", f"{name} must be ISO-8601, e.g. 2026-11-24T09:00:00Z"
        ) from None
    return _utc(name, dt)


def delivery_json(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "state": d.state,
        "xelionContextId": d.xelion_context_id,
        "crmContextId": d.crm_context_id,
        "mappingId": d.mapping_id,
        "eventId": d.event_id,
        "callId": d.call_id,
        "xelionUsername": d.xelion_username,
        "userCredentialsId": str(d.credential_id) if d.credential_id is not None else None,
        "role": d.user_role,
        "attempts": d.attempts,
        "nextAttemptAt": _iso(d.next_attempt_at) if d.state == "pending" else None,
        "lastStatus": d.last_status,
        "lastError": d.last_error,
        "createdAt": _iso(d.created_at),
        "updatedAt": _iso(d.updated_at),
        "deliveredAt": _iso(d.delivered_at),
    }


def attempt_json(a: DeliveryAttempt) -> dict[str, Any]:
    return {
        "attempt": a.attempt_no,
        "startedAt": _iso(a.started_at),
        "durationMs": a.duration_ms,
        "outcome": a.outcome,
        "httpStatus": a.http_status,
        "error": a.error,
        "request": {"method": a.request_method, "url": a.request_url, "bodyExcerpt": a.request_excerpt},
        "responseExcerpt": a.response_excerpt,
    }


def _scope(principal: Principal, xelion_context_id: int | None) -> int | None:
    if principal.xelion_context_id is not None:
        if xelion_context_id is not None and xelion_context_id != principal.xelion_context_id:
            raise not_found("integration", xelion_context_id)
        return principal.xelion_context_id
    return xelion_context_id


def _known(session: Session, principal: Principal, xelion_context_id: int | None) -> None:
    """An integration the operator names must exist (404): a mistyped id was answered with an
    empty list, or ``{"replayed": 0}``, as if it had nothing to show or replay (an operator
    walkthrough's finding). A session token's own integration is known."""
    if (
        principal.xelion_context_id is None
        and xelion_context_id is not None
        and session.get(XelionContext, xelion_context_id) is None
    ):
        raise not_found("integration", xelion_context_id)


Deps = Annotated[AdminDeps, Depends(get_deps)]
Auth = Annotated[Principal, Depends(require_principal)]
# Ids are UUIDs (``store.deliveries.new_delivery_id``); parsing the path as one keeps a NUL (which
# PostgreSQL cannot compare) and any other non-id away from the database. ``str()`` of the parsed
# value is the stored form.
DeliveryId = Annotated[UUID, Path(description="a delivery id (a UUID)")]


@router.get("", summary="List deliveries, newest first")
async def list_deliveries(
    deps: Deps,
    principal: Auth,
    state: Annotated[
        str | None, Query(description="pending, sending, delivered, dead, parked, dismissed")
    ] = None,
    xelionContextId: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    username: str | None = None,
    callId: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
    cursor: Annotated[
        str | None, Query(max_length=200, description="the previous page's `next`: the page behind it")
    ] = None,
) -> dict[str, Any]:
    # An empty filter filters nothing (common.query_filter).
    state, since, until = state or None, since or None, until or None
    if state is not None and state not in store.STATES:
        raise invalid_request("state: unknown state", f"state must be one of {', '.join(store.STATES)}")
    f = store.DeliveryFilter(
        state=state,
        xelion_context_id=_scope(principal, xelionContextId),
        username=query_filter(username, "username"),
        call_id=query_filter(callId, "callId"),
        since=_parse_time("since", since),
        until=_parse_time("until", until),
    )
    after = _read_cursor(cursor) if cursor is not None else None

    def listed(s: Session) -> tuple[int, list[Delivery], bool]:
        _known(s, principal, f.xelion_context_id)
        return store.list_deliveries(s, f, limit=limit, offset=offset, after=after)

    total, rows, more = await deps.database.run(listed)
    return {
        "total": total,
        "offset": offset,
        "items": [delivery_json(d) for d in rows],
        "next": _cursor_of(rows[-1]) if more else None,
    }


# Paging by offset shifts while deliveries arrive (a new one pushes every page down by one: an item
# shown twice, or, with filters on state, one skipped as others change state). ``next`` names the
# last item of the page instead, so the following page starts right behind it. Opaque to clients:
# base64url of "created_at|id".


def _cursor_of(d: Delivery) -> str:
    text = f"{d.created_at.astimezone(UTC).isoformat()}|{d.id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _read_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        at_text, id_text = text.split("|")
        at = datetime.fromisoformat(at_text)
        delivery_id = str(UUID(id_text))
        if at.utcoffset() != timedelta(0) or delivery_id != id_text:
            raise ValueError("not in the form this API writes")
    except (ValueError, UnicodeError):
        raise invalid_request(
            "cursor: not a cursor of this API",
            "cursor must be the `next` of an earlier page, as it was given",
        ) from None
    return at, delivery_id


async def _load(
    deps: AdminDeps, principal: Principal, delivery_id: str
) -> tuple[Delivery, CallEvent, list[DeliveryAttempt]]:
    found = await deps.database.run(lambda s: store.get_delivery(s, delivery_id))
    if found is None or (
        principal.xelion_context_id is not None and found[0].xelion_context_id != principal.xelion_context_id
    ):
        raise not_found("delivery", delivery_id)
    return found


@router.get("/{delivery_id}", summary="One delivery with its event and every attempt")
async def get_delivery(delivery_id: DeliveryId, deps: Deps, principal: Auth) -> dict[str, Any]:
    delivery, event, attempts = await _load(deps, principal, str(delivery_id))
    body = delivery_json(delivery)
    body["event"] = {
        "id": event.id,
        "xelionEvent": event.notification_type,
        "receivedAt": _iso(event.received_at),
        "notification": json.loads(event.payload),
        "duplicates": event.duplicates,
    }
    body["attemptLog"] = [attempt_json(a) for a in attempts]
    return body


def _wake(request: Request) -> None:
    worker = getattr(request.app.state, "worker", None)
    if worker is not None:
        worker.wake()


@router.post("/{delivery_id}/replay", summary="Send a finished delivery again (same Idempotency-Key)")
async def replay_one(
    delivery_id: DeliveryId, deps: Deps, principal: Auth, request: Request
) -> dict[str, Any]:
    ident = str(delivery_id)
    delivery, _, _ = await _load(deps, principal, ident)
    now = deps.clock.now()
    if not await deps.database.run(lambda s: store.replay(s, ident, now)):
        await _load(deps, principal, ident)  # a 404 if retention deleted it meanwhile
        raise ApiError(
            409,
            ErrorCode.CONFLICT,
            "delivery cannot be replayed now",
            f"it is {delivery.state}; only {', '.join(store.REPLAYABLE)} deliveries can be replayed",
        )
    _wake(request)
    log.info("delivery %s (%s) replayed by %s", ident, delivery.state, principal.describe())
    return {"id": ident, "state": "pending"}


class ReplayRequest(BaseModel):
    state: str = Field(default="dead", description="dead (default), dismissed or delivered")
    since: datetime | None = Field(default=None, description="only deliveries created at or after this time")
    until: datetime | None = None
    xelionContextId: int | None = Field(default=None, ge=1, le=MAX_ID)


@router.post(
    "/replay",
    summary="Replay every delivery in a state (dead by default) since a time",
    # The body is read by admin.body (400 with line and column for malformed JSON), so its schema
    # is given here for OpenAPI.
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ReplayRequest.model_json_schema()}},
        }
    },
)
async def replay_many(deps: Deps, principal: Auth, request: Request) -> dict[str, Any]:
    body = await read_model(request, ReplayRequest)
    if body.state not in store.REPLAYABLE:
        raise invalid_request(
            "state: cannot be replayed", f"state must be one of {', '.join(store.REPLAYABLE)}"
        )
    since = _utc("since", body.since)
    until = _utc("until", body.until)
    if body.state == "delivered" and since is None:
        # Every delivered call that retention kept (30 days by default) sent to the CRM again, by
        # a body that forgot one field: too much to do by accident. A bound says how much is meant.
        raise invalid_request(
            "since: required to replay delivered deliveries",
            "replaying delivered deliveries sends calls the CRM already has; give since (and until) "
            "to say which",
        )
    f = store.DeliveryFilter(
        state=body.state, xelion_context_id=_scope(principal, body.xelionContextId), since=since, until=until
    )
    now = deps.clock.now()

    def replayed(s: Session) -> int:
        _known(s, principal, f.xelion_context_id)
        return store.replay_many(s, f, now)

    count = await deps.database.run(replayed)
    _wake(request)
    log.info(
        "%d %s deliveries replayed by %s (since %s, until %s, integration %s)",
        count,
        body.state,
        principal.describe(),
        since or "the start",
        until or "now",
        f.xelion_context_id or "any",
    )
    return {"replayed": count}


@router.post("/{delivery_id}/dismiss", summary="Give up on a delivery")
async def dismiss_one(delivery_id: DeliveryId, deps: Deps, principal: Auth) -> dict[str, Any]:
    ident = str(delivery_id)
    delivery, _, _ = await _load(deps, principal, ident)
    now = deps.clock.now()
    if not await deps.database.run(lambda s: store.dismiss(s, ident, now)):
        raise ApiError(
            409,
            ErrorCode.CONFLICT,
            "delivery cannot be dismissed now",
            f"it is {delivery.state}; only {', '.join(store.DISMISSABLE)} deliveries can be dismissed",
        )
    log.info("delivery %s (%s) dismissed by %s", ident, delivery.state, principal.describe())
    return {"id": ident, "state": "dismissed"}
