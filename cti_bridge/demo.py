"""``cti-bridge demo`` / ``make demo``: the whole bridge on the built-in simulators, live.

Starts the Xelion simulator (tenant ``master``: an admin and the users anne, bob and carol), the CRM
simulator with its OAuth2 token server (short-lived access tokens, so refreshes show), and the daemon
on an embedded SQLite database. Then it configures an integration through the admin API exactly as
an operator would — the manual's example ``POST api/crm-integrations`` body with its four mappings,
pointed at the CRM simulator — places calls, and prints each event and each delivery as it happens,
with its status and latency. It ends by itself after ``--calls`` calls with a summary, or runs until
Ctrl-C with ``--calls 0``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select
from sqlmodel import Session, col

from cti_bridge.app import build, install_signal_handlers, serve
from cti_bridge.config import load_settings
from cti_bridge.logs import setup_logging
from cti_bridge.sim.crm import CrmSimulator
from cti_bridge.sim.xelion import XelionSimulator, add_demo_tenant
from cti_bridge.store.models import CallEvent, Delivery

USERS = ("anne", "bob", "carol")
CLIENT_ID = "demo-client"
CLIENT_SECRET = "demo-client-secret"  # noqa: S105 - the simulator's made-up client


def manual_integration(xelion_host: str, crm_url: str, refresh_tokens: dict[str, str]) -> dict[str, Any]:
    """The manual's example POST crm-integrations body, pointed at the simulators."""
    initiation = '${(initiation=="outgoing")?"calldialed":"callreceived"}'
    call = f"{crm_url}/services/apexrest/Call"

    def payload(event: str, with_initiation: bool = True) -> dict[str, str]:
        body = {"to": "${calleePhoneNumber}", "callId": "${callId}", "eventType": event}
        if with_initiation:
            body = {"initiation": initiation, **body}
        return body

    return {
        "xelionContext": {
            "adminUsername": "admin",
            "adminPassword": "admin-password",
            "host": xelion_host,
            "tenant": "master",
            "protocol": "http",
        },
        "crmContext": {
            "authorizationServerUri": f"{crm_url}/oauth2/token",
            "authorizationHeaderPrefix": "Bearer ",
        },
        "userCredentials": [
            {
                "xelionUsername": user,
                "clientId": CLIENT_ID,
                "clientSecret": CLIENT_SECRET,
                "refreshToken": token,
            }
            for user, token in refresh_tokens.items()
        ],
        "eventUriMappings": [
            {
                "xelionEvent": "newCallEvent",
                "crmResourceUri": call,
                "crmResourcePayload": payload("newCallEvent"),
            },
            {
                "xelionEvent": "callConnectedEvent",
                "crmResourceUri": call,
                "crmResourcePayload": payload("callConnectedEvent"),
            },
            {
                "xelionEvent": "callHungUpEvent",
                "crmResourceUri": f"{call}?initiation={initiation}",
                "crmResourcePayload": payload("callHungUpEvent", with_initiation=False),
            },
            {
                "xelionEvent": "missedCallEvent",
                "crmResourceUri": call,
                "crmResourcePayload": payload("missedCallEvent"),
            },
        ],
    }


class LiveView:
    """Prints new events and finished deliveries by reading the daemon's tables."""

    def __init__(self, engine: Any, started: float) -> None:
        self.engine = engine
        self.started = started
        self.last_event = 0
        self.seen: set[str] = set()
        self.latencies: list[float] = []
        self.counts: dict[str, int] = {}
        self.events = 0

    def poll(self) -> None:
        with Session(self.engine) as s:
            for ev in s.execute(
                select(CallEvent).where(col(CallEvent.id) > self.last_event).order_by(col(CallEvent.id))
            ).scalars():
                assert ev.id is not None
                self.last_event = ev.id
                self.events += 1
                fields = json.loads(ev.payload)
                parties = f"{fields.get('callerUser') or fields.get('callerPhoneNumber')} -> " + str(
                    fields.get("calleeUser") or fields.get("calleePhoneNumber")
                )
                print(
                    f"{self._t()}  event     {ev.notification_type:<19} call {ev.call_id:<18} {parties}",
                    flush=True,
                )
            rows = s.execute(
                select(Delivery, col(CallEvent.received_at))
                .join(CallEvent, col(CallEvent.id) == col(Delivery.event_id))
                .where(col(Delivery.state).in_(("delivered", "dead", "parked")))
            ).all()
            for d, received_at in rows:
                if d.id in self.seen:
                    continue
                self.seen.add(d.id)
                self.counts[d.state] = self.counts.get(d.state, 0) + 1
                latency = ""
                if d.state == "delivered" and d.delivered_at is not None:
                    ms = (d.delivered_at - received_at).total_seconds() * 1000
                    self.latencies.append(ms)
                    latency = f"{ms:7.1f} ms"
                detail = f"HTTP {d.last_status}" if d.last_status else (d.last_error or "")
                total = sum(self.counts.values())
                print(
                    f"{self._t()}  delivery  {d.state:<9} {d.xelion_username:<6} call {d.call_id:<18} "
                    f"{detail:<9} {latency}   [{total} done]",
                    flush=True,
                )

    def pending(self) -> int:
        with Session(self.engine) as s:
            return len(
                s.execute(
                    select(col(Delivery.id)).where(col(Delivery.state).in_(("pending", "sending")))
                ).all()
            )

    def _t(self) -> str:
        return f"{time.monotonic() - self.started:7.2f}s"


async def _demo(calls: int, rate: float, database_url: str | None, config_file: str | None) -> int:
    setup_logging("WARNING")
    workdir = Path(tempfile.mkdtemp(prefix="cti-bridge-demo-"))
    db_url = database_url or f"sqlite:///{workdir / 'demo.db'}"
    xelion = XelionSimulator()
    add_demo_tenant(xelion)
    crm = CrmSimulator()
    crm.expires_in = 90  # short-lived tokens, refreshed 60 s before expiry: a longer run shows refreshes
    crm.rotate_refresh_tokens = True
    await xelion.start()
    await crm.start()
    crm.add_client(CLIENT_ID, CLIENT_SECRET)
    refresh_tokens = {user: crm.issue_refresh_token(CLIENT_ID) for user in USERS}
    admin_token = secrets.token_urlsafe(24)
    settings = load_settings(
        config_file,
        database_url=db_url,
        admin_port=0,
        admin_token=admin_token,
        allowed_xelion_hosts=[f"127.0.0.1:{xelion.port}"],
        allow_private_targets=True,
        secret_key=secrets.token_urlsafe(32),
    )
    daemon = build(settings)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    port_future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    serve_task = asyncio.create_task(serve(daemon, stop, on_started=port_future.set_result))
    port = await port_future
    print(f"cti-bridge demo: admin API http://127.0.0.1:{port}/docs   database {db_url}")
    print(f"  Xelion simulator {xelion.base_url('master')}   CRM simulator {crm.url}")
    view = LiveView(daemon.db.engine, time.monotonic())
    placed = 0
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as api:
            body = manual_integration(f"127.0.0.1:{xelion.port}", crm.url, refresh_tokens)
            resp = await api.post("/api/crm-integrations", json=body)
            if resp.status_code != 200:
                print(f"configuring the integration failed: {resp.status_code} {resp.text}", file=sys.stderr)
                return 1
            print(f"  configured: POST api/crm-integrations -> {resp.json()}")
            for _ in range(100):  # the source starts within a second or so
                ready = await api.get("/api/ready")
                if ready.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            print("  source subscribed; placing calls (Ctrl-C to stop)\n", flush=True)
            rng = random.Random(7)
            kinds = ["incoming", "incoming", "outgoing", "internal", "missed", "attended_transfer"]
            while not stop.is_set() and (calls == 0 or placed < calls):
                kind = kinds[placed % len(kinds)]
                a, b = rng.sample(USERS, 2)
                if kind == "incoming":
                    await xelion.place_call("incoming", callee=a, duration=rng.randint(5, 300))
                elif kind == "outgoing":
                    await xelion.place_call("outgoing", caller=a, duration=rng.randint(5, 300))
                elif kind == "internal":
                    await xelion.place_call("internal", caller=a, callee=b, duration=rng.randint(5, 120))
                elif kind == "missed":
                    await xelion.place_call("missed", callee=a)
                else:
                    await xelion.place_call("attended_transfer", callee=a, transfer_to=b)
                placed += 1
                view.poll()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0 / rate)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not stop.is_set():
                await asyncio.sleep(0.2)
                view.poll()
                if view.pending() == 0:
                    await asyncio.sleep(0.3)
                    view.poll()
                    if view.pending() == 0:
                        break
        view.poll()
    finally:
        stop.set()
        await serve_task
        await xelion.stop()
        await crm.stop()
    lat = sorted(view.latencies)
    print("\nsummary")
    print(f"  calls placed          {placed}")
    print(f"  events stored         {view.events}")
    print(f"  deliveries            {dict(sorted(view.counts.items()))}")
    print(f"  CRM requests received {len(crm.received)}   token requests {sum(crm.token_counts.values())}")
    if lat:
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(f"  event->CRM latency    p50 {statistics.median(lat):.1f} ms   p99 {p99:.1f} ms")
    print(f"  database              {db_url}")
    failed = view.counts.get("dead", 0) + view.counts.get("parked", 0)
    return 0 if failed == 0 and view.events > 0 else 1


def run_demo(*, calls: int, rate: float, database_url: str | None, config_file: str | None) -> int:
    return asyncio.run(_demo(calls, max(rate, 0.1), database_url, config_file))
