"""What scripts written against the manual send besides its examples' exact bytes (an API
compatibility review's findings, each refused or mis-answered before):

- a list filter left empty (``?username=bob&oid=``) filters nothing, not everything out;
- a number where the manual quotes a string (``"xelionOid": 1650950``) is taken as its text, as the
  manual's Java server takes it; a boolean is still a 422;
- a doubled slash from joining a base URL with the manual's paths reaches the route;
- ``HEAD`` answers like ``GET`` without the body, and ``Allow`` names it;
- a body in the charset its ``Content-Type`` declares (Latin-1) is read in that charset.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from cti_bridge.admin.app import AdminDeps
from cti_bridge.admin.routes.deliveries import router as deliveries_router
from tests.api.conftest import OPERATOR, admin_client, assert_error, auth, make_integration, raw_json


def creds_url(x: int, c: int) -> str:
    return f"/api/crm-integrations/{x}/crm-contexts/{c}/user-credentials"


def maps_url(x: int, c: int) -> str:
    return f"/api/crm-integrations/{x}/crm-contexts/{c}/event-uri-mappings"


@pytest.fixture
async def api(deps: AdminDeps) -> AsyncIterator[httpx.AsyncClient]:
    async with admin_client(deps, deliveries_router) as c:
        yield c


async def test_an_empty_filter_filters_nothing(api: httpx.AsyncClient) -> None:
    a = await make_integration(api, "a", users=["anne", "bob"])
    url = creds_url(a.xelion_id, a.crm_id)

    async def names(params: dict[str, str]) -> list[str]:
        r = await api.get(url, params=params, headers=auth(a.token))
        assert r.status_code == 200, r.text
        assert r.headers["X-Total-Count"] == str(len(r.json()))
        return [u["xelionUsername"] for u in r.json()]

    assert await names({"username": "bob", "oid": ""}) == ["bob"]
    assert await names({"username": "", "oid": "1001"}) == ["anne"]
    assert await names({"username": "", "oid": ""}) == ["anne", "bob"]
    assert await names({"username": "zed", "oid": ""}) == []  # a filled-in filter still filters
    r = await api.get(
        "/api/deliveries", params={"state": "", "callId": "", "username": "", "since": ""}, headers=OPERATOR
    )
    assert r.status_code == 200, r.text
    assert r.json()["total"] == 0


async def test_an_empty_number_or_cursor_counts_as_left_out(api: httpx.AsyncClient) -> None:
    """A script filling in a URL template sends ``?limit=&offset=``: the defaults, not a 422."""
    a = await make_integration(api, "a", users=["anne", "bob"])
    r = await api.get(f"{creds_url(a.xelion_id, a.crm_id)}?limit=&offset=&username=", headers=auth(a.token))
    assert r.status_code == 200, r.text
    assert [u["xelionUsername"] for u in r.json()] == ["anne", "bob"]
    r = await api.get("/api/deliveries?xelionContextId=&limit=&offset=&cursor=&state", headers=OPERATOR)
    assert r.status_code == 200, r.text
    assert r.json()["total"] == 0
    # Both left empty: no query, so the operator's list of every integration.
    r = await api.get("/api/crm-integrations?xelionHost=&xelionTenant=", headers=OPERATOR)
    assert r.status_code == 200, r.text
    assert [i["xelionContext"]["id"] for i in r.json()] == [a.xelion_id]
    # One left empty: the other alone is still a 422 naming the one missing.
    err = assert_error(
        await api.get("/api/crm-integrations?xelionHost=&xelionTenant=t", headers=OPERATOR), 422, 10201
    )
    assert "xelionHost" in err["message"]
    # A value made of '=' is not empty; a filled-in number still counts and is still checked.
    r = await api.get("/api/deliveries?callId===&limit=1", headers=OPERATOR)
    assert r.status_code == 200, r.text
    assert_error(await api.get("/api/deliveries?limit=0", headers=OPERATOR), 422, 10201)


async def test_a_number_where_the_manual_quotes_a_string_is_its_text(api: httpx.AsyncClient) -> None:
    a = await make_integration(api, "a", users=["anne"])
    r = await api.post(
        creds_url(a.xelion_id, a.crm_id),
        json={"xelionUsername": "bob", "clientId": 12345, "refreshToken": 987654321},
        headers=auth(a.token),
    )
    assert r.status_code == 200, r.text
    bob = r.json()["userCredentialsId"]
    r = await api.post(f"/api/users/{bob}/clientid/update", json={"value": 67890}, headers=auth(a.token))
    assert r.status_code == 200, r.text
    r = await api.put(f"/api/users/{bob}", json={"xelionOid": 1002}, headers=auth(a.token))
    assert r.status_code == 200, r.text
    assert r.json()["xelionOid"] == "1002"
    # A boolean is no number: still refused, naming the field.
    err = assert_error(
        await api.post(f"/api/users/{bob}/clientid/update", json={"value": True}, headers=auth(a.token)),
        422,
        10201,
    )
    assert "value" in err["message"]


async def test_a_doubled_slash_reaches_the_route(api: httpx.AsyncClient) -> None:
    a = await make_integration(api, "a", users=["anne"])
    r = await api.get(
        httpx.URL(
            f"http://cti-bridge.test//api/crm-integrations/{a.xelion_id}//crm-contexts/{a.crm_id}/user-credentials"
        ),
        headers=auth(a.token),
    )
    assert r.status_code == 200, r.text
    assert [u["xelionUsername"] for u in r.json()] == ["anne"]


async def test_head_is_get_without_the_body(api: httpx.AsyncClient) -> None:
    a = await make_integration(api, "a", users=["anne"])
    url = creds_url(a.xelion_id, a.crm_id)
    got = await api.get(url, headers=auth(a.token))
    head = await api.head(url, headers=auth(a.token))
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == got.headers["content-length"] != "0"
    assert head.headers["X-Total-Count"] == got.headers["X-Total-Count"]
    # Refused like GET: no token.
    assert (await api.head(url)).status_code == 401
    user = got.json()[0]["userCredentialsId"]
    r = await api.post(f"/api/users/{user}", headers=auth(a.token))
    assert_error(r, 405, 10206)
    assert r.headers["Allow"] == "DELETE, GET, HEAD, PUT"


async def test_a_body_in_its_declared_charset_is_read_in_it(api: httpx.AsyncClient) -> None:
    a = await make_integration(api, "a", users=["anne"])
    url = maps_url(a.xelion_id, a.crm_id)
    body = (
        '[{"xelionEvent":"newCallEvent","crmResourceUri":"https://crm.example.org/calls",'
        '"crmResourcePayload":{"subject":"Caf\u00e9 ${callId}"}}]'
    )
    latin1 = body.encode("latin-1")
    # Declared: read as Latin-1.
    r = await api.put(
        url, content=latin1, headers={**OPERATOR, "Content-Type": "application/json; charset=ISO-8859-1"}
    )
    assert r.status_code == 200, r.text
    r = await api.get(url, headers=OPERATOR)
    assert r.json()[0]["crmResourcePayload"] == {"subject": "Caf\u00e9 ${callId}"}
    # Not declared: UTF-8, which these bytes are not (line and column of the first bad byte).
    err = assert_error(await api.put(url, **raw_json(latin1, OPERATOR)), 400, 10200)
    assert err["message"] == "Malformed JSON: the body is not UTF-8"
    assert err["info"] == f"line 1 column {body.index(chr(0xE9)) + 1}"
    # A charset nobody knows is named.
    err = assert_error(
        await api.put(
            url, content=latin1, headers={**OPERATOR, "Content-Type": "application/json; charset=klingon"}
        ),
        400,
        10200,
    )
    assert "klingon" in err["info"]
    # Python's codecs that are no text encoding (a 500 each, LookupError or UnicodeError), and the
    # ones no JSON client uses, are refused by name like an unknown one.
    for charset in ("rot13", "base64", "zlib", "hex", "utf-7", "idna", "punycode", "cp037"):
        err = assert_error(
            await api.put(
                url,
                content=latin1,
                headers={**OPERATOR, "Content-Type": f"application/json; charset={charset}"},
            ),
            400,
            10200,
        )
        assert err["message"] == "Malformed JSON: unsupported charset" and charset in err["info"], err
    # UTF-16 with its byte order mark, as a Windows client may send it.
    r = await api.put(
        url,
        content=body.encode("utf-16"),
        headers={**OPERATOR, "Content-Type": "application/json; charset=UTF-16"},
    )
    assert r.status_code == 200, r.text
    # UTF-8 declared in any spelling is UTF-8.
    r = await api.put(
        url, content=body.encode(), headers={**OPERATOR, "Content-Type": "application/json;charset=utf8"}
    )
    assert r.status_code == 200, r.text
