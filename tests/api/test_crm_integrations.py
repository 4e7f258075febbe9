"""api/crm-integrations: the manual's POST verbatim, GET by host+tenant, listing, DELETE, errors."""

from __future__ import annotations

import json

import httpx
import pytest

from cti_bridge.admin.app import AdminDeps
from cti_bridge.store.models import EventUriMapping, UserCredentials, XelionContext
from cti_bridge.store.tokens import UserCredentialTokenStore
from tests.api.conftest import (
    DOWN_HOST,
    MANUAL_HOST,
    MANUAL_POST_RAW,
    MANUAL_POST_RAW_BROKEN,
    MANUAL_TENANT,
    OPERATOR,
    RecordingSupervisor,
    assert_error,
    auth,
    count,
    integration_body,
    make_integration,
    raw_json,
    rows,
)
from tests.api.xelion_world import XelionWorld


async def test_manual_post_example_verbatim_creates_the_integration(
    client: httpx.AsyncClient, supervisor: RecordingSupervisor, database
) -> None:
    r = await client.post("/api/crm-integrations", **raw_json(MANUAL_POST_RAW))
    assert r.status_code == 200, r.text
    body = r.json()
    # Exactly the manual's response keys, ids integers.
    assert set(body) == {"crmContext", "xelionContext"}
    assert set(body["crmContext"]) == {"authorizationHeaderPrefix", "authorizationServerUri", "id"}
    assert set(body["xelionContext"]) == {"host", "id", "protocol", "tenant"}
    assert body["crmContext"]["authorizationHeaderPrefix"] == "Bearer "  # the trailing space kept
    assert body["crmContext"]["authorizationServerUri"] == "https://example.org/services/oauth2/token"
    assert body["xelionContext"]["host"] == MANUAL_HOST
    assert body["xelionContext"]["tenant"] == MANUAL_TENANT
    assert body["xelionContext"]["protocol"] == "http"
    assert isinstance(body["xelionContext"]["id"], int) and isinstance(body["crmContext"]["id"], int)
    xid = body["xelionContext"]["id"]
    assert supervisor.calls == [("integration_changed", xid)]

    users = rows(database, UserCredentials)
    mappings = sorted(rows(database, EventUriMapping), key=lambda m: m.position)
    assert [(u.xelion_username, u.xelion_oid) for u in users] == [("xelionUsername", "111222333")]
    assert [m.xelion_event for m in mappings] == [
        "newCallEvent",
        "callConnectedEvent",
        "callHungUpEvent",
        "missedCallEvent",
    ]
    assert json.loads(mappings[0].crm_resource_payload)["initiation"] == (
        '${(initiation=="outgoing")?"calldialed":"callreceived"}'
    )


async def test_manual_post_example_with_its_bare_quotes_is_a_400_naming_line_and_column(
    client: httpx.AsyncClient, database
) -> None:
    r = await client.post("/api/crm-integrations", **raw_json(MANUAL_POST_RAW_BROKEN))
    body = assert_error(r, 400, 10200)
    # The manual's callHungUpEvent crmResourceUri: its first bare quote (in =="outgoing") ends the
    # string, and the parser then stops at the "o" of outgoing, where it wants a ',' (1-based column).
    lines = MANUAL_POST_RAW_BROKEN.split("\n")
    line_no = next(i for i, line in enumerate(lines, 1) if "Call?initiation" in line)
    column = lines[line_no - 1].index('=="outgoing') + len('=="') + 1
    assert f"line {line_no} column {column}" in body["info"]
    assert count(database, XelionContext) == 0


async def test_get_by_host_and_tenant_returns_the_manual_shape_plus_source(client: httpx.AsyncClient) -> None:
    a = await make_integration(client, "a")
    r = await client.get(
        "/api/crm-integrations",
        params={"xelionHost": "pbx-a.example.com", "xelionTenant": "alpha"},
        headers=auth(a.token),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"crmContext", "xelionContext", "source"}
    assert body["xelionContext"] == {
        "host": "pbx-a.example.com",
        "id": a.xelion_id,
        "protocol": "https",
        "tenant": "alpha",
    }
    assert body["crmContext"]["id"] == a.crm_id
    assert body["source"] == {"state": "stopped", "error": None, "lastEventAt": None, "gaps": []}


async def test_source_gaps_are_reported_newest_first_at_most_20(client: httpx.AsyncClient, database) -> None:
    from datetime import UTC, datetime, timedelta

    from cti_bridge.store.models import SourceGap

    a = await make_integration(client, "a")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with database.session() as s:
        row = s.get(XelionContext, a.xelion_id)
        row.source_state = "backoff"
        row.source_error = "connection refused"
        row.last_event_at = start
        s.add(row)
        for i in range(25):
            s.add(
                SourceGap(
                    xelion_context_id=a.xelion_id,
                    started_at=start + timedelta(minutes=i),
                    ended_at=None if i == 24 else start + timedelta(minutes=i, seconds=30),
                    reason=f"gap {i}",
                )
            )
    r = await client.get(
        "/api/crm-integrations",
        params={"xelionHost": "pbx-a.example.com", "xelionTenant": "alpha"},
        headers=OPERATOR,
    )
    source = r.json()["source"]
    assert source["state"] == "backoff"
    assert source["error"] == "connection refused"
    assert source["lastEventAt"] == "2026-01-01 00:00:00"
    assert len(source["gaps"]) == 20
    assert source["gaps"][0] == {"start": "2026-01-01 00:24:00", "end": None, "reason": "gap 24"}
    assert source["gaps"][1]["end"] == "2026-01-01 00:23:30"
    assert source["gaps"][-1]["reason"] == "gap 5"


async def test_get_unknown_integration_is_404(client: httpx.AsyncClient) -> None:
    r = await client.get(
        "/api/crm-integrations",
        params={"xelionHost": "nope.example.com", "xelionTenant": "x"},
        headers=OPERATOR,
    )
    assert_error(r, 404, 10100)


async def test_get_with_only_one_query_parameter_is_422_naming_the_other(client: httpx.AsyncClient) -> None:
    r = await client.get(
        "/api/crm-integrations", params={"xelionHost": "pbx-a.example.com"}, headers=OPERATOR
    )
    body = assert_error(r, 422, 10201)
    assert "xelionTenant" in body["message"]


async def test_listing_without_query_operator_sees_all_session_sees_its_own(
    client: httpx.AsyncClient,
) -> None:
    a = await make_integration(client, "a")
    b = await make_integration(client, "b")
    r = await client.get("/api/crm-integrations", headers=OPERATOR)
    assert r.status_code == 200
    assert r.headers["X-Total-Count"] == "2"
    assert [i["xelionContext"]["id"] for i in r.json()] == [a.xelion_id, b.xelion_id]

    r = await client.get("/api/crm-integrations", params={"limit": 1, "offset": 1}, headers=OPERATOR)
    assert r.headers["X-Total-Count"] == "2"
    assert [i["xelionContext"]["id"] for i in r.json()] == [b.xelion_id]

    r = await client.get("/api/crm-integrations", headers=auth(a.token))
    assert r.headers["X-Total-Count"] == "1"
    assert [i["xelionContext"]["id"] for i in r.json()] == [a.xelion_id]


async def test_unauthenticated_post_for_a_host_not_allowed_is_403(
    client: httpx.AsyncClient, xelion: XelionWorld
) -> None:
    await xelion.add_host("pbx-z.example.com", "zeta", "admin-z", "pw-z", {"zoe": "9"})
    body = integration_body("a", users=[])
    body["xelionContext"].update(
        host="pbx-z.example.com", tenant="zeta", adminUsername="admin-z", adminPassword="pw-z"
    )
    r = await client.post("/api/crm-integrations", json=body)
    assert_error(r, 403, 10203)
    assert xelion.login_attempts == 0  # refused before any login to that host (or any other)
    # A session token does not help (the manual: a token on this resource is ignored) ...
    a = await make_integration(client, "a")
    r = await client.post("/api/crm-integrations", json=body, headers=auth(a.token))
    assert_error(r, 403, 10203)
    # ... the operator token does.
    r = await client.post("/api/crm-integrations", json=body, headers=OPERATOR)
    assert r.status_code == 200, r.text


async def test_duplicate_host_and_tenant_is_409(client: httpx.AsyncClient) -> None:
    await make_integration(client, "a")
    r = await client.post("/api/crm-integrations", json=integration_body("a"))
    assert_error(r, 409, 10300)
    # Host names compare case-insensitively.
    body = integration_body("a")
    body["xelionContext"]["host"] = "PBX-A.example.com"
    r = await client.post("/api/crm-integrations", json=body)
    assert_error(r, 409, 10300)


async def test_wrong_admin_password_is_401_and_nothing_is_saved(client: httpx.AsyncClient, database) -> None:
    body = integration_body("a")
    body["xelionContext"]["adminPassword"] = "wrong"
    r = await client.post("/api/crm-integrations", json=body)
    assert_error(r, 401, 10004)
    assert count(database, XelionContext) == 0


@pytest.mark.parametrize("with_users", [False, True])
async def test_a_user_who_is_no_admin_is_refused_as_the_integration_admin(
    client: httpx.AsyncClient, database, with_users: bool
) -> None:
    """Call events reach only an admin's websocket (xelion-protocol.md §3.5). A user who may log in
    but is no admin was accepted without users (its source then "subscribed" and heard nothing,
    ever), and with users refused as a wrong password. It is refused as what it is now."""
    body = integration_body("a", users=["bob"] if with_users else [])
    body["xelionContext"]["adminUsername"] = "anne"
    body["xelionContext"]["adminPassword"] = "anne-password"
    r = await client.post("/api/crm-integrations", json=body)
    err = assert_error(r, 401, 10004)
    assert "not an admin" in err["info"], err
    assert count(database, XelionContext) == 0


async def test_unreachable_xelion_is_502(client: httpx.AsyncClient) -> None:
    body = integration_body("a")
    body["xelionContext"]["host"] = DOWN_HOST  # nothing listens on its port
    r = await client.post("/api/crm-integrations", json=body)
    assert_error(r, 502, 10500)


async def test_unknown_xelion_user_is_422_naming_it_and_nothing_is_saved(
    client: httpx.AsyncClient, database
) -> None:
    r = await client.post("/api/crm-integrations", json=integration_body("a", users=["anne", "ghost"]))
    body = assert_error(r, 422, 10204)
    assert "ghost" in body["message"]
    assert "userCredentials[1]" in body["info"]
    assert count(database, XelionContext) == 0
    assert count(database, UserCredentials) == 0


async def test_missing_field_is_422_naming_its_path(client: httpx.AsyncClient) -> None:
    body = integration_body("a")
    del body["xelionContext"]["host"]
    r = await client.post("/api/crm-integrations", json=body)
    err = assert_error(r, 422, 10201)
    assert "xelionContext.host: field required" in err["message"]

    body = integration_body("a")
    # A number is taken as its text (test_script_variations.py); an object is no string.
    body["userCredentials"][0]["clientSecret"] = {"value": "x"}
    r = await client.post("/api/crm-integrations", json=body)
    err = assert_error(r, 422, 10201)
    assert "userCredentials[0].clientSecret" in err["message"]

    body = integration_body("a")
    body["xelionContext"]["protocol"] = "ftp"
    err = assert_error(await client.post("/api/crm-integrations", json=body), 422, 10201)
    assert "xelionContext.protocol" in err["message"]

    body = integration_body("a")
    body["eventUriMappings"][0]["xelionEvent"] = ""
    err = assert_error(await client.post("/api/crm-integrations", json=body), 422, 10201)
    assert "eventUriMappings[0].xelionEvent" in err["message"]

    body = integration_body("a")
    body["eventUriMappings"][0]["crmResourcePayload"] = 42
    err = assert_error(await client.post("/api/crm-integrations", json=body), 422, 10201)
    assert "eventUriMappings[0].crmResourcePayload" in err["message"]


async def test_token_endpoint_auth_method_extension(client: httpx.AsyncClient, database) -> None:
    from cti_bridge.store.models import CrmContext

    body = integration_body("a")
    body["crmContext"]["tokenEndpointAuthMethod"] = "client_secret_basic"
    assert (await client.post("/api/crm-integrations", json=body)).status_code == 200
    assert [c.token_auth_method for c in rows(database, CrmContext)] == ["client_secret_basic"]
    body = integration_body("b")
    body["crmContext"]["tokenEndpointAuthMethod"] = "private_key_jwt"
    err = assert_error(await client.post("/api/crm-integrations", json=body), 422, 10201)
    assert "crmContext.tokenEndpointAuthMethod" in err["message"]


async def test_delete_removes_everything(
    client: httpx.AsyncClient, supervisor: RecordingSupervisor, database
) -> None:
    a = await make_integration(client, "a", users=["anne", "bob"])
    r = await client.delete(f"/api/crm-integrations/{a.xelion_id}", headers=OPERATOR)
    assert r.status_code == 200
    assert ("integration_deleted", a.xelion_id) in supervisor.calls
    assert count(database, XelionContext) == 0
    assert count(database, UserCredentials) == 0
    assert count(database, EventUriMapping) == 0
    assert_error(await client.delete(f"/api/crm-integrations/{a.xelion_id}", headers=OPERATOR), 404, 10100)
    # Its session died with it.
    assert_error(await client.get("/api/crm-integrations", headers=auth(a.token)), 401, 10000)


async def test_token_request_parameters_are_stored_shown_and_reach_the_token_store(
    client: httpx.AsyncClient, deps: AdminDeps
) -> None:
    """Extension for Entra ID (Dynamics 365): ``crmContext.tokenRequestParameters`` go with every
    token request of the context's users (``scope`` on the v2 endpoint, ``resource`` on v1)."""
    scope = "https://acme.crm4.dynamics.com/.default offline_access"
    body = integration_body("a")
    body["crmContext"]["tokenRequestParameters"] = {"scope": scope}
    r = await client.post("/api/crm-integrations", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["crmContext"]["tokenRequestParameters"] == {"scope": scope}
    r = await client.get(
        "/api/crm-integrations",
        params={"xelionHost": "pbx-a.example.com", "xelionTenant": "alpha"},
        headers=OPERATOR,
    )
    assert r.json()["crmContext"]["tokenRequestParameters"] == {"scope": scope}
    [cred] = rows(deps.database, UserCredentials)
    assert cred.id is not None
    snapshot = await UserCredentialTokenStore(deps.database, deps.secret_box).load(cred.id)
    assert dict(snapshot.token_parameters) == {"scope": scope}
    # Left out, the manual's shape is unchanged.
    r = await client.post("/api/crm-integrations", json=integration_body("b"))
    assert "tokenRequestParameters" not in r.json()["crmContext"]


@pytest.mark.parametrize(
    "parameters",
    [
        {"refresh_token": "x"},
        {"client_secret": "x"},
        {"grant_type": "password"},
        {"bad name": "x"},
        {"scope": 1.5j},
    ],
    ids=["refresh_token", "client_secret", "grant_type", "bad-name", "not-a-string"],
)
async def test_token_request_parameters_cannot_set_what_the_grant_sets(
    client: httpx.AsyncClient, parameters: dict[str, object]
) -> None:
    body = integration_body("a")
    body["crmContext"]["tokenRequestParameters"] = parameters
    raw = json.dumps(body, default=lambda _: {"x": 1})  # a complex number stands for a non-string
    err = assert_error(await client.post("/api/crm-integrations", **raw_json(raw)), 422, 10201)
    assert "crmContext.tokenRequestParameters" in err["message"]
