"""The Xelion simulator of ``cti_bridge.sim.xelion`` in its own process, with a push control for
bench_e2e.py.

The tenant is ``add_demo_tenant``'s (admin/admin-password; anne, bob, carol) plus ``--users`` more
users ``u0001``.. (password ``pw``), so an integration can hold many credentials. The daemon connects
to it as it would to a real Xelion server (REST login, one-time websocket URL, subscription).

``POST /push`` on the control port, body ``{"count": N, "rate": R, "prefix": P, "users": K, "window":
W, "ack_url": U}``, pushes N call events through ``XelionSimulator.push`` to the subscribed
websocket: as fast as the socket takes them (``rate`` 0) or at R events per second on an absolute
schedule. With a window, event i waits until fewer than W events are unaccounted for by the count
at ``ack_url`` (the CRM simulator's ``/_sim/stats``). Earlier benchmark runs used a window of 500:
then the daemon's ingest was about as slow as its delivery, fell minutes behind in the socket
buffers (up to 32 MB here), its keepalive pong queued behind the events, and it dropped the socket
(1011) with the events in flight. Its ingest now runs several times faster than its delivery, and
since 2026-12-06 bench_e2e.py pushes with no window by default, as a Xelion server does.
Event i has ``callId`` ``P-i`` (distinct, so each event is one delivery and nothing waits on
per-call order), type newCallEvent, callConnectedEvent, callHungUpEvent, missedCallEvent in turn,
an outside caller and, as callee, user i mod K of [anne, u0001, ...]; ``sentAt`` is ``time.time()``
just before it is handed to the socket. The answer: ``{"sent": N, "first_sent": t, "last_sent": t,
"window_waits": n}``.

    python bench/sim_xelion.py [--users 0]

Prints one JSON line ``{"port": xelion_port, "control": control_url}`` when ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from typing import Any

from aiohttp import ClientSession, web

from cti_bridge.sim.xelion import XelionSimulator, add_demo_tenant

EVENT_TYPES = ("newCallEvent", "callConnectedEvent", "callHungUpEvent", "missedCallEvent")
TENANT = "master"


def extra_user(i: int) -> str:
    return f"u{i:04d}"


class Pusher:
    def __init__(self, sim: XelionSimulator, extra_users: int) -> None:
        self.sim = sim
        tenant = sim.tenants[TENANT]
        names = ["anne"] + [extra_user(i) for i in range(1, extra_users + 1)]
        self.callees = [(n, tenant.users[n].phone) for n in names]
        self.lock = asyncio.Lock()

    def event(self, prefix: str, i: int, callees: int) -> tuple[str, dict[str, Any]]:
        kind = EVENT_TYPES[i % len(EVENT_TYPES)]
        user, phone = self.callees[i % callees]
        body: dict[str, Any] = {
            "callId": f"{prefix}-{i}",
            "initiation": "incoming",
            "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "callerPhoneNumber": f"+316{i % 100_000_000:08d}",
            "calleePhoneNumber": phone,
            "callerUser": None,
            "calleeUser": user,
            "callerFlowId": None,
            "calleeFlowId": f"f-{i % 100_000}",
        }
        if kind == "callHungUpEvent":
            body["duration"] = 30 + i % 600
        return kind, body

    async def push(
        self, count: int, rate: float, prefix: str, users: int, window: int = 0, ack_url: str | None = None
    ) -> dict[str, Any]:
        callees = max(1, min(users, len(self.callees)))
        first = last = 0.0
        acked = 0
        waits = 0
        async with self.lock, ClientSession() as http:
            if self.sim.open_sockets == 0:
                raise web.HTTPConflict(text="no websocket is connected")
            started = time.monotonic()
            for i in range(count):
                kind, body = self.event(prefix, i, callees)
                while window > 0 and ack_url is not None and i - acked >= window:
                    # Flow control: at most ``window`` events ahead of what reached the CRM.
                    async with http.get(ack_url) as r:
                        acked = int((await r.json())["received"])
                    if i - acked >= window:
                        waits += 1
                        await asyncio.sleep(0.005)
                if rate > 0:
                    delay = started + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                now = time.time()
                body["sentAt"] = f"{now:.6f}"
                if i == 0:
                    first = now
                last = now
                if await self.sim.push(kind, body) != 1:
                    raise web.HTTPConflict(text=f"event {i} reached no socket")
        return {"sent": count, "first_sent": first, "last_sent": last, "window_waits": waits}


async def serve(args: argparse.Namespace) -> None:
    sim = XelionSimulator(host="127.0.0.1", port=args.port)
    add_demo_tenant(sim, TENANT)
    for i in range(1, args.users + 1):
        sim.add_user(TENANT, extra_user(i), "pw", phone=f"+3120{i:07d}")
    pusher = Pusher(sim, args.users)

    async def push(request: web.Request) -> web.Response:
        doc = await request.json()
        result = await pusher.push(
            int(doc["count"]),
            float(doc.get("rate", 0)),
            str(doc.get("prefix", "ev")),
            int(doc.get("users", 1)),
            int(doc.get("window", 0)),
            doc.get("ack_url"),
        )
        return web.json_response(result)

    async def status(_request: web.Request) -> web.Response:
        subscribed = [sorted(s) for s in sim.subscriptions()]
        return web.json_response(
            {"open_sockets": sim.open_sockets, "subscriptions": subscribed, "pushed": sim.stats.pushed}
        )

    control = web.Application()
    control.router.add_post("/push", push)
    control.router.add_get("/status", status)
    runner = web.AppRunner(control, access_log=None, handle_signals=False)
    async with sim:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        control_port = runner.addresses[0][1]
        print(json.dumps({"port": sim.port, "control": f"http://127.0.0.1:{control_port}"}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--users", type=int, default=0, help="extra users u0001.. besides the demo ones")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
