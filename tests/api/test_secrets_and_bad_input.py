"""Secrets never leave (responses, the database file); bad input is never a 500; unknown paths,
wrong methods and bugs answer in Xelion's error shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter

from cti_bridge.admin.app import AdminDeps, create_admin_app
from cti_bridge.ports import NullSupervisor
from cti_bridge.store.crypto import SecretBox
from cti_bridge.store.db import Database
from tests.api.conftest import (
    MANUAL_POST_RAW,
    OPERATOR,
    FakeClock,
    assert_error,
    auth,
    integration_body,
    make_integration,
    raw_json,
)


@pytest.fixture
async def sqlite_client(
    sqlite_database: Database, settings_factory, secret_box: SecretBox, xelion_directory, clock: FakeClock
) -> AsyncIterator[httpx.AsyncClient]:
    deps = AdminDeps(
        settings=settings_factory(sqlite_database),
        database=sqlite_database,
        secret_box=secret_box,
        directory=xelion_directory,
        supervisor=NullSupervisor(),
        clock=clock,
    )
    transport = httpx.ASGITransport(app=create_admin_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://cti-bridge.test") as c:
        yield c


async def test_no_secret_in_any_response_nor_in_the_sqlite_file(
    sqlite_client: httpx.AsyncClient, sqlite_database: Database
) -> None:
    client = sqlite_client
    responses: list[httpx.Response] = []
    secrets = ["adminPassword", "yyyyyyyy", "zzzzzzzz", "aaaaaaaa", "pw-a-secret"]
    r = await client.post("/api/crm-integrations", **raw_json(MANUAL_POST_RAW))
    responses.append(r)
    assert r.status_code == 200
    body = integration_body("a", users=["anne", "bob"])
    for u in body["userCredentials"]:
        secrets += [u["clientSecret"], u["deviceCode"], u["refreshToken"]]
    a = await make_integration(client, "a", users=["anne", "bob"])
    x, c = a.xelion_id, a.crm_id
    uid = (
        await client.get(f"/api/crm-integrations/{x}/crm-contexts/{c}/user-credentials", headers=OPERATOR)
    ).json()[0]["userCredentialsId"]
    updates = {
        "clientsecret": "UPD-client-secret-7",
        "refreshtoken": "UPD-refresh-7",
        "devicecode": "UPD-device-7",
    }
    secrets += list(updates.values())
    for kind, value in updates.items():
        r = await client.post(f"/api/users/{uid}/{kind}/update", json={"value": value}, headers=auth(a.token))
        assert r.status_code == 200
        responses.append(r)
    for url, params in (
        ("/api/crm-integrations", {"xelionHost": "pbx-a.example.com", "xelionTenant": "alpha"}),
        ("/api/crm-integrations", None),
        (f"/api/crm-integrations/{x}/crm-contexts/{c}/user-credentials", None),
        (f"/api/crm-integrations/{x}/crm-contexts/{c}/event-uri-mappings", None),
        (f"/api/users/{uid}", None),
        (f"/api/xelion-environment/{x}", None),
    ):
        r = await client.get(url, params=params, headers=OPERATOR)
        assert r.status_code == 200, url
        responses.append(r)
    # Errors too: a wrong old password, a duplicate with secrets in its body.
    responses.append(
        await client.post(
            f"/api/xelion-environment/{x}/admin/password/update",
            json={"oldPassword": "guess", "newPassword": "x"},
            headers=auth(a.token),
        )
    )
    responses.append(await client.post("/api/crm-integrations", json=body))
    for r in responses:
        for secret in secrets:
            assert secret not in r.text, (secret, r.request.url)

    # The database file and its write-ahead log, as bytes: no secret in plain text.
    db_path = Path(sqlite_database.url.removeprefix("sqlite:///"))
    raw = b"".join(p.read_bytes() for p in db_path.parent.glob(db_path.name + "*") if p.is_file())
    assert b"xelionUsername" in raw  # the search does look at the data
    for secret in secrets:
        assert secret.encode() not in raw, secret


# Malformed bodies and values: every answer must be a 4xx in Xelion's shape.
MALFORMED_BODIES: list[bytes] = [
    b"",
    b"   ",
    b"{",
    b"[",
    b"}",
    b"nul",
    b"null",
    b"true",
    b"42",
    b'"text"',
    b"[]",
    b"[[]]",
    b"{}",
    b'{"xelionContext": null}',
    b'{"xelionContext": []}',
    b'{"xelionContext": "x", "crmContext": 1}',
    b"\xff\xfe\x00garbage",
    b'{"a": "\xc3\x28"}',
    b'{"a": NaN}',
    b'{"a": Infinity}',
    b'{"a": 1e999}',
    b'{"a": ' + b"9" * 5000 + b"}",
    b"[" * 5000 + b"]" * 5000,
    b'{"a":' * 200 + b"1" + b"}" * 200,
    b'{"a": "\\ud800"}',
    b'{"a": "\\u0000"}',
    b'{"a": 1,}',
    b"{'a': 1}",
    b'{"a": 1} trailing',
    b"\x00\x00\x00",
]


def _mutations(base: dict) -> list[object]:
    """The manual's body with one value at a time replaced by something of the wrong kind."""
    weird: list[object] = [
        None,
        0,
        -1,
        2**70,
        1.5,
        True,
        "",
        "x" * 70000,
        [],
        {},
        ["x"],
        {"a": "b"},
        "\u0000",
    ]
    out: list[object] = []

    def walk(node: object, path: list[str | int]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, [*path, k])
        elif isinstance(node, list):
            for i, v in enumerate(node[:1]):
                walk(v, [*path, i])
        if path and len(out) < 400:
            for w in weird:
                doc = json.loads(json.dumps(base))
                target = doc
                for p in path[:-1]:
                    target = target[p]
                target[path[-1]] = w
                out.append(doc)

    walk(base, [])
    return out


async def test_fuzzed_bodies_and_values_never_give_500(client: httpx.AsyncClient) -> None:
    a = await make_integration(client, "a")
    x, c = a.xelion_id, a.crm_id
    targets = [
        ("POST", "/api/crm-integrations"),
        ("POST", f"/api/crm-integrations/{x}/crm-contexts/{c}/user-credentials"),
        ("PUT", f"/api/crm-integrations/{x}/crm-contexts/{c}/event-uri-mappings"),
        ("PUT", "/api/users/1"),
        ("POST", "/api/users/1/refreshtoken/update"),
        ("PUT", f"/api/xelion-environment/{x}"),
        ("POST", f"/api/xelion-environment/{x}/admin/password/update"),
        ("POST", f"/api/xelion-environment/{x}/admin/username/update"),
        ("POST", "/api/session/login"),
    ]
    seen: set[int] = set()
    for method, url in targets:
        for raw in MALFORMED_BODIES:
            r = await client.request(
                method, url, content=raw, headers={**OPERATOR, "Content-Type": "application/json"}
            )
            assert r.status_code < 500, (method, url, raw[:40], r.status_code, r.text[:200])
            seen.add(r.status_code)
            if r.status_code >= 400:
                assert set(r.json()) == {"errorCode", "message", "info"}
            else:  # the few that are valid bodies here, e.g. [] (no mappings)
                assert raw.strip() in (b"[]", b"{}"), (method, url, raw[:40])
    manual = json.loads(MANUAL_POST_RAW)
    for doc in _mutations(manual):
        r = await client.post("/api/crm-integrations", json=doc, headers=OPERATOR)
        assert r.status_code != 500, (doc, r.text[:300])
        assert r.status_code == 200 or set(r.json()) == {"errorCode", "message", "info"}
        if r.status_code == 200:  # a mutation that is still valid: remove it to keep testing
            await client.delete(f"/api/crm-integrations/{r.json()['xelionContext']['id']}", headers=OPERATOR)
    mapping = manual["eventUriMappings"][0]
    for doc in _mutations(mapping):
        r = await client.put(
            f"/api/crm-integrations/{x}/crm-contexts/{c}/event-uri-mappings", json=[doc], headers=OPERATOR
        )
        assert r.status_code in (200, 422), (doc, r.text[:300])
    for bad_query in (
        {"xelionHost": "\x00", "xelionTenant": "t"},
        {"limit": "99999999999999999999"},
        {"offset": "-1"},
    ):
        r = await client.get("/api/crm-integrations", params=bad_query, headers=OPERATOR)
        assert_error(r, 422, 10201)
    for bad_id in ("0", "-1", "99999999999999999999999", "1.5", "%00"):
        r = await client.get(f"/api/users/{bad_id}", headers=OPERATOR)
        assert r.status_code in (404, 422), (bad_id, r.status_code)
    assert {400, 422} <= seen


async def test_body_limit_is_413(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/session/login", **raw_json(b'{"a": "' + b"x" * (1024 * 1024) + b'"}'))
    assert_error(r, 413, 10205)


async def test_unknown_path_and_wrong_method_are_in_xelion_shape(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/api/nothing-here", headers=OPERATOR), 404, 10100)
    r = await client.patch("/api/session/login", json={})
    assert_error(r, 405, 10206)
    assert "POST" in r.headers.get("allow", "")


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/api/users/1", "DELETE, GET, HEAD, PUT"),
        ("/api/xelion-environment/1", "GET, HEAD, PUT"),
        ("/api/crm-integrations", "GET, HEAD, POST"),
        ("/api/crm-integrations/1/crm-contexts/2/event-uri-mappings", "GET, HEAD, PUT"),
    ],
)
async def test_a_405_names_every_method_of_the_path(
    client: httpx.AsyncClient, path: str, allowed: str
) -> None:
    """Allow named only the first route that matched the path (``GET`` for api/users/{id}, which
    PUT and DELETE reach too): a README walkthrough's finding."""
    r = await client.patch(path, json={}, headers=OPERATOR)
    assert_error(r, 405, 10206)
    assert r.headers["allow"] == allowed


async def test_a_trailing_slash_reaches_the_route_without_a_redirect(client: httpx.AsyncClient) -> None:
    """A script that writes ``/api/crm-integrations/`` got a 307 and, without following it, failed."""
    body = integration_body("a")
    r = await client.post("/api/crm-integrations/", json=body, headers=OPERATOR)
    assert r.status_code == 200, r.text
    x = r.json()["xelionContext"]["id"]
    r = await client.get(f"/api/xelion-environment/{x}/", headers=OPERATOR)
    assert r.status_code == 200 and r.json()["host"] == body["xelionContext"]["host"], r.text
    assert_error(await client.get("/api/nothing-here/", headers=OPERATOR), 404, 10100)


def _with_a_bug(deps: AdminDeps) -> httpx.AsyncClient:
    """A client of the admin API with one more route, ``GET /api/boom``, that raises."""
    boom = APIRouter()

    @boom.get("/api/boom")
    async def _boom() -> None:
        raise RuntimeError("secret-in-exception-text traceback material")

    deps.extra_routers = [boom]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_admin_app(deps)), base_url="http://t")


async def test_a_bug_is_500_11000_with_no_trace_and_logged(deps: AdminDeps, caplog) -> None:
    async with _with_a_bug(deps) as c:
        r = await c.get("/api/boom")
    body = assert_error(r, 500, 11000)
    assert "secret-in-exception-text" not in r.text and "Traceback" not in r.text
    assert body["message"] == "Internal error"
    logged = [rec for rec in caplog.records if rec.exc_info and isinstance(rec.exc_info[1], RuntimeError)]
    assert len(logged) == 1 and logged[0].levelname == "ERROR"


async def test_every_answer_is_nosniff_and_no_store(deps: AdminDeps) -> None:
    """A success, an error a route raises, an unknown path, a bad query, a bug's catch-all answer and
    a HEAD: none may be cached (they hold tokens and a tenant's configuration) or sniffed."""
    async with _with_a_bug(deps) as c:
        answers = [
            await c.get("/api/health"),
            await c.head("/api/health"),
            await c.get("/api/crm-integrations", headers=OPERATOR),
            await c.get("/api/users/999999", headers=OPERATOR),
            await c.get("/api/nothing-here", headers=OPERATOR),
            await c.get("/api/crm-integrations?limit=x", headers=OPERATOR),
            await c.get("/api/boom"),
        ]
    assert [r.status_code for r in answers] == [200, 200, 200, 404, 404, 422, 500]
    for r in answers:
        assert r.headers.get_list("X-Content-Type-Options") == ["nosniff"], r.request.url
        assert r.headers.get_list("Cache-Control") == ["no-store"], r.request.url


async def test_health_ready_and_openapi(client: httpx.AsyncClient, deps: AdminDeps) -> None:
    r = await client.get("/api/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await client.get("/api/ready")
    assert r.status_code == 200 and r.json()["status"] == "ok"

    async def not_ready() -> tuple[bool, dict[str, object]]:
        return False, {"sources": {"1": "backoff"}}

    deps.readiness = not_ready
    r = await client.get("/api/ready")
    assert r.status_code == 503 and r.json()["sources"] == {"1": "backoff"}

    r = await client.get("/openapi.json")
    spec = r.json()
    post = spec["paths"]["/api/crm-integrations"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/CrmIntegrationIn"
    schemas = spec["components"]["schemas"]
    assert {"adminUsername", "adminPassword", "host", "tenant", "protocol"} <= set(
        schemas["XelionContextIn"]["properties"]
    )
    for path in (
        "/api/crm-integrations/{xelionContextId}/crm-contexts/{crmContextId}/user-credentials",
        "/api/crm-integrations/{xelionContextId}/crm-contexts/{crmContextId}/event-uri-mappings",
        "/api/users/{userId}/{oauthCredentialsType}/update",
        "/api/xelion-environment/{xelionContextId}/admin/password/update",
        "/api/session/login",
    ):
        assert path in spec["paths"], path
    assert (await client.get("/docs")).status_code == 200


async def test_a_lone_surrogate_in_a_key_is_a_422_that_names_it(client: httpx.AsyncClient) -> None:
    """The error naming the key quoted it, and an answer with a lone surrogate cannot be encoded
    as UTF-8: every body route answered 500."""
    r = await client.post("/api/session/login", **raw_json(b'{"\\udfff": 1}'))
    body = assert_error(r, 422, 10201)
    assert "\\udfff" in body["info"] and "surrogate" in body["message"]
    a = await make_integration(client, "a")
    url = f"/api/crm-integrations/{a.xelion_id}/crm-contexts/{a.crm_id}/event-uri-mappings"
    raw = b'[{"xelionEvent":"newCallEvent","crmResourceUri":"https://c.example/x","headers":{"\\ud800":"v"}}]'
    body = assert_error(await client.put(url, **raw_json(raw, OPERATOR)), 422, 10201)
    assert body["info"] == "[0].headers.\\ud800"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("host", "[1:2]"),  # bracketed, not IPv6
        ("host", "pbx..example.com"),  # an empty DNS label
        ("host", "pbx-a.example.com:99999"),
        ("host", "pbx-a.example.com\n"),  # "$" matched before a final newline: a 502, then stored
        ("tenant", "alpha\n"),
        ("authorizationServerUri", "http://127.0.0.1:99999/token"),
        ("authorizationServerUri", "https://crm..example.org/token"),
        ("authorizationServerUri", "https://" + "a" * 64 + ".example.org/token"),
        ("authorizationServerUri", "https://a:-1/token"),
        ("authorizationServerUri", "https://crm.example.org/to\x01ken"),
        ("authorizationHeaderPrefix", "Bearer\r\nX-Injected: 1\r\n"),  # no header can carry these
        ("authorizationHeaderPrefix", "Bearér "),
    ],
)
async def test_hosts_and_uris_no_client_can_send_are_422_not_stored(
    client: httpx.AsyncClient, field: str, value: str
) -> None:
    """Each passed the checks and then failed every use: a 500 of the API, a source failing for
    good, or deliveries failing on every attempt with an internal error."""
    body = integration_body("a")
    part = "xelionContext" if field in ("host", "tenant") else "crmContext"
    body[part][field] = value
    r = await client.post("/api/crm-integrations", json=body, headers=OPERATOR)
    assert_error(r, 422, 10201)
    assert f"{part}.{field}" in r.json()["message"]
    r = await client.get("/api/crm-integrations", headers=OPERATOR)
    assert r.json() == []


async def test_an_environment_host_no_client_can_send_is_422_and_the_old_one_stays(
    client: httpx.AsyncClient,
) -> None:
    a = await make_integration(client, "a")
    url = f"/api/xelion-environment/{a.xelion_id}"
    for host in ("[1:2]", "pbx..example.com", "pbx-a.example.com:0"):
        assert_error(
            await client.put(url, json={"host": host, "tenant": "alpha"}, headers=OPERATOR), 422, 10201
        )
    r = await client.get(url, headers=OPERATOR)
    assert r.status_code == 200 and r.json()["host"] == "pbx-a.example.com", r.text
