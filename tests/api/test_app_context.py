"""``POST api/cti-app-context`` and ``POST api/external-api-endpoint/call`` over real sockets.

The admin API runs in-process (ASGI); everything it talks to is real: Xelion simulators checking
user tokens with ``GET me/info`` (one per host name, ``tests.api.xelion_world``), and the CRM
simulator as the external service and its OAuth2 token endpoint (refresh-token rotation,
``invalid_grant``, scripted failures), reached through the production guarded HTTP client
(``build_http_client``) and the production ``TokenManager`` over ``AppContextTokenStore``. Tests of
what the store decides (``h``, ``make``) run on SQLite and on PostgreSQL; tests of HTTP behaviour
(``hs``, ``make_sqlite``) on SQLite only.

The fixtures live here, not in tests/api/conftest.py: they are this resource's own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from sqlmodel import delete, select

from cti_bridge.admin.app import AdminDeps, create_admin_app
from cti_bridge.admin.routes import apps
from cti_bridge.config import Settings
from cti_bridge.delivery.egress import build_http_client
from cti_bridge.delivery.oauth import TokenManager
from cti_bridge.errors import ApiError
from cti_bridge.metrics import Metrics
from cti_bridge.ports import NullSupervisor
from cti_bridge.sim.crm import CrmSimulator, Failure
from cti_bridge.store.app_contexts import AppContextTokenStore
from cti_bridge.store.crypto import SecretBox, hash_token
from cti_bridge.store.db import Database
from cti_bridge.store.models import AppContext
from tests.api.xelion_world import HostsTransport, XelionWorld, xelion_world
from tests.conftest import TEST_SECRET_KEY

CLIENT_ID = "app-client"
CLIENT_SECRET = "app-client-secret-S3CR3T"
HOST, TENANT = "pbx-a.example.com", "alpha"
ALLOWED = ["developer.xelion.nl", "xelionHost.com", HOST, "down.example.com"]

# --- the manual's bodies, verbatim (seeds/xelion-cti-server-api.txt) ------------------------------

MANUAL_COMMENT = (
    " //space here needs to be explicitly set, if expected when putting it into the authorization header."
)
MANUAL_APP_CONTEXT_RAW = (
    """{
        "appExternalApiContext": {
                "authorizationServerUri": "https://externalServiceAuthHost.com/oauth2/v2.0/token",
                "authorizationHeaderPrefix": "myAuthorizationHeaderPrefix \""""
    + MANUAL_COMMENT
    + """
        },
        "appUserContext": {
                "clientId": "myClientId",
                "xelionUsername": "myXelionUsername",
                "clientSecret": "myClientSecret",
                "refreshToken": "myRefreshToken",
                "accessToken": "myAccessToken"
        },
        "appXelionContext": {
                "host": "developer.xelion.nl",
                "tenant": "master"
        }
}"""
)
# The one change JSON needs: the comment goes.
MANUAL_APP_CONTEXT = MANUAL_APP_CONTEXT_RAW.replace(MANUAL_COMMENT, "")

MANUAL_CALL_RAW = """{
        "appXelionContext": {
                "host": "xelionHost.com",
                "tenant": "myTenant"
        },
        "endpointContext": {
                "authorizationServerUri": "https://externalServiceAuthHost.com/oauth2/v2.0/token",
                "endpointUri": "https://externalServiceEndpointHost.com/endpoint?encodedQueryParam1=encodedQueryParamValue1",
                "payload": {
                        "requestPayloadField1": "requestPayloadValue1",
            ...
            ...
            ...
                },
                "method": "POST"
        },
        "xelionUsername": "myXelionUsername"
}"""
# The manual's "..." stand for more fields: without them (and the comma before them) it is JSON.
MANUAL_CALL = MANUAL_CALL_RAW.replace(
    '"requestPayloadValue1",\n            ...\n            ...\n            ...\n', '"requestPayloadValue1"\n'
)


# --- fixtures ----------------------------------------------------------------------------------------


class FakeClock:
    """Wall time the tests move by hand (token expiry); monotonic time moves with it."""

    def __init__(self) -> None:
        self._now = datetime(2026, 1, 5, 9, 0, 0, tzinfo=UTC)
        self._mono = 1000.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._mono += seconds


@dataclass
class Harness:
    """One admin API with its token manager, the Xelion hosts and the external service."""

    client: httpx.AsyncClient
    tokens: TokenManager[int]
    crm: CrmSimulator
    world: XelionWorld
    database: Database
    box: SecretBox
    clock: FakeClock
    user_tokens: dict[tuple[str, str, str], str] = field(default_factory=dict)

    @property
    def token_uri(self) -> str:
        return self.crm.token_url

    def endpoint(self, path: str = "/api/contacts") -> str:
        return self.crm.url + path


@pytest.fixture
async def world() -> AsyncIterator[XelionWorld]:
    async with xelion_world() as w:
        await w.add_host("developer.xelion.nl", "master", "admin", "admin-pw", {"myXelionUsername": "5001"})
        await w.add_host("xelionHost.com", "myTenant", "admin", "admin-pw", {"myXelionUsername": "6001"})
        await w.add_host(HOST, TENANT, "admin-a", "pw-a", {"anne": "1001", "bob": "1002"})
        w.add_down_host("down.example.com")
        yield w


@pytest.fixture
async def crm() -> AsyncIterator[CrmSimulator]:
    async with CrmSimulator() as sim:
        sim.add_client(CLIENT_ID, CLIENT_SECRET)
        yield sim


MakeHarness = Callable[..., Awaitable[Harness]]


def _factory(
    database: Database,
    secret_box: SecretBox,
    world: XelionWorld,
    crm: CrmSimulator,
    closing: list[httpx.AsyncClient],
) -> MakeHarness:
    """Build a harness; ``external_http`` replaces the production guarded client when given."""

    async def build(
        *,
        allow_private: bool = True,
        request_timeout: float = 5.0,
        external_http: httpx.AsyncClient | None = None,
    ) -> Harness:
        settings = Settings(
            database_url=database.url,
            secret_key=TEST_SECRET_KEY,
            allowed_xelion_hosts=ALLOWED,
            allow_private_targets=allow_private,
            request_timeout=request_timeout,
            connect_timeout=2.0,
        )
        http = external_http or build_http_client(settings)
        closing.append(http)
        clock = FakeClock()
        tokens = TokenManager(
            AppContextTokenStore(database, secret_box),
            http,
            clock,
            settings.token_refresh_margin_seconds,
            allow_private=allow_private,
        )
        deps = AdminDeps(
            settings=settings,
            database=database,
            secret_box=secret_box,
            directory=world.directory,
            supervisor=NullSupervisor(),
            clock=clock,
            app_tokens=tokens,
            external_http=http,
        )
        app = create_admin_app(deps)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cti-bridge.test")
        closing.append(client)
        return Harness(client, tokens, crm, world, database, secret_box, clock)

    return build


@pytest.fixture
async def make(
    database: Database, secret_box: SecretBox, world: XelionWorld, crm: CrmSimulator
) -> AsyncIterator[MakeHarness]:
    """Harnesses over SQLite and PostgreSQL: for what the store decides."""
    closing: list[httpx.AsyncClient] = []
    yield _factory(database, secret_box, world, crm, closing)
    for c in closing:
        await c.aclose()


@pytest.fixture
async def make_sqlite(
    sqlite_database: Database, secret_box: SecretBox, world: XelionWorld, crm: CrmSimulator
) -> AsyncIterator[MakeHarness]:
    """Harnesses over SQLite only: for HTTP behaviour, where the database plays no part (a fresh
    PostgreSQL database per test costs a second)."""
    closing: list[httpx.AsyncClient] = []
    yield _factory(sqlite_database, secret_box, world, crm, closing)
    for c in closing:
        await c.aclose()


@pytest.fixture
async def h(make: MakeHarness) -> Harness:
    return await make()


@pytest.fixture
async def hs(make_sqlite: MakeHarness) -> Harness:
    return await make_sqlite()


# --- helpers -----------------------------------------------------------------------------------------


async def user_token(h: Harness, user: str, host: str = HOST, tenant: str = TENANT) -> str:
    """A Xelion user token: the user logs in on the simulator of ``host`` (as an app would)."""
    key = (host, tenant, user)
    if key not in h.user_tokens:
        r = await h.world.client.post(
            f"https://{host}/api/v1/{tenant}/me/login",
            json={
                "userName": user,
                "password": f"{user}-password",
                "userSpace": "app-" + secrets.token_hex(4),
            },
        )
        assert r.status_code == 200, r.text
        h.user_tokens[key] = r.json()["authentication"]
    return h.user_tokens[key]


def app_body(
    h: Harness,
    user: str = "anne",
    *,
    access: str,
    refresh: str,
    client_secret: str | None = CLIENT_SECRET,
    token_uri: str | None = None,
    prefix: str = "Bearer ",
    host: str = HOST,
    tenant: str = TENANT,
    auth_method: str | None = None,
) -> dict[str, Any]:
    user_context: dict[str, Any] = {
        "clientId": CLIENT_ID,
        "xelionUsername": user,
        "refreshToken": refresh,
        "accessToken": access,
    }
    if client_secret is not None:
        user_context["clientSecret"] = client_secret
    external_context: dict[str, Any] = {
        "authorizationServerUri": token_uri or h.token_uri,
        "authorizationHeaderPrefix": prefix,
    }
    if auth_method is not None:
        external_context["tokenEndpointAuthMethod"] = auth_method
    return {
        "appExternalApiContext": external_context,
        "appUserContext": user_context,
        "appXelionContext": {"host": host, "tenant": tenant},
    }


async def register(
    h: Harness, user: str = "anne", *, access: str | None = None, refresh: str | None = None, **kw: Any
) -> tuple[str, str]:
    """POST api/cti-app-context for ``user`` with tokens the service knows (unless given)."""
    access = access or h.crm.issue_access_token(CLIENT_ID)
    refresh = refresh or h.crm.issue_refresh_token(CLIENT_ID)
    token = await user_token(h, user)
    r = await h.client.post(
        "/api/cti-app-context",
        json=app_body(h, user, access=access, refresh=refresh, **kw),
        headers={"Authorization": f"xelion {token}"},
    )
    assert r.status_code == 200, r.text
    return access, refresh


def call_body(
    h: Harness,
    user: str = "anne",
    *,
    endpoint: str | None = None,
    method: str = "POST",
    payload: Any = None,
    token_uri: str | None = None,
    host: str = HOST,
    tenant: str = TENANT,
) -> dict[str, Any]:
    return {
        "appXelionContext": {"host": host, "tenant": tenant},
        "endpointContext": {
            "authorizationServerUri": token_uri or h.token_uri,
            "endpointUri": endpoint or h.endpoint(),
            "payload": {"subject": "call"} if payload is None else payload,
            "method": method,
        },
        "xelionUsername": user,
    }


async def call(h: Harness, token: str, user: str = "anne", **kw: Any) -> httpx.Response:
    return await h.client.post(
        "/api/external-api-endpoint/call",
        json=call_body(h, user, **kw),
        headers={"Authorization": f"xelion_cti {token}"},
    )


def contexts(database: Database) -> list[AppContext]:
    with database.session() as s:
        return list(s.exec(select(AppContext).order_by(AppContext.id)).all())  # type: ignore[arg-type]


def assert_error(r: httpx.Response, status: int, code: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert set(body) == {"errorCode", "message", "info"}, body
    assert body["errorCode"] == code, body
    return body


def sqlite_bytes(database: Database) -> bytes:
    """The raw bytes of a SQLite database: its file and its write-ahead log (WAL mode)."""
    path = Path(database.url.removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


def closed_port() -> tuple[socket.socket, int]:
    """A port of 127.0.0.1 bound but not listening: connections to it are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock, int(sock.getsockname()[1])


# --- POST api/cti-app-context ---------------------------------------------------------------------------


async def test_manual_app_context_body_with_its_comment_is_400_with_line_and_column(hs: Harness) -> None:
    token = await user_token(hs, "myXelionUsername", "developer.xelion.nl", "master")
    r = await hs.client.post(
        "/api/cti-app-context",
        content=MANUAL_APP_CONTEXT_RAW.encode(),
        headers={"Authorization": f"xelion {token}", "Content-Type": "application/json"},
    )
    body = assert_error(r, 400, 10200)
    lines = MANUAL_APP_CONTEXT_RAW.splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "//space" in text)
    column = lines[line - 1].index("//") + 1
    assert f"line {line} column {column}" in body["info"], body
    assert contexts(hs.database) == []


async def test_manual_app_context_body_is_stored_with_its_secrets_encrypted(h: Harness) -> None:
    token = await user_token(h, "myXelionUsername", "developer.xelion.nl", "master")
    r = await h.client.post(
        "/api/cti-app-context",
        content=MANUAL_APP_CONTEXT.encode(),
        headers={"Authorization": f"xelion {token}", "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {}
    [row] = contexts(h.database)
    assert (row.host, row.tenant, row.xelion_username) == (
        "developer.xelion.nl",
        "master",
        "myXelionUsername",
    )
    assert row.authorization_server_uri == "https://externalServiceAuthHost.com/oauth2/v2.0/token"
    assert row.authorization_header_prefix == "myAuthorizationHeaderPrefix "  # its space kept
    assert row.client_id == "myClientId"
    assert h.box.decrypt(row.client_secret_enc or "") == "myClientSecret"
    assert h.box.decrypt(row.refresh_token_enc or "") == "myRefreshToken"
    assert h.box.decrypt(row.access_token_enc or "") == "myAccessToken"
    assert row.access_token_expires_at is None  # unknown: used until a 401
    assert (row.state, row.state_reason) == ("active", None)
    assert row.token_auth_method == "client_secret_post"  # the default
    assert row.token_extra_enc is None
    stored = json.dumps(row.model_dump(), default=str)
    for secret in ("myClientSecret", "myRefreshToken", "myAccessToken", token):
        assert secret not in stored
        assert secret not in r.text


async def test_a_user_deletes_their_own_app_context_and_its_secrets_go(h: Harness) -> None:
    """Extension: the manual never lets an app context go, so a user who stopped using the service
    (or left) kept a refresh token here for good. ``DELETE api/cti-app-context`` with the POST's key
    parts (a whole POST body works too) and the user's own Xelion token, checked as the POST."""
    access, refresh = await register(h, "anne")
    await register(h, "bob")
    key_only = {
        "appExternalApiContext": {"authorizationServerUri": h.token_uri},
        "appUserContext": {"xelionUsername": "anne"},
        "appXelionContext": {"host": HOST, "tenant": TENANT},
    }

    async def delete_as(user: str | None, body: dict[str, Any]) -> httpx.Response:
        headers = {} if user is None else {"Authorization": f"xelion {await user_token(h, user)}"}
        return await h.client.request("DELETE", "/api/cti-app-context", json=body, headers=headers)

    assert_error(await delete_as(None, key_only), 401, 10000)
    # Who calls is asked before the body is read: without a token, a bad body is a 401 too.
    for method in ("POST", "DELETE"):
        r = await h.client.request(method, "/api/cti-app-context", json={"appUserContext": {}})
        assert_error(r, 401, 10000)
    assert_error(await delete_as("bob", key_only), 403, 10101)  # bob's token, anne's context
    assert len(contexts(h.database)) == 2
    assert (await call(h, access)).status_code == 201  # still there, still working (the service: 201)

    r = await delete_as("anne", app_body(h, "anne", access="x" * 8, refresh="y" * 8))  # a POST body
    assert (r.status_code, r.json()) == (200, {})
    assert [c.xelion_username for c in contexts(h.database)] == ["bob"]
    assert_error(await call(h, access), 404, 10100)  # nothing to call with any more
    assert_error(await delete_as("anne", key_only), 404, 10100)
    assert access not in r.text and refresh not in r.text


async def test_manual_call_body_reaches_the_service_as_the_manual_says(
    make_sqlite: MakeHarness, crm: CrmSimulator
) -> None:
    # The manual's hosts are names: an /etc/hosts-like transport sends them to the simulator.
    external = httpx.AsyncClient(
        transport=HostsTransport(
            {"externalserviceendpointhost.com": crm.port, "externalserviceauthhost.com": crm.port}
        )
    )
    h = await make_sqlite(external_http=external)
    h.crm.auth_required = False  # the manual's "myAccessToken" is not one the simulator issued
    body = json.loads(MANUAL_APP_CONTEXT)
    body["appXelionContext"] = {"host": "xelionHost.com", "tenant": "myTenant"}  # where the call is
    token = await user_token(h, "myXelionUsername", "xelionHost.com", "myTenant")
    r = await h.client.post("/api/cti-app-context", json=body, headers={"Authorization": f"xelion {token}"})
    assert r.status_code == 200, r.text

    r = await h.client.post(
        "/api/external-api-endpoint/call",
        content=MANUAL_CALL.encode(),
        headers={"Authorization": "xelion_cti myAccessToken", "Content-Type": "application/json"},
    )
    assert r.status_code == 201, r.text  # the service's own status
    assert r.json() == {"accessToken": "myAccessToken", "payload": {"ok": True}}
    [seen] = h.crm.received
    assert (seen.method, seen.path, seen.query) == (
        "POST",
        "/endpoint",
        "encodedQueryParam1=encodedQueryParamValue1",
    )
    assert seen.headers["Authorization"] == "myAuthorizationHeaderPrefix myAccessToken"
    assert seen.json() == {"requestPayloadField1": "requestPayloadValue1"}

    r = await h.client.post(
        "/api/external-api-endpoint/call",
        content=MANUAL_CALL_RAW.encode(),
        headers={"Authorization": "xelion_cti myAccessToken", "Content-Type": "application/json"},
    )
    assert "line 11 column" in assert_error(r, 400, 10200)["info"]  # the manual's "..." are not JSON


async def test_second_post_replaces_the_credentials_and_the_cached_token(h: Harness) -> None:
    first, _ = await register(h)
    r = await call(h, first)
    assert r.status_code == 201, r.text  # the token manager now caches ``first``
    [before] = contexts(h.database)

    second, refresh2 = await register(h, client_secret=None)  # clientSecret is optional
    [row] = contexts(h.database)
    assert row.id == before.id and row.version == before.version + 1
    assert row.client_secret_enc is None
    assert h.box.decrypt(row.refresh_token_enc or "") == refresh2
    assert h.box.decrypt(row.access_token_enc or "") == second

    assert_error(await call(h, first), 401, 10000)  # replaced by its owner: it opens nothing now
    r = await call(h, second)
    assert r.status_code == 201, r.text
    assert r.json()["accessToken"] == second
    assert h.crm.received[-1].headers["Authorization"] == f"Bearer {second}"

    # Another authorization server is another context of the same user.
    other_uri = h.crm.url + "/other/oauth2/token"
    third, _ = await register(h, token_uri=other_uri)
    assert len(contexts(h.database)) == 2
    r = await call(h, third, token_uri=other_uri)
    assert r.status_code == 201, r.text
    assert_error(await call(h, third), 401, 10000)  # not the token of the first context


async def test_another_replicas_cached_token_is_dropped_once_the_context_is_posted_again(h: Harness) -> None:
    """Replicas share the database, not their token caches: a second POST through this replica's
    API reaches another replica's token manager only through the context's ``version``, which its
    follow pass (``drop_changed`` over ``AppContextTokenStore.versions``) reads."""
    first, _ = await register(h)
    [row] = contexts(h.database)
    assert row.id is not None
    async with httpx.AsyncClient() as http:
        other = TokenManager(AppContextTokenStore(h.database, h.box), http, h.clock, 60, allow_private=True)
        assert (await other.get(row.id)).access_token == first
        assert await other.drop_changed() == []  # nothing changed: the cached token stays

        second, _ = await register(h)  # the user posts again (through this replica's API)
        cached = other.peek(row.id)
        assert cached is not None and cached.access_token == first  # not heard of it yet
        assert await other.drop_changed() == [row.id]
        assert other.peek(row.id) is None
        assert (await other.get(row.id)).access_token == second
        assert await other.drop_changed() == []

        await h.database.run(lambda s: s.execute(delete(AppContext)))  # deleted: forgotten as well
        assert await other.drop_changed() == [row.id]
        assert other.peek(row.id) is None


async def test_the_xelion_token_must_be_valid_there_and_the_users_own(hs: Harness) -> None:
    body = app_body(hs, "anne", access="a", refresh="r")
    url = "/api/cti-app-context"
    assert_error(await hs.client.post(url, json=body), 401, 10000)
    assert_error(await hs.client.post(url, json=body, headers={"Authorization": "Bearer x"}), 401, 10000)
    assert_error(await hs.client.post(url, json=body, headers={"Authorization": "xelion 0f0f0f"}), 401, 10000)

    bob = await user_token(hs, "bob")
    r = await hs.client.post(url, json=body, headers={"Authorization": f"xelion {bob}"})
    assert_error(r, 403, 10101)  # a user registers credentials for himself only

    anne = await user_token(hs, "anne")
    elsewhere = app_body(hs, "anne", access="a", refresh="r", tenant="beta")
    r = await hs.client.post(url, json=elsewhere, headers={"Authorization": f"xelion {anne}"})
    assert_error(r, 401, 10000)  # valid on tenant alpha only

    not_allowed = app_body(hs, "anne", access="a", refresh="r", host="pbx-z.example.com")
    r = await hs.client.post(url, json=not_allowed, headers={"Authorization": f"xelion {anne}"})
    assert_error(r, 403, 10203)

    down = app_body(hs, "anne", access="a", refresh="r", host="down.example.com")
    r = await hs.client.post(url, json=down, headers={"Authorization": f"xelion {anne}"})
    assert_error(r, 502, 10500)

    assert contexts(hs.database) == []
    r = await hs.client.post(url, json=body, headers={"Authorization": f"xelion {anne}"})
    assert r.status_code == 200, r.text


async def test_app_context_bad_input_names_the_field(hs: Harness) -> None:
    anne = {"Authorization": f"xelion {await user_token(hs, 'anne')}"}
    url = "/api/cti-app-context"
    r = await hs.client.post(url, content=b'{"appUserContext": ', headers=anne)
    assert_error(r, 400, 10200)
    body = app_body(hs, "anne", access="a", refresh="r")
    del body["appUserContext"]["refreshToken"]
    assert (
        "appUserContext.refreshToken"
        in assert_error(await hs.client.post(url, json=body, headers=anne), 422, 10201)["message"]
    )
    body = app_body(hs, "anne", access="a", refresh="r", host="pbx-a.example.com/evil")
    assert (
        "appXelionContext.host"
        in assert_error(await hs.client.post(url, json=body, headers=anne), 422, 10201)["message"]
    )
    body = app_body(hs, "anne", access="a", refresh="r", token_uri="ftp://x/token")
    r = await hs.client.post(url, json=body, headers=anne)
    assert "appExternalApiContext.authorizationServerUri" in assert_error(r, 422, 10201)["message"]
    body = app_body(hs, "anne", access="a", refresh="r", auth_method="private_key_jwt")
    r = await hs.client.post(url, json=body, headers=anne)
    assert "appExternalApiContext.tokenEndpointAuthMethod" in assert_error(r, 422, 10201)["message"]
    assert contexts(hs.database) == []


# --- POST api/external-api-endpoint/call --------------------------------------------------------------


async def test_call_sends_method_payload_query_and_prefix_and_answers_the_services_json(hs: Harness) -> None:
    access, _ = await register(hs, prefix="Token ")
    r = await call(
        hs,
        access,
        endpoint=hs.endpoint("/api/contacts?name=Anne%20Hunter&x=1"),
        method="put",
        payload={"a": [1, 2]},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"accessToken": access, "payload": {"ok": True}}
    [seen] = hs.crm.received
    assert (seen.method, seen.path, seen.query) == ("PUT", "/api/contacts", "name=Anne%20Hunter&x=1")
    assert seen.headers["Authorization"] == f"Token {access}"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.json() == {"a": [1, 2]}

    r = await call(hs, access, method="GET")
    assert r.status_code == 200, r.text
    assert (hs.crm.received[-1].method, hs.crm.received[-1].body) == ("GET", b"")  # a GET has no body
    assert hs.crm.token_counts["refresh_token"] == 0  # the stored token was good


async def test_call_keeps_the_callers_url_encoding(hs: Harness) -> None:
    access, _ = await register(hs)
    query = "path=a%2Fb&tilde=%7E&q=%3f%26&plus=a+b"
    r = await call(hs, access, endpoint=hs.endpoint("/api/files?" + query))
    assert r.status_code == 201, r.text
    assert hs.crm.received[-1].query == query


async def test_a_401_refreshes_once_with_rotation_and_the_replaced_token_still_opens(h: Harness) -> None:
    h.crm.rotate_refresh_tokens = True
    stale = "at-stale-" + secrets.token_hex(8)  # one the service does not know: it answers 401
    _, refresh = await register(h, access=stale)

    r = await call(h, stale)
    assert r.status_code == 201, r.text
    fresh = r.json()["accessToken"]
    assert fresh != stale and h.crm.access_token_valid(fresh)
    assert r.json()["payload"] == {"ok": True}
    assert h.crm.token_counts["refresh_token"] == 1
    assert h.crm.token_requests[0].auth_method == "client_secret_post"  # the default
    assert [seen.headers["Authorization"] for seen in h.crm.received] == [
        f"Bearer {stale}",
        f"Bearer {fresh}",
    ]
    [row] = contexts(h.database)
    assert not h.crm.refresh_token_valid(refresh)  # rotated: the old one is dead at the provider
    [rotated] = h.crm.current_refresh_tokens(CLIENT_ID)
    assert h.box.decrypt(row.refresh_token_enc or "") == rotated
    assert h.box.decrypt(row.access_token_enc or "") == fresh
    assert row.previous_access_token_hash == hash_token(stale)
    assert row.access_token_expires_at == h.clock.now() + timedelta(seconds=3600)

    # A caller still holding the replaced token (in flight during the refresh) gets through and
    # learns the current one; no new refresh.
    r = await call(h, stale)
    assert r.status_code == 201, r.text
    assert r.json()["accessToken"] == fresh
    assert h.crm.token_counts["refresh_token"] == 1

    # Only the last replaced token: after a second refresh, the first is refused.
    h.crm.revoke_access_tokens()
    r = await call(h, fresh)
    assert r.status_code == 201, r.text
    newest = r.json()["accessToken"]
    assert newest not in (stale, fresh)
    assert h.crm.token_counts["refresh_token"] == 2
    assert_error(await call(h, stale), 401, 10000)
    assert (await call(h, fresh)).json()["accessToken"] == newest


async def test_rotated_tokens_are_committed_before_the_new_access_token_is_used(make: MakeHarness) -> None:
    """reliability.md §11, seen from the service: when it receives the new access token, the
    database already holds it and the rotated refresh token."""
    observed: list[tuple[str, str, str]] = []
    holder: list[Harness] = []

    class Spy(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.path.startswith("/api/"):
                hh = holder[0]
                [row] = contexts(hh.database)
                observed.append(
                    (
                        request.headers["Authorization"].removeprefix("Bearer "),
                        hh.box.decrypt(row.access_token_enc or ""),
                        hh.box.decrypt(row.refresh_token_enc or ""),
                    )
                )
            return await self.inner.handle_async_request(request)

    h = await make(external_http=httpx.AsyncClient(transport=Spy()))
    holder.append(h)
    h.crm.rotate_refresh_tokens = True
    stale = "at-stale-" + secrets.token_hex(8)
    await register(h, access=stale)
    r = await call(h, stale)
    assert r.status_code == 201, r.text
    fresh = r.json()["accessToken"]
    [rotated] = h.crm.current_refresh_tokens(CLIENT_ID)
    assert observed[0][0] == stale
    assert observed[1] == (fresh, fresh, rotated)


async def test_a_post_during_a_refresh_wins_over_the_refresh(h: Harness) -> None:
    """The user posts new credentials while a refresh is in flight: the refresh's answer is not
    committed over them (compare-and-set on version), and the retry uses the posted token."""
    stale = "at-stale-" + secrets.token_hex(8)
    await register(h, access=stale)
    posted: list[tuple[str, str]] = []

    async def during_refresh(grant_type: str) -> None:
        if not posted:
            posted.append(await register(h))

    h.crm.token_hook = during_refresh
    r = await call(h, stale)
    assert r.status_code == 201, r.text
    [(new_access, new_refresh)] = posted
    assert r.json()["accessToken"] == new_access
    assert h.crm.received[-1].headers["Authorization"] == f"Bearer {new_access}"
    [row] = contexts(h.database)
    assert h.box.decrypt(row.access_token_enc or "") == new_access
    assert h.box.decrypt(row.refresh_token_enc or "") == new_refresh
    assert row.previous_access_token_hash is None


async def test_concurrent_calls_for_one_user_make_one_refresh(h: Harness) -> None:
    h.crm.rotate_refresh_tokens = True
    stale = "at-stale-" + secrets.token_hex(8)
    await register(h, access=stale)
    answers = await asyncio.gather(*(call(h, stale, payload={"n": n}) for n in range(20)))
    assert [r.status_code for r in answers] == [201] * 20, [r.text for r in answers if r.status_code != 201]
    assert len({r.json()["accessToken"] for r in answers}) == 1
    assert h.crm.token_counts["refresh_token"] == 1
    assert sorted(s.json()["n"] for s in h.crm.received if s.status == 201) == list(range(20))


async def test_a_token_that_is_not_the_one_held_is_401_and_nothing_is_sent(h: Harness) -> None:
    anne, _ = await register(h, "anne")
    bob, _ = await register(h, "bob")
    assert_error(await call(h, bob, "anne"), 401, 10000)  # bob's token does not open anne's context
    assert_error(await call(h, "at-guessed", "anne"), 401, 10000)
    r = await h.client.post("/api/external-api-endpoint/call", json=call_body(h, "anne"))
    assert_error(r, 401, 10000)
    r = await h.client.post(
        "/api/external-api-endpoint/call",
        json=call_body(h, "anne"),
        headers={"Authorization": f"xelion {anne}"},
    )
    assert_error(r, 401, 10000)  # the scheme is xelion_cti
    assert h.crm.received == [] and h.crm.token_requests == []
    assert (await call(h, anne, "anne")).status_code == 201
    assert (await call(h, bob, "bob")).status_code == 201


async def test_unknown_context_is_404(h: Harness) -> None:
    access, _ = await register(h)
    assert_error(await call(h, access, token_uri=h.token_uri + "/"), 404, 10100)  # exact match
    assert_error(await call(h, access, "bob"), 404, 10100)
    assert_error(await call(h, access, tenant="beta"), 404, 10100)
    assert (await call(h, access, host="PBX-A.example.com")).status_code == 201  # a host name's case


async def test_call_bad_input_names_the_field(hs: Harness) -> None:
    access, _ = await register(hs)
    url = "/api/external-api-endpoint/call"
    auth = {"Authorization": f"xelion_cti {access}"}
    assert_error(await hs.client.post(url, content=b"{,}", headers=auth), 400, 10200)
    for path, value, field_name in (
        (("endpointContext", "method"), None, "endpointContext.method"),
        (("endpointContext", "method"), "TRACE", "endpointContext.method"),
        (("endpointContext", "endpointUri"), "file:///etc/passwd", "endpointContext.endpointUri"),
        # URIs no client can send: each was a 500 (a port out of range, an empty DNS label, a
        # control character)
        (("endpointContext", "endpointUri"), "http://127.0.0.1:99999/x", "endpointContext.endpointUri"),
        (("endpointContext", "endpointUri"), "http://a..b/x", "endpointContext.endpointUri"),
        (("endpointContext", "endpointUri"), "http://127.0.0.1:9/\x01", "endpointContext.endpointUri"),
        (("xelionUsername",), None, "xelionUsername"),
        (("appXelionContext", "tenant"), "a/b", "appXelionContext.tenant"),
    ):
        body = call_body(hs)
        parent = body
        for part in path[:-1]:
            parent = parent[part]
        if value is None:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        error = assert_error(await hs.client.post(url, json=body, headers=auth), 422, 10201)
        assert field_name in error["message"], error
    assert hs.crm.received == []


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:99999/x",
        "http://a..b/x",
        "http://127.0.0.1:9/\x01",
        "http://" + "a" * 64 + ".example/x",
    ],
)
async def test_a_url_the_client_cannot_send_is_a_422_at_the_call_as_well(url: str) -> None:
    """The endpoint URI's check refuses these before any call; the call itself, the last line,
    answers the same instead of a 500 for any it does not foresee."""
    async with build_http_client(Settings(allow_private_targets=True)) as http:
        with pytest.raises(ApiError) as info:
            await apps._send(http, "GET", url, {}, None, 1024)
    assert info.value.status == 422 and "endpointContext.endpointUri" in info.value.message


async def test_service_errors_are_answered_as_they_came(hs: Harness) -> None:
    access, _ = await register(hs)
    problem = b'{"error": {"code": "BadRequest", "message": "subject is required"}}'
    hs.crm.script(Failure.http(400, problem))
    r = await call(hs, access)
    assert (r.status_code, r.content) == (400, problem)
    assert r.headers["Content-Type"].startswith("application/json")

    hs.crm.script(Failure(status=503, headers={"Retry-After": "7"}, body=b"down for maintenance"))
    r = await call(hs, access)
    assert (r.status_code, r.content, r.headers["Retry-After"]) == (503, b"down for maintenance", "7")

    # A passed-through body keeps the service's Content-Type; a browser must not sniff it into HTML,
    # and an answer that may carry a token is not for any cache.
    hs.crm.script(Failure(status=400, body=b"<script>x()</script>"))
    r = await call(hs, access)
    assert (r.status_code, r.content) == (400, b"<script>x()</script>")
    assert (r.headers["X-Content-Type-Options"], r.headers["Cache-Control"]) == ("nosniff", "no-store")

    hs.crm.script(Failure(status=204, body=b""))
    r = await call(hs, access)
    assert (r.status_code, r.json()) == (200, {"accessToken": access, "payload": None})
    assert r.headers["Cache-Control"] == "no-store"  # it carries the access token (RFC 6749 §5.1)

    hs.crm.script(Failure(status=200, body=b"plain words"))
    assert (await call(hs, access)).json() == {"accessToken": access, "payload": "plain words"}

    hs.crm.script(Failure(status=302, headers={"Location": hs.endpoint("/elsewhere")}))
    before = len(hs.crm.received)
    assert_error(await call(hs, access), 502, 10501)
    assert len(hs.crm.received) == before + 1  # the redirect was not followed


async def test_a_hanging_service_is_504_and_a_down_one_502(make_sqlite: MakeHarness) -> None:
    h = await make_sqlite(request_timeout=0.5)
    access, _ = await register(h)
    h.crm.script(Failure.slow(5.0))
    started = asyncio.get_running_loop().time()
    body = assert_error(await call(h, access), 504, 10502)
    assert asyncio.get_running_loop().time() - started < 3.0
    assert "127.0.0.1" in body["info"]

    sock, port = closed_port()
    try:
        body = assert_error(await call(h, access, endpoint=f"http://127.0.0.1:{port}/api/x"), 502, 10501)
    finally:
        sock.close()
    assert "could not be reached" in body["message"]


async def test_the_outbound_guard_applies(make_sqlite: MakeHarness) -> None:
    h = await make_sqlite(allow_private=False)
    access, _ = await register(h)
    for endpoint in (h.endpoint(), f"http://localhost:{h.crm.port}/api/x", "http://169.254.169.254/latest"):
        error = assert_error(await call(h, access, endpoint=endpoint), 422, 10201)
        assert "endpointContext.endpointUri" in error["message"] and "outbound guard" in error["message"]
    assert h.crm.received == []


def _apps_reauth_gauge(database: Database) -> float:
    """``cti_bridge_app_contexts_reauth_required`` as a scrape of ``api/metrics`` renders it."""
    text = generate_latest(Metrics(database).store_registry).decode()
    [line] = [ln for ln in text.splitlines() if ln.startswith("cti_bridge_app_contexts_reauth_required ")]
    return float(line.split()[1])


async def test_a_refused_grant_is_401_until_the_context_is_posted_again(h: Harness) -> None:
    stale = "at-stale-" + secrets.token_hex(8)
    _, refresh = await register(h, access=stale)
    [before] = contexts(h.database)
    h.crm.invalid_grant_all = True
    body = assert_error(await call(h, stale), 401, 10503)
    assert "cti-app-context" in body["info"]
    assert "invalid_grant" in body["info"]  # the reason
    assert h.crm.token_counts["refresh_token"] == 1
    [row] = contexts(h.database)
    assert (row.state, row.state_reason) == ("reauth_required", "the token endpoint answered invalid_grant")
    assert h.box.decrypt(row.refresh_token_enc or "") == refresh  # kept: the state says it is dead
    assert h.box.decrypt(row.access_token_enc or "") == stale
    assert row.version == before.version  # no secret changed
    assert _apps_reauth_gauge(h.database) == 1.0  # an operator can alert on it

    # The dead grant is not tried again, and nothing is sent to the service.
    sent = len(h.crm.received)
    body = assert_error(await call(h, stale), 401, 10503)
    assert "invalid_grant" in body["info"] and "cti-app-context" in body["info"]
    assert h.crm.token_counts["refresh_token"] == 1
    assert len(h.crm.received) == sent
    # Another token still proves nothing: the state is told only to the token's holder.
    assert_error(await call(h, "at-guessed"), 401, 10000)
    for secret in (stale, refresh, CLIENT_SECRET):
        assert secret not in body["info"]

    h.crm.invalid_grant_all = False
    _, new_refresh = await register(h, access=stale)  # the user posts a new refresh token
    [row] = contexts(h.database)
    assert (row.state, row.state_reason) == ("active", None)
    assert _apps_reauth_gauge(h.database) == 0.0
    assert h.box.decrypt(row.refresh_token_enc or "") == new_refresh
    r = await call(h, stale)
    assert r.status_code == 201, r.text
    assert h.crm.token_counts["refresh_token"] == 2
    fresh = r.json()["accessToken"]
    assert (await call(h, fresh)).status_code == 201  # and calls go on working
    assert h.crm.token_counts["refresh_token"] == 2


async def test_a_post_during_a_refused_refresh_is_not_condemned(h: Harness) -> None:
    """The stored grant is refused while the user posts new credentials: marking the context
    ``reauth_required`` loses against the newer version (reliability.md §13), and the call goes on
    with the posted token."""
    stale = "at-stale-" + secrets.token_hex(8)
    await register(h, access=stale, refresh="rt-unknown-to-the-provider")
    posted: list[tuple[str, str]] = []

    async def during_refresh(grant_type: str) -> None:
        if not posted:
            posted.append(await register(h))

    h.crm.token_hook = during_refresh
    r = await call(h, stale)
    assert r.status_code == 201, r.text
    [(new_access, new_refresh)] = posted
    assert r.json()["accessToken"] == new_access
    assert [t.status for t in h.crm.token_requests] == [400]  # the refused one only
    [row] = contexts(h.database)
    assert (row.state, row.state_reason) == ("active", None)
    assert _apps_reauth_gauge(h.database) == 0.0
    assert h.box.decrypt(row.refresh_token_enc or "") == new_refresh


async def test_extra_token_fields_are_stored_encrypted_and_a_post_clears_them(
    make_sqlite: MakeHarness,
) -> None:
    h = await make_sqlite()
    instance = f"https://instance-{secrets.token_hex(6)}.example.com"
    scope = "scope-" + secrets.token_hex(6)
    h.crm.extra_fields = {"instance_url": instance, "scope": scope}
    stale = "at-stale-" + secrets.token_hex(8)
    await register(h, access=stale)
    r = await call(h, stale)
    assert r.status_code == 201, r.text
    [row] = contexts(h.database)
    assert row.token_extra_enc is not None
    # The token's lifetime is kept with them: it decides when a stored token is refreshed (b21c451).
    expected = {"token_type": "Bearer", "instance_url": instance, "scope": scope, "expires_in": 3600}
    assert json.loads(h.box.decrypt(row.token_extra_enc)) == expected
    [context_id] = [c.id for c in contexts(h.database)]
    assert context_id is not None
    snapshot = await AppContextTokenStore(h.database, h.box).load(context_id)
    assert dict(snapshot.extra) == expected
    assert (await h.tokens.get(context_id)).extra == expected

    raw = sqlite_bytes(h.database)
    assert CLIENT_ID.encode() in raw  # the bytes read are the stored rows (client ids are plain)
    for plain in (instance, scope, r.json()["accessToken"]):
        assert plain.encode() not in raw

    await register(h)  # new credentials: the extras described the replaced token
    [row] = contexts(h.database)
    assert row.token_extra_enc is None
    assert dict((await AppContextTokenStore(h.database, h.box).load(context_id)).extra) == {}


async def test_client_secret_basic_is_stored_and_used(h: Harness) -> None:
    stale = "at-stale-" + secrets.token_hex(8)
    await register(h, access=stale, auth_method="client_secret_basic")
    [row] = contexts(h.database)
    assert row.token_auth_method == "client_secret_basic"
    r = await call(h, stale)
    assert r.status_code == 201, r.text
    [request] = h.crm.token_requests
    assert (request.auth_method, request.client_id, request.status) == ("client_secret_basic", CLIENT_ID, 200)

    # A POST without the field is back to the default.
    stale = "at-stale-" + secrets.token_hex(8)
    await register(h, access=stale)
    [row] = contexts(h.database)
    assert row.token_auth_method == "client_secret_post"
    assert (await call(h, stale)).status_code == 201
    assert [t.auth_method for t in h.crm.token_requests] == ["client_secret_basic", "client_secret_post"]


async def test_a_failing_token_endpoint_is_502(hs: Harness) -> None:
    stale = "at-stale-" + secrets.token_hex(8)
    await register(hs, access=stale)
    hs.crm.token_failures.append(Failure.http(500))
    body = assert_error(await call(hs, stale), 502, 10501)
    assert body["message"] == "The authorization server failed"
    r = await call(hs, stale)  # the credentials are intact: the next call refreshes
    assert r.status_code == 201, r.text


async def test_a_token_with_known_expiry_is_refreshed_before_use(h: Harness) -> None:
    stale = "at-stale-" + secrets.token_hex(8)
    await register(h, access=stale)
    first = (await call(h, stale)).json()["accessToken"]  # refreshed after a 401: expiry now known
    h.clock.advance(3600 - 30)  # less than the 60 s margin left
    before = len(h.crm.received)
    r = await call(h, first)
    assert r.status_code == 201, r.text
    second = r.json()["accessToken"]
    assert second != first
    assert h.crm.token_counts["refresh_token"] == 2
    [seen] = h.crm.received[before:]  # no 401 was needed
    assert seen.headers["Authorization"] == f"Bearer {second}"


async def test_no_secret_in_logs_or_errors(hs: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hs.crm.rotate_refresh_tokens = True
    stale = "at-stale-" + secrets.token_hex(8)
    _, refresh = await register(hs, access=stale)
    answers = [await call(hs, stale)]
    fresh = answers[0].json()["accessToken"]
    [rotated] = hs.crm.current_refresh_tokens(CLIENT_ID)
    hs.crm.revoke_access_tokens()
    hs.crm.invalid_grant_all = True
    answers.append(await call(hs, fresh))
    answers.append(await call(hs, "at-guessed"))
    assert answers[1].status_code == 401 and answers[2].status_code == 401
    assert "external API call for app context" in caplog.text  # the lines were captured
    user = hs.user_tokens[(HOST, TENANT, "anne")]
    for secret in (stale, fresh, refresh, rotated, CLIENT_SECRET, user):
        assert secret not in caplog.text
        assert all(secret not in r.text for r in answers[1:])


@pytest.mark.parametrize("prefix", ["Bearér ", "Bearer\r\nX-Injected: 1\r\n"])
async def test_a_prefix_that_cannot_be_a_header_is_refused_where_it_is_given(
    hs: Harness, prefix: str
) -> None:
    """Stored, it failed every call later as a 422 blaming endpointContext.endpointUri (a review's
    finding). Refused at the POST, naming the field; the same for a CRM context's prefix."""
    token = await user_token(hs, "anne")
    body = app_body(hs, "anne", access="a", refresh="r", prefix=prefix)
    r = await hs.client.post("/api/cti-app-context", json=body, headers={"Authorization": f"xelion {token}"})
    err = assert_error(r, 422, 10201)
    assert "authorizationHeaderPrefix" in err["message"]


async def test_an_access_token_that_cannot_be_a_header_is_the_authorization_servers_fault(
    hs: Harness,
) -> None:
    """A token no header can carry (from the token endpoint, or as posted) is a 502 naming the
    authorization server, not a 422 about the caller's endpointUri; nothing reaches the service."""
    access, _ = await register(hs, access="fresh\r\nX-Injected: 1")
    r = await call(hs, access)
    err = assert_error(r, 502, 10501)
    assert "authorization server" in err["message"].lower()
    assert "fresh" not in r.text  # reliability.md §14: the token is named by its context, never shown
    assert not [x for x in hs.crm.received if x.path != "/oauth2/token"]


async def test_a_key_too_long_for_the_unique_index_is_a_422_not_a_503(h: Harness) -> None:
    """Host, tenant, user name and authorization server URI make one unique index entry: on
    PostgreSQL one over 2,704 bytes failed as a 503 'try again' that no retry could mend."""
    uri = h.token_uri + "?" + "x" * 1500 + "&" + "é" * 500  # 2,048 characters, over 2,500 bytes
    assert len(uri) <= 2048
    token = await user_token(h, "anne")
    body = app_body(h, "anne", access="a", refresh="r", token_uri=uri)
    r = await h.client.post("/api/cti-app-context", json=body, headers={"Authorization": f"xelion {token}"})
    err = assert_error(r, 422, 10201)
    assert "appExternalApiContext.authorizationServerUri: too long with the host" in err["message"]
