"""A whole cti-bridge in-process for end-to-end tests: the Xelion simulator, the CRM simulator
with its token server, and the daemon (admin API on a free port, sources, worker) on a real
database, configured through the admin API as an operator would."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from cti_bridge.app import Daemon, build, serve
from cti_bridge.config import load_settings
from cti_bridge.sim.crm import CrmSimulator
from cti_bridge.sim.xelion import XelionSimulator, add_demo_tenant

CLIENT_ID = "stack-client"
CLIENT_SECRET = "stack-client-secret-value"


@dataclass
class Stack:
    xelion: XelionSimulator
    crm: CrmSimulator
    daemon: Daemon
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

    def mapping(self, event: str, path: str | None = None, payload: Any = "default", **extra: Any) -> dict[str, Any]:
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
        events: tuple[str, ...] = ("newCallEvent", "callConnectedEvent", "callHungUpEvent", "missedCallEvent"),
    ) -> dict[str, Any]:
        for user in users:
            self.refresh_tokens[user] = self.crm.issue_refresh_token(CLIENT_ID)
        body = {
            "xelionContext": {
                "adminUsername": "admin",
                "adminPassword": "admin-password",
                "host": f"127.0.0.1:{self.xelion.port}",
                "tenant": "master",
                "protocol": "http",
            },
            "crmContext": {"authorizationServerUri": self.crm.token_url, "authorizationHeaderPrefix": "Bearer "},
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

    async def wait_subscribed(self, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if (await self.api.get("/api/ready")).status_code == 200:
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


@asynccontextmanager
async def running_stack(db_url: str, **overrides: Any) -> AsyncIterator[Stack]:
    """Start the simulators and the daemon on ``db_url``; stop everything afterwards."""
    xelion = XelionSimulator()
    add_demo_tenant(xelion)
    crm = CrmSimulator()
    await xelion.start()
    await crm.start()
    crm.add_client(CLIENT_ID, CLIENT_SECRET)
    admin_token = secrets.token_urlsafe(24)
    settings = load_settings(
        None,
        **{
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
        },
    )
    daemon = build(settings)
    stop = asyncio.Event()
    port_future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(daemon, stop, on_started=port_future.set_result))
    port = await asyncio.wait_for(port_future, 20)
    api = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"xelion {admin_token}"}, timeout=10
    )
    try:
        yield Stack(xelion=xelion, crm=crm, daemon=daemon, api=api, admin_token=admin_token)
    finally:
        stop.set()
        await api.aclose()
        await asyncio.wait_for(task, 30)
        await xelion.stop()
        await crm.stop()
