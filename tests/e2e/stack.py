"""A whole cti-bridge in-process for end-to-end tests: the Xelion simulator, the CRM simulator
with its token server, and the daemon (admin API on a free port, sources, worker) on a real
database, configured through the admin API as an operator would."""

from __future__ import annotations

import asyncio
import inspect
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiohttp import web

from cti_bridge.app import Daemon, build, serve
from cti_bridge.clock import Clock
from cti_bridge.config import load_settings
from cti_bridge.sim.crm import TOKEN_PATH, CrmSimulator
from cti_bridge.sim.xelion import XelionSimulator, add_demo_tenant

CLIENT_ID = "stack-client"
CLIENT_SECRET = "stack-client-secret-value"
ADMIN_PASSWORD = "admin-password"  # the demo tenant's Xelion admin (sim/xelion.py add_demo_tenant)


@dataclass(frozen=True)
class Handled:
    """One CRM-endpoint request as the tracking simulator saw it: when it came and when it ended."""

    path: str
    host: str
    started: float  # time.time()
    ended: float


class TrackingCrmSimulator(CrmSimulator):
    """The CRM simulator, counting requests in flight at its CRM endpoints (token requests aside),
    so a test can check a concurrency cap from the receiving side."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inflight = 0
        self.max_inflight = 0
        self.inflight_by_host: dict[str, int] = {}
        self.max_inflight_by_host: dict[str, int] = {}
        self.handled: list[Handled] = []
        # Every token the simulator ever issued (rotated or revoked ones too): what must never
        # appear in a log line, an API answer or the database in plain text.
        self.issued_tokens: list[str] = []

    def issue_refresh_token(self, client_id: str) -> str:
        token = super().issue_refresh_token(client_id)
        self.issued_tokens.append(token)
        return token

    def issue_access_token(self, client_id: str = "", expires_in: float | None = None) -> str:
        token = super().issue_access_token(client_id, expires_in)
        self.issued_tokens.append(token)
        return token

    def reset_tracking(self) -> None:
        self.max_inflight = self.inflight
        self.max_inflight_by_host = dict(self.inflight_by_host)
        self.handled.clear()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == TOKEN_PATH or request.path.startswith("/_sim/"):
            return await super()._handle(request)
        host = request.headers.get("Host", "")
        started = time.time()
        self.inflight += 1
        self.inflight_by_host[host] = self.inflight_by_host.get(host, 0) + 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        self.max_inflight_by_host[host] = max(
            self.max_inflight_by_host.get(host, 0), self.inflight_by_host[host]
        )
        try:
            return await super()._handle(request)
        finally:
            self.inflight -= 1
            self.inflight_by_host[host] -= 1
            self.handled.append(Handled(request.path, host, started, time.time()))


@dataclass(kw_only=True)
class Bridge:
    """The simulators and an operator's client to a cti-bridge's admin API, wherever the bridge
    runs (in this process: ``Stack``; or as a separate process)."""

    xelion: XelionSimulator
    crm: TrackingCrmSimulator
    api: httpx.AsyncClient
    admin_token: str
    refresh_tokens: dict[str, str] = field(default_factory=dict)
    integration: dict[str, Any] = field(default_factory=dict)

    @property
    def xelion_context_id(self) -> int:
        return int(self.integration["xelionContext"]["id"])

    @property
    def crm_context_id(self) -> int:
        return int(self.integration["crmContext"]["id"])

    def mapping(
        self, event: str, path: str | None = None, payload: Any = "default", **extra: Any
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "xelionEvent": event,
            "crmResourceUri": f"{self.crm.url}/{path or 'calls/' + event}?user=${{user.xelionUsername}}",
            "crmResourcePayload": {
                "callId": "${callId}",
                "event": "${xelionEvent}",
                "from": "${callerPhoneNumber}",
                "to": "${calleePhoneNumber}",
                "user": "${user.xelionUsername}",
                "deliveryId": "${deliveryId}",
            }
            if payload == "default"
            else payload,
        }
        body.update(extra)
        return body

    async def configure(
        self,
        users: tuple[str, ...] = ("anne", "bob"),
        mappings: list[dict[str, Any]] | None = None,
        events: tuple[str, ...] = (
            "newCallEvent",
            "callConnectedEvent",
            "callHungUpEvent",
            "missedCallEvent",
        ),
    ) -> dict[str, Any]:
        for user in users:
            self.refresh_tokens[user] = self.crm.issue_refresh_token(CLIENT_ID)
        body = {
            "xelionContext": {
                "adminUsername": "admin",
                "adminPassword": ADMIN_PASSWORD,
                "host": f"127.0.0.1:{self.xelion.port}",
                "tenant": "master",
                "protocol": "http",
            },
            "crmContext": {
                "authorizationServerUri": self.crm.token_url,
                "authorizationHeaderPrefix": "Bearer ",
            },
            "userCredentials": [
                {
                    "xelionUsername": u,
                    "clientId": CLIENT_ID,
                    "clientSecret": CLIENT_SECRET,
                    "refreshToken": self.refresh_tokens[u],
                }
                for u in users
            ],
            "eventUriMappings": mappings if mappings is not None else [self.mapping(e) for e in events],
        }
        resp = await self.api.post("/api/crm-integrations", json=body)
        assert resp.status_code == 200, resp.text
        self.integration = resp.json()
        await self.wait_subscribed()
        return self.integration

    async def wait_subscribed(self, timeout: float = 10.0, xelion_context_id: int | None = None) -> None:
        wanted = str(xelion_context_id if xelion_context_id is not None else self.xelion_context_id)
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            resp = await self.api.get("/api/ready")
            # api/ready is 200 too before the new integration's source exists (no sources, all
            # fine): wait until this integration's own source reports itself subscribed.
            sources = resp.json().get("sources") or {}
            if resp.status_code == 200 and sources.get(wanted) == "subscribed":
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the source never became ready")

    async def deliveries(self, **params: Any) -> list[dict[str, Any]]:
        resp = await self.api.get("/api/deliveries", params={"limit": 1000, **params})
        assert resp.status_code == 200, resp.text
        return list(resp.json()["items"])

    async def wait_settled(self, expected: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Wait until ``expected`` deliveries exist and none is pending or sending."""
        deadline = asyncio.get_running_loop().time() + timeout
        items: list[dict[str, Any]] = []
        while asyncio.get_running_loop().time() < deadline:
            items = await self.deliveries()
            if len(items) >= expected and all(d["state"] not in ("pending", "sending") for d in items):
                return items
            await asyncio.sleep(0.05)
        states = sorted(d["state"] for d in items)
        raise AssertionError(f"not settled: {len(items)} deliveries, states {states}")

    async def delivery(self, delivery_id: str) -> dict[str, Any]:
        """``GET api/deliveries/{id}``: the delivery with its event and attempt log."""
        resp = await self.api.get(f"/api/deliveries/{delivery_id}")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    async def metrics(self) -> str:
        resp = await self.api.get("/api/metrics")
        assert resp.status_code == 200, resp.text
        return resp.text

    async def credential_id(self, username: str) -> int:
        """The ``userCredentialsId`` of a configured user (``api/users/{id}``)."""
        resp = await self.api.get(
            f"/api/crm-integrations/{self.xelion_context_id}/crm-contexts/{self.crm_context_id}/user-credentials",
            params={"username": username},
        )
        assert resp.status_code == 200, resp.text
        found = [u for u in resp.json() if u["xelionUsername"] == username]
        assert len(found) == 1, resp.text
        return int(found[0]["userCredentialsId"])

    async def wait_until(
        self, check: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
    ) -> None:
        """Poll ``check`` (plain or async) every 20 ms until it holds; AssertionError naming
        ``what`` after ``timeout``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass(kw_only=True)
class Stack(Bridge):
    """A whole cti-bridge in this process: ``daemon`` gives its parts."""

    daemon: Daemon


def settings_for(db_url: str, xelion: XelionSimulator, admin_token: str, **overrides: Any) -> dict[str, Any]:
    """The settings of a test bridge (fast schedules, private targets allowed), as keyword values."""
    return {
        "database_url": db_url,
        "admin_port": 0,
        "admin_token": admin_token,
        "allowed_xelion_hosts": [f"127.0.0.1:{xelion.port}"],
        "allow_private_targets": True,
        "secret_key": "stack-secret-key-0123456789-abcdefghijkl",
        "retry_schedule": [0, 0.2, 0.4, 0.8],
        "retry_jitter": 0.0,
        "shutdown_grace_seconds": 2.0,
        **overrides,
    }


@asynccontextmanager
async def simulators() -> AsyncIterator[tuple[XelionSimulator, TrackingCrmSimulator]]:
    """The Xelion simulator with the demo tenant and the CRM simulator with the test client."""
    xelion = XelionSimulator()
    add_demo_tenant(xelion)
    crm = TrackingCrmSimulator()
    await xelion.start()
    await crm.start()
    crm.add_client(CLIENT_ID, CLIENT_SECRET)
    try:
        yield xelion, crm
    finally:
        await xelion.stop()
        await crm.stop()


@asynccontextmanager
async def running_stack(db_url: str, *, clock: Clock | None = None, **overrides: Any) -> AsyncIterator[Stack]:
    """Start the simulators and the daemon on ``db_url`` (with ``clock``, the system's by
    default); stop everything afterwards."""
    async with simulators() as (xelion, crm):
        admin_token = secrets.token_urlsafe(24)
        settings = load_settings(None, **settings_for(db_url, xelion, admin_token, **overrides))
        daemon = build(settings, clock=clock)
        stop = asyncio.Event()
        port_future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(daemon, stop, on_started=port_future.set_result))
        port = await asyncio.wait_for(port_future, 20)
        api = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"xelion {admin_token}"},
            timeout=10,
        )
        try:
            yield Stack(xelion=xelion, crm=crm, daemon=daemon, api=api, admin_token=admin_token)
        finally:
            stop.set()
            await api.aclose()
            await asyncio.wait_for(task, 30)
