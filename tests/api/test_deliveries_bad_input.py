"""``api/deliveries`` answers bad input like the manual's routes do, on SQLite and on PostgreSQL.

Out-of-range numbers and NUL characters in the query, a delivery id that is not a UUID, an
out-of-range ``xelionContextId`` and malformed JSON in the bulk replay's body: each is a 422 (400
for malformed JSON) naming what is wrong, never a 500 from the database. Before, SQLite raised
``OverflowError`` for integers beyond 64 bits, and PostgreSQL refused NUL characters in text and
integers beyond its ``integer`` columns.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import text
from sqlmodel import Session

from cti_bridge.admin.app import AdminDeps
from cti_bridge.admin.routes.deliveries import router as deliveries_router
from cti_bridge.store.db import Database
from cti_bridge.store.deliveries import NewDelivery, insert_deliveries, insert_event
from tests.api.conftest import (
    OPERATOR,
    FakeClock,
    Integration,
    admin_client,
    assert_error,
    auth,
    make_integration,
    raw_json,
)


@pytest.fixture
async def api(deps: AdminDeps) -> AsyncIterator[httpx.AsyncClient]:
    """The admin API with the deliveries routes, as the daemon builds it (``app.py``)."""
    async with admin_client(deps, deliveries_router) as c:
        yield c


async def _one_dead_delivery(
    api: httpx.AsyncClient, database: Database, clock: FakeClock
) -> tuple[str, Integration]:
    """Tenant A's integration with one dead delivery for anne of call ``call-1``: its id, and the
    integration (with a session token of its admin)."""
    a = await make_integration(api, "a")
    x, c = a.xelion_id, a.crm_id
    base = f"/api/crm-integrations/{x}/crm-contexts/{c}"
    mapping_id = (await api.get(f"{base}/event-uri-mappings", headers=OPERATOR)).json()[0]["id"]
    user_id = int(
        (await api.get(f"{base}/user-credentials", headers=OPERATOR)).json()[0]["userCredentialsId"]
    )
    now = clock.now()

    def write(session: Session) -> str:
        event_id = insert_event(
            session,
            xelion_context_id=x,
            notification_type="newCallEvent",
            call_id="call-1",
            dedupe_key="call-1-new",
            payload={"callId": "call-1", "calleeUser": "anne"},
            now=now,
        )
        assert event_id is not None
        new = NewDelivery(c, mapping_id, user_id, "anne", "callee", state="dead", last_error="HTTP 400")
        (delivery_id,) = insert_deliveries(
            session,
            event_id=event_id,
            xelion_context_id=x,
            call_id="call-1",
            deliveries=[new],
            now=now,
        )
        return delivery_id

    return await database.run(write), a


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"offset": "9223372036854775808"}, "offset"),  # beyond 64 bits: OverflowError on SQLite
        ({"offset": str(2**31)}, "offset"),  # beyond the API's paging bound (common.MAX_OFFSET)
        ({"xelionContextId": "99999999999999999999999"}, "xelionContextId"),
        ({"xelionContextId": "99999999999"}, "xelionContextId"),  # beyond PostgreSQL's integer
        ({"xelionContextId": "0"}, "xelionContextId"),
        ({"username": "a\x00b"}, "username"),  # PostgreSQL cannot compare text with NUL
        ({"callId": "a\x00b"}, "callId"),
        ({"username": "u" * 256}, "username"),  # longer than the column: cannot match anything
    ],
)
async def test_list_refuses_out_of_range_and_nul_query_values_naming_them(
    api: httpx.AsyncClient, params: dict[str, str], field: str
) -> None:
    r = await api.get("/api/deliveries", params=params, headers=OPERATOR)
    body = assert_error(r, 422, 10201)
    assert f"query.{field}" in body["message"], body


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("since", "9999-12-31T23:59:59-01:00"),  # year 10000 in UTC: OverflowError when bound
        ("until", "0001-01-01T00:00:00+01:00"),  # year 0 in UTC
    ],
)
async def test_a_date_time_beyond_the_utc_calendar_is_422_naming_it(
    api: httpx.AsyncClient, field: str, value: str
) -> None:
    r = await api.get("/api/deliveries", params={field: value}, headers=OPERATOR)
    body = assert_error(r, 422, 10201)
    assert body["message"].startswith(f"{field}: "), body
    r = await api.post("/api/deliveries/replay", json={field: value}, headers=OPERATOR)
    body = assert_error(r, 422, 10201)
    assert body["message"].startswith(f"{field}: "), body


async def test_list_with_valid_filters_still_finds_the_delivery(
    api: httpx.AsyncClient, database: Database, clock: FakeClock
) -> None:
    delivery_id, a = await _one_dead_delivery(api, database, clock)
    params = {"xelionContextId": str(a.xelion_id), "username": "anne", "callId": "call-1", "offset": "0"}
    r = await api.get("/api/deliveries", params=params, headers=OPERATOR)
    assert r.status_code == 200, r.text
    assert r.json()["total"] == 1 and [d["id"] for d in r.json()["items"]] == [delivery_id]
    r = await api.get("/api/deliveries", params={**params, "offset": str(2**31 - 1)}, headers=OPERATOR)
    assert r.status_code == 200 and r.json() == {"total": 1, "offset": 2**31 - 1, "items": [], "next": None}


@pytest.mark.parametrize("bad_id", ["a%00b", "not-a-delivery-id", "1"])
@pytest.mark.parametrize(("method", "suffix"), [("GET", ""), ("POST", "/replay"), ("POST", "/dismiss")])
async def test_a_delivery_id_that_is_not_a_uuid_is_422_naming_it(
    api: httpx.AsyncClient, method: str, suffix: str, bad_id: str
) -> None:
    # As for the manual's integer ids: an id that does not parse is 422 naming the path parameter.
    r = await api.request(method, f"/api/deliveries/{bad_id}{suffix}", headers=OPERATOR)
    body = assert_error(r, 422, 10201)
    assert "path.delivery_id" in body["message"], body


async def test_a_well_formed_unknown_delivery_id_is_404_and_a_known_one_is_found(
    api: httpx.AsyncClient, database: Database, clock: FakeClock
) -> None:
    delivery_id, _ = await _one_dead_delivery(api, database, clock)
    unknown = str(uuid.uuid4())
    for method, suffix in (("GET", ""), ("POST", "/replay"), ("POST", "/dismiss")):
        r = await api.request(method, f"/api/deliveries/{unknown}{suffix}", headers=OPERATOR)
        assert_error(r, 404, 10100)
    r = await api.get(f"/api/deliveries/{delivery_id}", headers=OPERATOR)
    assert r.status_code == 200 and r.json()["id"] == delivery_id, r.text
    r = await api.post(f"/api/deliveries/{delivery_id}/replay", headers=OPERATOR)
    assert r.status_code == 200 and r.json() == {"id": delivery_id, "state": "pending"}, r.text


@pytest.mark.parametrize("value", ["99999999999999999999999", "99999999999", str(2**31), "0", "-1"])
async def test_bulk_replay_refuses_an_out_of_range_xelion_context_id_naming_it(
    api: httpx.AsyncClient, value: str
) -> None:
    r = await api.post("/api/deliveries/replay", **raw_json(f'{{"xelionContextId": {value}}}', OPERATOR))
    body = assert_error(r, 422, 10201)
    assert "xelionContextId" in body["message"], body


async def test_bulk_replay_malformed_json_is_400_with_line_and_column(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/deliveries/replay", **raw_json('{"state": "dead",\n "since": }', OPERATOR))
    body = assert_error(r, 400, 10200)
    assert body["info"].startswith("line 2 column 11"), body


async def test_bulk_replay_still_replays_within_a_session_scope(
    api: httpx.AsyncClient, database: Database, clock: FakeClock
) -> None:
    delivery_id, a = await _one_dead_delivery(api, database, clock)
    x, session = a.xelion_id, auth(a.token)
    r = await api.post("/api/deliveries/replay", json={"xelionContextId": x + 1}, headers=session)
    assert_error(r, 404, 10100)  # another integration's id, as before
    r = await api.post("/api/deliveries/replay", json={"xelionContextId": x}, headers=session)
    assert r.status_code == 200 and r.json() == {"replayed": 1}, r.text
    r = await api.get(f"/api/deliveries/{delivery_id}", headers=session)
    assert r.json()["state"] == "pending"


async def test_an_operator_naming_an_unknown_integration_gets_404_not_an_empty_answer(
    api: httpx.AsyncClient, database: Database, clock: FakeClock
) -> None:
    """A mistyped ``xelionContextId`` was answered ``{"replayed": 0}`` (and an empty list), as if
    the integration had nothing dead: the operator could not tell a typo from a clean slate (an
    operator walkthrough's finding). The known one still replays and lists."""
    delivery_id, a = await _one_dead_delivery(api, database, clock)
    unknown = a.xelion_id + 1000
    r = await api.post("/api/deliveries/replay", json={"xelionContextId": unknown}, headers=OPERATOR)
    assert "integration" in assert_error(r, 404, 10100)["message"]
    r = await api.get("/api/deliveries", params={"xelionContextId": str(unknown)}, headers=OPERATOR)
    assert_error(r, 404, 10100)
    r = await api.get("/api/deliveries", params={"xelionContextId": str(a.xelion_id)}, headers=OPERATOR)
    assert [d["id"] for d in r.json()["items"]] == [delivery_id]
    r = await api.post("/api/deliveries/replay", json={"xelionContextId": a.xelion_id}, headers=OPERATOR)
    assert r.status_code == 200 and r.json() == {"replayed": 1}, r.text


async def test_a_bulk_replay_of_delivered_deliveries_needs_since(
    api: httpx.AsyncClient, database: Database, clock: FakeClock
) -> None:
    """``{"state": "delivered"}`` alone replayed every delivered call retention kept (30 days by
    default): a body missing one field re-sent a month of calls to the CRM. It is a 422 naming
    ``since`` now, and nothing is queued; with ``since`` it replays what it names."""
    delivery_id, _ = await _one_dead_delivery(api, database, clock)

    def deliver(session: Session) -> None:
        session.execute(text("UPDATE delivery SET state = 'delivered' WHERE id = :id"), {"id": delivery_id})

    await database.run(deliver)
    body = assert_error(
        await api.post("/api/deliveries/replay", json={"state": "delivered"}, headers=OPERATOR), 422, 10201
    )
    assert body["message"] == "since: required to replay delivered deliveries", body
    assert (await api.get(f"/api/deliveries/{delivery_id}", headers=OPERATOR)).json()["state"] == "delivered"
    since = (clock.now() - timedelta(hours=1)).isoformat()
    r = await api.post(
        "/api/deliveries/replay", json={"state": "delivered", "since": since}, headers=OPERATOR
    )
    assert r.status_code == 200 and r.json() == {"replayed": 1}, r.text
    # dead (the default) needs no bound: what failed is what an operator replays after an outage.
    assert (await api.post("/api/deliveries/replay", json={}, headers=OPERATOR)).json() == {"replayed": 0}


async def test_a_database_gone_under_a_request_is_a_503_to_retry_not_a_500(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A PostgreSQL connection dropped under a read answered 500/11000 "a bug", with a traceback
    each (a chaos soak's finding: 261 of 600 reads while backends were terminated)."""
    from sqlalchemy.exc import OperationalError

    from cti_bridge.admin.routes import deliveries as deliveries_routes

    real = deliveries_routes.store.list_deliveries
    calls = {"n": 0}

    def dropped_once(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            # What SQLAlchemy raises when the driver says the connection is gone.
            raise OperationalError(
                "SELECT ...",
                {},
                Exception("server closed the connection unexpectedly"),
                connection_invalidated=True,
            )
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(deliveries_routes.store, "list_deliveries", dropped_once)
    r = await api.get("/api/deliveries", headers=OPERATOR)
    body = assert_error(r, 503, 11001)
    assert r.headers["Retry-After"] == "1" and "try again" in body["message"]
    assert not [rec for rec in caplog.records if rec.exc_info]  # one line, no traceback
    r = await api.get("/api/deliveries", headers=OPERATOR)
    assert r.status_code == 200, r.text


async def test_a_statement_the_database_refuses_is_a_500_not_a_503_to_retry(
    api: httpx.AsyncClient, database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite raises OperationalError for a bug too (no such column, a syntax error): that is no
    database away for a moment, and a 503 "try again" with the message left out hid it (a review's
    finding). PostgreSQL raises ProgrammingError for the same."""
    await database.run(lambda s: s.execute(text("ALTER TABLE delivery DROP COLUMN last_error")))
    assert_error(await api.get("/api/deliveries", headers=OPERATOR), 500, 11000)
    assert [r for r in caplog.records if r.exc_info]  # the traceback, for the one who mends it
