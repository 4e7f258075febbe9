"""user-credentials and event-uri-mappings under api/crm-integrations/{x}/crm-contexts/{c}/."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from cti_bridge.store.models import EventUriMapping
from tests.api.conftest import (
    MANUAL_POST_RAW,
    MANUAL_USER_CREDENTIALS_POST_RAW,
    MANUAL_ZOHO_PUT_RAW,
    OPERATOR,
    RecordingSupervisor,
    assert_error,
    auth,
    make_integration,
    raw_json,
    rows,
)


def creds_url(x: int, c: int) -> str:
    return f"/api/crm-integrations/{x}/crm-contexts/{c}/user-credentials"


def maps_url(x: int, c: int) -> str:
    return f"/api/crm-integrations/{x}/crm-contexts/{c}/event-uri-mappings"


async def test_manual_user_credentials_post_verbatim(client: httpx.AsyncClient) -> None:
    # The manual's integration without users, then the manual's user-credentials POST.
    body = json.loads(MANUAL_POST_RAW)
    body["userCredentials"] = []
    r = await client.post("/api/crm-integrations", json=body)
    assert r.status_code == 200, r.text
    x, c = r.json()["xelionContext"]["id"], r.json()["crmContext"]["id"]
    r = await client.post(creds_url(x, c), **raw_json(MANUAL_USER_CREDENTIALS_POST_RAW, OPERATOR))
    assert r.status_code == 200, r.text
    created = r.json()
    # The manual answers the created object (not an array) for its one-element array.
    assert set(created) - {"state"} == {"xelionUsername", "xelionOid", "userCredentialsId"}
    assert created["xelionUsername"] == "xelionUsername"
    assert created["xelionOid"] == "111222333"
    assert isinstance(created["userCredentialsId"], str) and created["userCredentialsId"].isdigit()


async def test_get_user_credentials_with_username_oid_paging(client: httpx.AsyncClient) -> None:
    a = await make_integration(client, "a", users=["anne", "bob"])
    r = await client.get(creds_url(a.xelion_id, a.crm_id), headers=auth(a.token))
    assert r.status_code == 200
    assert r.headers["X-Total-Count"] == "2"
    items = r.json()
    assert [(i["xelionUsername"], i["xelionOid"]) for i in items] == [("anne", "1001"), ("bob", "1002")]
    for item in items:
        assert set(item) == {"xelionUsername", "xelionOid", "userCredentialsId", "state"}
        assert isinstance(item["userCredentialsId"], str)
        assert item["state"] == "active"

    r = await client.get(creds_url(a.xelion_id, a.crm_id), params={"username": "bob"}, headers=auth(a.token))
    assert [i["xelionUsername"] for i in r.json()] == ["bob"]
    r = await client.get(creds_url(a.xelion_id, a.crm_id), params={"oid": "1001"}, headers=auth(a.token))
    assert [i["xelionUsername"] for i in r.json()] == ["anne"]
    r = await client.get(creds_url(a.xelion_id, a.crm_id), params={"username": "zed"}, headers=auth(a.token))
    assert r.json() == [] and r.headers["X-Total-Count"] == "0"

    r = await client.get(
        creds_url(a.xelion_id, a.crm_id), params={"limit": 1, "offset": 1}, headers=auth(a.token)
    )
    assert r.headers["X-Total-Count"] == "2"
    assert [i["xelionUsername"] for i in r.json()] == ["bob"]
    assert_error(
        await client.get(creds_url(a.xelion_id, a.crm_id), params={"limit": 0}, headers=auth(a.token)),
        422,
        10201,
    )
    err = assert_error(
        await client.get(creds_url(a.xelion_id, a.crm_id), params={"offset": "x"}, headers=auth(a.token)),
        422,
        10201,
    )
    assert "query.offset" in err["message"]


async def test_post_user_credentials_checks_users_and_duplicates(
    client: httpx.AsyncClient, supervisor: RecordingSupervisor
) -> None:
    a = await make_integration(client, "a", users=["anne"])
    url = creds_url(a.xelion_id, a.crm_id)
    # A single object is accepted too; the answer is the object.
    r = await client.post(
        url, json={"xelionUsername": "bob", "refreshToken": "rt-bob"}, headers=auth(a.token)
    )
    assert r.status_code == 200, r.text
    assert r.json()["xelionOid"] == "1002"
    assert ("integration_changed", a.xelion_id) in supervisor.calls
    # Already there: 409.
    assert_error(await client.post(url, json=[{"xelionUsername": "anne"}], headers=auth(a.token)), 409, 10300)
    # Not a Xelion user: 422 naming it (the manual's server said 500).
    err = assert_error(
        await client.post(url, json=[{"xelionUsername": "ghost"}], headers=auth(a.token)), 422, 10204
    )
    assert "ghost" in err["message"]
    # Missing user name: 422 naming the field.
    err = assert_error(await client.post(url, json=[{"clientId": "x"}], headers=auth(a.token)), 422, 10201)
    assert "[0].xelionUsername" in err["message"]
    assert_error(await client.post(url, json=[], headers=auth(a.token)), 422, 10201)
    # Several at once: an array back.
    b = await make_integration(client, "b", users=[])
    r = await client.post(
        creds_url(b.xelion_id, b.crm_id),
        json=[{"xelionUsername": "carol"}, {"xelionUsername": "dave"}],
        headers=auth(b.token),
    )
    assert r.status_code == 200, r.text
    assert [u["xelionOid"] for u in r.json()] == ["2001", "2002"]


async def test_unknown_or_mismatched_ids_are_404(client: httpx.AsyncClient) -> None:
    a = await make_integration(client, "a")
    b = await make_integration(client, "b")
    for url in (
        creds_url(a.xelion_id, 999),
        creds_url(999, a.crm_id),
        creds_url(a.xelion_id, b.crm_id),  # b's CRM context is not a's
        creds_url(2**40, 1),  # beyond any id the database can hold
        maps_url(a.xelion_id, b.crm_id),
        maps_url(999, 999),
    ):
        assert_error(await client.get(url, headers=OPERATOR), 404, 10100)
    assert_error(await client.put(maps_url(a.xelion_id, b.crm_id), json=[], headers=OPERATOR), 404, 10100)


async def test_manual_zoho_mappings_put_verbatim_then_get(
    client: httpx.AsyncClient, supervisor: RecordingSupervisor, database
) -> None:
    a = await make_integration(client, "a")
    old = rows(database, EventUriMapping)
    url = maps_url(a.xelion_id, a.crm_id)
    r = await client.put(url, **raw_json(MANUAL_ZOHO_PUT_RAW, auth(a.token)))
    assert r.status_code == 200, r.text
    put_items = r.json()
    assert [m["xelionEvent"] for m in put_items] == [
        "missedCallEvent",
        "callConnectedEvent",
        "callHungUpEvent",
        "newCallEvent",
    ]
    assert put_items[0]["crmResourcePayload"] is None
    assert supervisor.calls[-1] == ("integration_changed", a.xelion_id)

    r = await client.get(url, headers=auth(a.token))
    assert r.status_code == 200
    assert r.headers["X-Total-Count"] == "4"
    items = r.json()
    assert items == put_items
    for item in items:
        # The manual's keys and nothing else: no extension was set.
        assert set(item) == {"createdAt", "crmResourcePayload", "crmResourceUri", "id", "xelionEvent"}
        assert isinstance(item["id"], int)
        assert item["createdAt"] == "2026-01-05T09:00:00.000000"
    assert items[1]["crmResourcePayload"]["myObject"] == {"myPayload": "${callId}"}
    assert 'direction=${(initiation=="outgoing")?"outbound":"inbound"}' in items[2]["crmResourceUri"]

    # The old rows were retired, not rewritten; their ids are gone from the list.
    stored = {m.id: m for m in rows(database, EventUriMapping)}
    assert all(stored[m.id].retired for m in old)
    assert not ({m.id for m in old} & {i["id"] for i in items})
    # null payload is stored as NULL, not as the text "null".
    assert stored[items[0]["id"]].crm_resource_payload is None

    r = await client.get(url, params={"limit": 2, "offset": 1}, headers=auth(a.token))
    assert r.headers["X-Total-Count"] == "4"
    assert [m["id"] for m in r.json()] == [items[1]["id"], items[2]["id"]]


async def test_putting_the_same_mappings_again_changes_nothing(client: httpx.AsyncClient, database) -> None:
    """A provisioning script that PUTs its configuration every few minutes retired and re-inserted
    every mapping each time: rows nothing ever deletes (a retention review's finding). The same
    set again (here the GET's answer, PUT back untouched) keeps the rows and their ids; a change
    still retires them and stores the new set."""
    a = await make_integration(client, "a")
    url = maps_url(a.xelion_id, a.crm_id)
    r = await client.put(url, **raw_json(MANUAL_ZOHO_PUT_RAW, auth(a.token)))
    assert r.status_code == 200, r.text
    first = r.json()
    count = len(rows(database, EventUriMapping))
    for _ in range(3):
        current = (await client.get(url, headers=auth(a.token))).json()
        r = await client.put(url, json=current, headers=auth(a.token))
        assert r.status_code == 200, r.text
        assert r.json() == first
    again = await client.put(url, **raw_json(MANUAL_ZOHO_PUT_RAW, auth(a.token)))
    assert again.json() == first
    assert len(rows(database, EventUriMapping)) == count

    # A tool that does not keep JSON key order: the payloads' members (nested too) reversed.
    def reversed_keys(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: reversed_keys(value[k]) for k in reversed(list(value))}
        return value

    shuffled = [{**m, "crmResourcePayload": reversed_keys(m["crmResourcePayload"])} for m in first]
    assert json.dumps(shuffled) != json.dumps(first)  # equal as dicts, not as JSON texts
    r = await client.put(url, json=shuffled, headers=auth(a.token))
    assert r.status_code == 200, r.text
    assert r.json() == first  # the same set, kept as stored
    assert len(rows(database, EventUriMapping)) == count
    # A value of another JSON type is a change: 1, 1.0 and true are three values.
    changed = [dict(m) for m in first]
    changed[1] = {**changed[1], "crmResourcePayload": {**changed[1]["crmResourcePayload"], "n": 1}}
    r = await client.put(url, json=changed, headers=auth(a.token))
    count += len(first)
    assert len(rows(database, EventUriMapping)) == count
    for other in (True, 1.0):
        changed[1]["crmResourcePayload"]["n"] = other
        r = await client.put(url, json=changed, headers=auth(a.token))
        count += len(first)
        assert len(rows(database, EventUriMapping)) == count, other
    first = r.json()

    reordered = [first[1], first[0], *first[2:]]  # the order is part of the set
    r = await client.put(url, json=reordered, headers=auth(a.token))
    assert r.status_code == 200, r.text
    assert not ({m["id"] for m in r.json()} & {m["id"] for m in first})
    stored = {m.id: m for m in rows(database, EventUriMapping)}
    assert all(stored[m["id"]].retired for m in first)
    assert len(stored) == count + len(first)


async def test_a_list_without_limit_is_whole_so_a_get_edit_put_round_trip_keeps_every_mapping(
    client: httpx.AsyncClient,
) -> None:
    """The manual's lists have no paging. With a default page of 1,000, GET returned the first
    1,000 of 1,500 mappings, and PUTting them back (the manual's way to edit) deleted 500."""
    a = await make_integration(client, "a")
    url = maps_url(a.xelion_id, a.crm_id)
    body = [
        {"xelionEvent": "callHungUpEvent", "crmResourceUri": f"https://crm.example.org/calls/{i}/${{callId}}"}
        for i in range(1500)
    ]
    r = await client.put(url, json=body, headers=auth(a.token))
    assert r.status_code == 200, r.text
    r = await client.get(url, headers=auth(a.token))
    assert r.headers["X-Total-Count"] == "1500" and len(r.json()) == 1500
    edited = [{**m, "crmResourceUri": m["crmResourceUri"] + "?v=2"} for m in r.json()]
    assert (await client.put(url, json=edited, headers=auth(a.token))).status_code == 200
    r = await client.get(url, headers=auth(a.token))
    assert len(r.json()) == 1500 and all(m["crmResourceUri"].endswith("?v=2") for m in r.json())


async def test_mapping_extensions_are_stored_and_shown_only_when_set(client: httpx.AsyncClient) -> None:
    a = await make_integration(client, "a")
    url = maps_url(a.xelion_id, a.crm_id)
    body = [
        {
            "xelionEvent": "callHungUpEvent",
            "crmResourceUri": "https://crm.example.org/calls/${callId}",
            "crmResourcePayload": {"callId": "${callId}"},
            "method": "patch",
            "headers": {"X-Source": "cti-bridge"},
            "contentType": "application/x-www-form-urlencoded",
            "condition": "${initiation == 'outgoing'}",
        },
        {
            "xelionEvent": "newCallEvent",
            "crmResourceUri": "https://crm.example.org/notes",
            "crmResourcePayload": "call ${callId} from ${callerPhoneNumber}",
        },
    ]
    r = await client.put(url, json=body, headers=OPERATOR)
    assert r.status_code == 200, r.text
    item, note = (await client.get(url, headers=OPERATOR)).json()
    assert item["method"] == "PATCH"
    assert item["headers"] == {"X-Source": "cti-bridge"}
    assert item["contentType"] == "application/x-www-form-urlencoded"
    assert item["condition"] == "${initiation == 'outgoing'}"
    assert item["crmResourcePayload"] == {"callId": "${callId}"}
    assert note["crmResourcePayload"] == "call ${callId} from ${callerPhoneNumber}"
    assert set(note) == {"createdAt", "crmResourcePayload", "crmResourceUri", "id", "xelionEvent"}
    err = assert_error(
        await client.put(url, json=[{**body[0], "method": "TRACE"}], headers=OPERATOR), 422, 10201
    )
    assert "[0].method" in err["message"]
    err = assert_error(
        await client.put(url, json=[{**body[0], "headers": {"X": [1]}}], headers=OPERATOR), 422, 10201
    )
    assert "[0].headers.X" in err["message"]
    # A PUT body must be an array.
    assert_error(await client.put(url, json=body[0], headers=OPERATOR), 422, 10201)


async def test_a_template_that_does_not_compile_is_422_naming_mapping_place_and_column(
    client: httpx.AsyncClient, database
) -> None:
    pytest.importorskip("cti_bridge.render")
    a = await make_integration(client, "a")
    url = maps_url(a.xelion_id, a.crm_id)
    before = (await client.get(url, headers=OPERATOR)).json()
    body = [
        {
            "xelionEvent": "newCallEvent",
            "crmResourceUri": "https://crm.example.org/a",
            "crmResourcePayload": None,
        },
        {
            "xelionEvent": "callHungUpEvent",
            "crmResourceUri": "https://crm.example.org/b",
            "crmResourcePayload": {"to": "${calleePhoneNumber +}"},
        },
    ]
    err = assert_error(await client.put(url, json=body, headers=OPERATOR), 422, 10202)
    assert "callHungUpEvent" in err["message"]
    assert "column" in err["message"]
    assert "to" in err["info"] and "eventUriMappings[1]" in err["info"]
    # Nothing changed.
    assert (await client.get(url, headers=OPERATOR)).json() == before

    # The same check guards POST crm-integrations, before anything is saved or Xelion is asked.
    from tests.api.conftest import integration_body

    post = integration_body("b", mappings=[{**body[1], "crmResourceUri": "https://crm.example.org/${("}])
    err = assert_error(await client.post("/api/crm-integrations", json=post), 422, 10202)
    assert "crmResourceUri" in err["message"]
    assert "column" in err["message"]


async def test_saving_refuses_headers_cti_bridge_writes_and_uris_that_cannot_become_urls(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """An integrator review: an ``Authorization`` or ``Idempotency-Key`` header of a mapping was
    dropped at the request without a word (the preview showed both), and a URI whose literal
    start can never be an absolute URL, or a fixed header value with CR/LF, was saved and ended
    each delivery dead. Each is a 422 naming the place now; a misspelt name is saved with a
    warning in the log (Xelion may send fields no document lists)."""
    a = await make_integration(client, "a")
    url = maps_url(a.xelion_id, a.crm_id)
    ok = {"xelionEvent": "callHungUpEvent", "crmResourceUri": "https://crm.example.org/b"}
    for bad, place in (
        ({**ok, "headers": {"authorization": "Custom abc"}}, "headers/authorization"),
        ({**ok, "headers": {"Idempotency-Key": "${callId}"}}, "headers/Idempotency-Key"),
        ({**ok, "headers": {"X-A": "a\r\nInjected: 1"}}, "headers/X-A"),
        ({**ok, "crmResourceUri": "crm.example.org/x?to=${calleePhoneNumber}"}, "crmResourceUri"),
        ({**ok, "crmResourceUri": "http://127.0.0.1:99999/m6"}, "crmResourceUri"),
    ):
        err = assert_error(await client.put(url, json=[ok, bad], headers=OPERATOR), 422, 10202)
        assert place in err["message"] and "eventUriMappings[1]" in err["info"], err
    with caplog.at_level("WARNING", logger="cti_bridge.admin.mappings"):
        typo = {**ok, "crmResourcePayload": {"a": "${duraton}", "to": "${calleePhoneNumber}"}}
        r = await client.put(url, json=[typo], headers=OPERATOR)
    assert r.status_code == 200, r.text
    warned = [rec.getMessage() for rec in caplog.records if "no call event is known" in rec.getMessage()]
    assert len(warned) == 1 and "'duraton'" in warned[0] and "crmResourcePayload/a" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="cti_bridge.admin.mappings"):
        many = {**ok, "crmResourcePayload": {f"k{i}": f"${{nope{i}}}" for i in range(200)}}
        assert (await client.put(url, json=[many], headers=OPERATOR)).status_code == 200
    warned = [rec.getMessage() for rec in caplog.records if "no call event is known" in rec.getMessage()]
    assert len(warned) == 6 and "195 more names" in warned[-1]  # not a line per name
