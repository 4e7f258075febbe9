"""Fixtures for the admin API tests: the app over a real database (SQLite and PostgreSQL), a client,
and the one Xelion directory every test goes through (``xelion_directory``): the production
``HttpXelionDirectory`` talking to real Xelion simulators over real sockets (``xelion``, a
``tests.api.xelion_world.XelionWorld``; one simulator per host name, mapped like ``/etc/hosts``).

The Xelion hosts every test starts with (non-admin users have password ``<name>-password``):

- the manual's example: host ``www.xelionHost.com``, tenant ``tenantToBeUsed``, admin
  ``admin``/``adminPassword``, user ``xelionUsername``;
- tenant A: ``pbx-a.example.com`` / ``alpha``, admin ``admin-a``/``pw-a-secret``, users anne, bob;
- tenant B: ``pbx-b.example.com`` / ``beta``, admin ``admin-b``/``pw-b-secret``, users carol, dave;
- ``down.example.com``: nothing listens there (connection refused).

User oids are fixed (xelionUsername 111222333, anne 1001, bob 1002, carol 2001, dave 2002).
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from cti_bridge.admin.app import AdminDeps, create_admin_app
from cti_bridge.config import Settings
from cti_bridge.store.crypto import SecretBox
from cti_bridge.store.db import Database
from cti_bridge.xelion.directory import HttpXelionDirectory
from tests.api.xelion_world import XelionWorld, xelion_world
from tests.conftest import TEST_SECRET_KEY

OPERATOR_TOKEN = "operator-token-0123456789abcdef"
ALLOWED_HOSTS = ["www.xelionHost.com", "pbx-a.example.com", "pbx-b.example.com", "down.example.com"]

MANUAL_HOST = "www.xelionHost.com"
MANUAL_TENANT = "tenantToBeUsed"
DOWN_HOST = "down.example.com"


@pytest.fixture
async def xelion() -> AsyncIterator[XelionWorld]:
    """The test's Xelion hosts, each a real simulator on 127.0.0.1 (see the module docstring)."""
    async with xelion_world() as world:
        await world.add_host(
            MANUAL_HOST, MANUAL_TENANT, "admin", "adminPassword", {"xelionUsername": "111222333"}
        )
        await world.add_host(
            "pbx-a.example.com", "alpha", "admin-a", "pw-a-secret", {"anne": "1001", "bob": "1002"}
        )
        await world.add_host(
            "pbx-b.example.com", "beta", "admin-b", "pw-b-secret", {"carol": "2001", "dave": "2002"}
        )
        world.add_down_host(DOWN_HOST)
        yield world
        # Every check logged in with its own userSpace and logged out again at once.
        assert world.live_sessions() == {}


@pytest.fixture
def xelion_directory(xelion: XelionWorld) -> HttpXelionDirectory:
    """The production ``ports.XelionDirectory``, reaching the simulators over real sockets."""
    return xelion.directory


class FakeClock:
    """A clock the tests move by hand."""

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


class RecordingSupervisor:
    """``ports.Supervisor`` that remembers what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def integration_changed(self, xelion_context_id: int, *, retry_failed: bool = False) -> None:
        self.calls.append(("integration_changed", xelion_context_id))

    def integration_deleted(self, xelion_context_id: int) -> None:
        self.calls.append(("integration_deleted", xelion_context_id))

    def credentials_changed(self, credential_id: int) -> None:
        self.calls.append(("credentials_changed", credential_id))

    def credentials_deleted(self, credential_id: int) -> None:
        self.calls.append(("credentials_deleted", credential_id))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def supervisor() -> RecordingSupervisor:
    return RecordingSupervisor()


def make_settings(database: Database) -> Settings:
    return Settings(
        database_url=database.url,
        secret_key=TEST_SECRET_KEY,
        admin_token=OPERATOR_TOKEN,
        allowed_xelion_hosts=ALLOWED_HOSTS,
        session_ttl_seconds=3600,
        login_failures_before_delay=3,
        login_lockout_seconds=30,
    )


@pytest.fixture
def settings_factory() -> Any:
    return make_settings


@pytest.fixture
def settings(database: Database) -> Settings:
    return make_settings(database)


@pytest.fixture
def deps(
    settings: Settings,
    database: Database,
    secret_box: SecretBox,
    xelion_directory: HttpXelionDirectory,
    supervisor: RecordingSupervisor,
    clock: FakeClock,
) -> AdminDeps:
    return AdminDeps(
        settings=settings,
        database=database,
        secret_box=secret_box,
        directory=xelion_directory,
        supervisor=supervisor,
        clock=clock,
    )


@asynccontextmanager
async def admin_client(deps: AdminDeps, *routers: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the admin app built from ``deps``, with ``routers`` added as ``app.py`` adds
    its own (deliveries, preview, ...)."""
    if routers:
        deps.extra_routers = list(routers)
    transport = httpx.ASGITransport(app=create_admin_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://cti-bridge.test") as c:
        yield c


@pytest.fixture
async def client(deps: AdminDeps) -> AsyncIterator[httpx.AsyncClient]:
    async with admin_client(deps) as c:
        yield c


OPERATOR = {"Authorization": f"xelion {OPERATOR_TOKEN}"}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"xelion {token}"}


# --- the manual's example requests, verbatim (seeds/xelion-cti-server-api.txt) ---------------------

# POST api/crm-integrations, with the one change the manual's own text needs to be JSON: its
# callHungUpEvent crmResourceUri has bare quotes inside a JSON string (kept verbatim in
# MANUAL_POST_RAW_BROKEN below, which must give a 400 with line and column).
MANUAL_POST_RAW_BROKEN = r"""{
    "xelionContext":
    {
        "adminUsername": "admin",
        "adminPassword": "adminPassword",
        "host": "www.xelionHost.com",
        "tenant": "tenantToBeUsed",
        "protocol": "http"
    },
    "crmContext":
    {
        "authorizationServerUri": "https://example.org/services/oauth2/token",
        "authorizationHeaderPrefix": "Bearer "
    },
    "userCredentials":
    [
        {
            "xelionUsername": "xelionUsername",
            "clientId": "xxxxxxx",
            "clientSecret": "yyyyyyyy",
            "deviceCode": "zzzzzzzz",
            "refreshToken": "aaaaaaaa"
        }
    ],
    "eventUriMappings":
    [
        {
            "xelionEvent": "newCallEvent",
            "crmResourceUri": "https://example.org/services/apexrest/Call",
            "crmResourcePayload":
            {
                "initiation" : "${(initiation==\"outgoing\")?\"calldialed\":\"callreceived\"}",
                "to" : "${calleePhoneNumber}",
                "callId" : "${callId}",
                "eventType" : "newCallEvent"
            }
        },
        {
            "xelionEvent": "callConnectedEvent",
            "crmResourceUri": "https://example.org/services/apexrest/Call",
            "crmResourcePayload":
            {
                "initiation" : "${(initiation==\"outgoing\")?\"calldialed\":\"callreceived\"}",
                "to" : "${calleePhoneNumber}",
                "callId" : "${callId}",
                "eventType" : "callConnectedEvent"
            }
        },
        {
            "xelionEvent": "callHungUpEvent",
            "crmResourceUri": "https://example.org/services/apexrest/Call?initiation=${(initiation=="outgoing")?"calldialed":"callreceived"}",
            "crmResourcePayload":
            {
                "to" : "${calleePhoneNumber}",
                "callId" : "${callId}",
                "eventType" : "callHungUpEvent"
            }
        },
        {
            "xelionEvent": "missedCallEvent",
            "crmResourceUri": "https://example.org/services/apexrest/Call",
            "crmResourcePayload":
            {
                "initiation" : "${(initiation==\"outgoing\")?\"calldialed\":\"callreceived\"}",
                "to" : "${calleePhoneNumber}",
                "callId" : "${callId}",
                "eventType" : "missedCallEvent"
            }
        }
    ]
}"""

MANUAL_POST_RAW = MANUAL_POST_RAW_BROKEN.replace(
    '${(initiation=="outgoing")?"calldialed":"callreceived"}"',
    '${(initiation==\\"outgoing\\")?\\"calldialed\\":\\"callreceived\\"}"',
)

MANUAL_ZOHO_PUT_RAW = r"""[{
        "crmResourceUri": "https://example.org/cti-server-stub/api/zoho/services/crm/v2/phonebridge/callmissed?calleeFlowId=${calleeFlowId}&fromnumber=${callerPhoneNumber}&tonumber=${calleePhoneNumber}",
        "xelionEvent": "missedCallEvent",
        "crmResourcePayload": null
}, {
        "crmResourcePayload": {
                "fromNumber": "${callerPhoneNumber}",
                "callerUser": "${callerUser}",
                "calleeUser": "${calleeUser}",
                "myObject": {
                        "myPayload": "${callId}"
                },
                "calleeFlowId": "${calleeFlowId}",
                "toNumber": "${calleePhoneNumber}",
                "callerFlowId": "${callerFlowId}"
        },
        "crmResourceUri": "https://example.org/cti-server-stub/api/zoho/services/crm/v2/phonebridge/callanswered?callrefid=${callId}&fromnumber=${callerPhoneNumber}&tonumber=${calleePhoneNumber}",
        "xelionEvent": "callConnectedEvent"
}, {
        "crmResourceUri": "https://example.org/cti-server-stub/api/zoho/services/crm/v2/phonebridge/callhungup?callrefid=${callId}&fromnumber=${callerPhoneNumber}&tonumber=${calleePhoneNumber}&callstarttime=${date}&direction=${(initiation==\"outgoing\")?\"outbound\":\"inbound\"}&duration=30",
        "xelionEvent": "callHungUpEvent",
        "crmResourcePayload": null
}, {
        "crmResourcePayload": {
                "fromNumber": "${callerPhoneNumber}",
                "callerUser": "${callerUser}",
                "calleeUser": "${calleeUser}",
                "myObject": {
                        "callId": "${callId}"
                },
                "calleeFlowId": "${calleeFlowId}",
                "toNumber": "${calleePhoneNumber}",
                "callerFlowId": "${callerFlowId}"
        },
        "crmResourceUri": "https://example.org/cti-server-stub/api/zoho/services/crm/v2/phonebridge/callreceived?callrefid=${callId}&fromnumber=${callerPhoneNumber}&tonumber=${calleePhoneNumber}",
        "xelionEvent": "newCallEvent"
}]"""

MANUAL_USER_CREDENTIALS_POST_RAW = """[
    {
        "xelionUsername": "xelionUsername",
        "clientId": "xxxxxxxxxxxx",
        "clientSecret": "yyyyyyyyyyyyy",
        "deviceCode": "zzzzzzzzzzzzzzzzz",
        "refreshToken": "aaaaaaaaaaaaaaaa"
    }
]"""


def integration_body(
    which: str = "a", *, users: list[str] | None = None, mappings: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A POST crm-integrations body for tenant A or B (secrets unique per tenant, to search for)."""
    host, tenant, admin, pw, default_users = {
        "a": ("pbx-a.example.com", "alpha", "admin-a", "pw-a-secret", ["anne"]),
        "b": ("pbx-b.example.com", "beta", "admin-b", "pw-b-secret", ["carol"]),
    }[which]
    return {
        "xelionContext": {
            "adminUsername": admin,
            "adminPassword": pw,
            "host": host,
            "tenant": tenant,
            "protocol": "https",
        },
        "crmContext": {
            "authorizationServerUri": "https://crm.example.org/oauth2/token",
            "authorizationHeaderPrefix": "Bearer ",
        },
        "userCredentials": [
            {
                "xelionUsername": u,
                "clientId": f"client-{u}",
                "clientSecret": f"client-secret-{u}-S3CR3T",
                "deviceCode": f"device-code-{u}-S3CR3T",
                "refreshToken": f"refresh-token-{u}-S3CR3T",
            }
            for u in (default_users if users is None else users)
        ],
        "eventUriMappings": copy.deepcopy(mappings)
        if mappings is not None
        else [
            {
                "xelionEvent": "newCallEvent",
                "crmResourceUri": "https://crm.example.org/calls",
                "crmResourcePayload": {"callId": "${callId}", "to": "${calleePhoneNumber}"},
            }
        ],
    }


@dataclass
class Integration:
    xelion_id: int
    crm_id: int
    token: str


async def make_integration(client: httpx.AsyncClient, which: str = "a", **kw: Any) -> Integration:
    """Create tenant A's or B's integration and log in as its admin."""
    body = integration_body(which, **kw)
    r = await client.post("/api/crm-integrations", json=body)
    assert r.status_code == 200, r.text
    xc = body["xelionContext"]
    login = await client.post(
        "/api/session/login",
        json={
            "adminUsername": xc["adminUsername"],
            "adminPassword": xc["adminPassword"],
            "host": xc["host"],
            "tenant": xc["tenant"],
        },
    )
    assert login.status_code == 200, login.text
    data = r.json()
    return Integration(data["xelionContext"]["id"], data["crmContext"]["id"], login.json()["authentication"])


def assert_error(r: httpx.Response, status: int, code: int) -> dict[str, Any]:
    """The response is Xelion's error shape with this status and code."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"errorCode", "message", "info"}, body
    assert body["errorCode"] == code, body
    return body


def raw_json(text: str | bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for httpx to send ``text`` as the body, byte for byte."""
    return {
        "content": text.encode() if isinstance(text, str) else text,
        "headers": {"Content-Type": "application/json", **(headers or {})},
    }


@pytest.fixture
def manual_body() -> Iterator[dict[str, Any]]:
    yield json.loads(MANUAL_POST_RAW)


def rows(database: Database, model: type[Any]) -> list[Any]:
    """Every row of a table, read straight from the database."""
    from sqlmodel import select

    with database.session() as s:
        return list(s.exec(select(model)).all())


def count(database: Database, model: type[Any]) -> int:
    return len(rows(database, model))
