"""``api/deliveries`` pages by cursor as well as by offset, on SQLite and on PostgreSQL.

Offset paging shifts while deliveries arrive: each new one pushes every older one a place down, so
the next page repeats the last item of the one before (or skips one when a filtered state changes).
Each answer's ``next`` names its last item, and ``cursor=<next>`` starts the following page right
behind it, whatever arrived meanwhile. The order is the list's own: newest first, then by id; ties
in ``created_at`` are ordinary (one ingest batch stamps its deliveries with one time).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import delete as delete_statement
from sqlmodel import Session, col

from cti_bridge.admin.app import AdminDeps
from cti_bridge.admin.routes.deliveries import router as deliveries_router
from cti_bridge.store.db import Database
from cti_bridge.store.deliveries import NewDelivery, insert_deliveries, insert_event
from cti_bridge.store.models import Delivery
from tests.api.conftest import OPERATOR, FakeClock, Integration, admin_client, assert_error, make_integration


@pytest.fixture
async def api(deps: AdminDeps) -> AsyncIterator[httpx.AsyncClient]:
    async with admin_client(deps, deliveries_router) as c:
        yield c


class Tenant:
    """Tenant A's integration, with a helper that stores dead deliveries for anne at a given time."""

    def __init__(self, a: Integration, mapping_id: int, user_id: int, database: Database) -> None:
        self.a, self.mapping_id, self.user_id, self.database = a, mapping_id, user_id, database
        self.calls = 0

    async def add(self, clock: FakeClock, count: int, *, state: str = "dead") -> list[str]:
        """``count`` deliveries of ``count`` calls, stored in one transaction at the clock's time
        (so they tie on ``created_at``)."""
        now = clock.now()
        first = self.calls
        self.calls += count

        def write(session: Session) -> list[str]:
            ids: list[str] = []
            for n in range(first, first + count):
                call = f"call-{n}"
                event_id = insert_event(
                    session,
                    xelion_context_id=self.a.xelion_id,
                    notification_type="newCallEvent",
                    call_id=call,
                    dedupe_key=f"{call}-new",
                    payload={"callId": call, "calleeUser": "anne"},
                    now=now,
                )
                assert event_id is not None
                new = NewDelivery(
                    self.a.crm_id,
                    self.mapping_id,
                    self.user_id,
                    "anne",
                    "callee",
                    state=state,
                    last_error="x",
                )
                ids += insert_deliveries(
                    session,
                    event_id=event_id,
                    xelion_context_id=self.a.xelion_id,
                    call_id=call,
                    deliveries=[new],
                    now=now,
                )
            return ids

        return await self.database.run(write)


@pytest.fixture
async def tenant(api: httpx.AsyncClient, database: Database) -> Tenant:
    a = await make_integration(api, "a")
    base = f"/api/crm-integrations/{a.xelion_id}/crm-contexts/{a.crm_id}"
    mapping_id = (await api.get(f"{base}/event-uri-mappings", headers=OPERATOR)).json()[0]["id"]
    user_id = int(
        (await api.get(f"{base}/user-credentials", headers=OPERATOR)).json()[0]["userCredentialsId"]
    )
    return Tenant(a, mapping_id, user_id, database)


async def _page(api: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    r = await api.get("/api/deliveries", params=params, headers=OPERATOR)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_cursor_pages_walk_every_delivery_once_in_the_lists_order(
    api: httpx.AsyncClient, tenant: Tenant, clock: FakeClock
) -> None:
    # 3 at 09:00, 4 at 09:01 (ties within each), 1 at 09:02: the order is by time, newest first,
    # then by id.
    older = await tenant.add(clock, 3)
    clock.advance(60)
    middle = await tenant.add(clock, 4)
    clock.advance(60)
    newest = await tenant.add(clock, 1)
    expected = newest + sorted(middle) + sorted(older)

    whole = await _page(api, limit=100)
    assert [d["id"] for d in whole["items"]] == expected and whole["next"] is None

    seen: list[str] = []
    page = await _page(api, limit=3)
    pages = 1
    while page["next"] is not None:
        assert len(page["items"]) == 3 and page["total"] == 8
        seen += [d["id"] for d in page["items"]]
        page = await _page(api, limit=3, cursor=page["next"])
        pages += 1
    seen += [d["id"] for d in page["items"]]
    assert seen == expected and pages == 3

    # A page that ends exactly at the last item says so: no empty page behind it.
    assert (await _page(api, limit=8))["next"] is None
    assert (await _page(api, limit=7))["next"] is not None


async def test_new_deliveries_do_not_shift_the_pages_behind_a_cursor(
    api: httpx.AsyncClient, tenant: Tenant, clock: FakeClock
) -> None:
    first_ids = await tenant.add(clock, 6)
    expected = sorted(first_ids)
    page = await _page(api, limit=2, state="dead")
    seen = [d["id"] for d in page["items"]]

    # Deliveries arrive between the pages (as during an outage's replay): by offset, the second
    # page would now repeat items of the first.
    clock.advance(5)
    await tenant.add(clock, 2)
    by_offset = await _page(api, limit=2, offset=2, state="dead")
    assert [d["id"] for d in by_offset["items"]] == seen  # the old behaviour, still offset's

    while page["next"] is not None:
        page = await _page(api, limit=2, state="dead", cursor=page["next"])
        seen += [d["id"] for d in page["items"]]
    assert seen == expected
    assert page["total"] == 8  # the total counts what matches now


async def test_a_cursor_and_an_offset_combine_and_filters_still_apply(
    api: httpx.AsyncClient, tenant: Tenant, clock: FakeClock
) -> None:
    dead = await tenant.add(clock, 4)
    await tenant.add(clock, 2, state="delivered")
    everything = [d["id"] for d in (await _page(api, limit=100))["items"]]
    first = await _page(api, limit=1)
    behind = await _page(api, limit=2, offset=1, cursor=first["next"])
    assert [d["id"] for d in behind["items"]] == everything[2:4]
    dead_pages = await _page(api, limit=2, state="dead")
    rest = await _page(api, limit=10, state="dead", cursor=dead_pages["next"])
    assert [d["id"] for d in dead_pages["items"] + rest["items"]] == sorted(dead)


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor",
        "%%%%",
        _b64("2026-01-05T09:00:00+00:00"),  # no id
        _b64("2026-01-05T09:00:00+00:00|not-a-uuid"),
        _b64("2026-01-05T09:00:00|0190b6a4-0000-7000-8000-000000000000"),  # no time zone
        _b64("2026-01-05T09:00:00+01:00|0190b6a4-0000-7000-8000-000000000000"),  # not UTC
        _b64("yesterday|0190b6a4-0000-7000-8000-000000000000"),
        _b64("2026-01-05T09:00:00+00:00|0190B6A4-0000-7000-8000-000000000000"),  # not as written
        base64.urlsafe_b64encode(b"\xff\xfe|x").decode(),
        "x" * 201,
    ],
)
async def test_a_cursor_this_api_did_not_write_is_422_naming_it(api: httpx.AsyncClient, cursor: str) -> None:
    r = await api.get("/api/deliveries", params={"cursor": cursor}, headers=OPERATOR)
    body = assert_error(r, 422, 10201)
    assert "cursor" in body["message"], body


async def test_a_cursor_of_a_delivery_since_deleted_still_pages_on(
    api: httpx.AsyncClient, tenant: Tenant, clock: FakeClock, database: Database
) -> None:
    # Retention may delete the item a cursor names; the cursor holds its time and id, not a
    # reference to the row, so the next page is still the one behind it.
    ids = sorted(await tenant.add(clock, 3))
    first = await _page(api, limit=1)
    assert [d["id"] for d in first["items"]] == ids[:1]

    def delete(session: Session) -> None:
        session.execute(delete_statement(Delivery).where(col(Delivery.id) == ids[0]))

    await database.run(delete)
    assert (await _page(api, limit=10))["total"] == 2
    rest = await _page(api, limit=10, cursor=first["next"])
    assert [d["id"] for d in rest["items"]] == ids[1:]
