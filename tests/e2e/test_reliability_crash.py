"""Nothing lost across ``kill -9`` (reliability.md §1, §4, §11): the daemon runs as its own process
(``python -m cti_bridge run``) against the simulators in this process; it is killed with SIGKILL in
the middle of a token refresh and in the middle of a CRM request, restarted, and every delivery of
every event it had committed ends delivered, the interrupted one sent again with the same
``Idempotency-Key``, and due deliveries move again within 5 s of the restart. On SQLite and
PostgreSQL (where the interrupted claim waits for its lease, set short here)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from cti_bridge.sim.crm import Failure
from tests.e2e.stack import Bridge, settings_for, simulators

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(settings: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTI_BRIDGE_")}
    for key, value in settings.items():
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env["CTI_BRIDGE_" + key.upper()] = str(value)
    return env


class Daemon:
    """``python -m cti_bridge run`` as a child process that can be killed and started again."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    async def start(self, api: httpx.AsyncClient) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cti_bridge", "run"],
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the daemon exited with {self.proc.returncode}"
            try:
                if (await api.get("/api/health")).status_code == 200:
                    self.started_at = time.monotonic()
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError("the daemon never answered api/health")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)  # the kernel reaps it at once: nothing to serve meanwhile

    async def stop(self) -> None:
        """SIGTERM, waiting without blocking this loop: the simulators it talks to while it stops
        (the Xelion logout) run in this process."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@asynccontextmanager
async def process_bridge(
    db_url: str, tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[Bridge, Daemon]]:
    async with simulators() as (xelion, crm):
        port = _free_port()
        admin_token = "crash-test-admin-token-0123456789"
        settings = settings_for(db_url, xelion, admin_token, admin_port=port, **overrides)
        daemon = Daemon(_env(settings), tmp_path)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"xelion {admin_token}"},
            timeout=10,
        ) as api:
            bridge = Bridge(xelion=xelion, crm=crm, api=api, admin_token=admin_token)
            await daemon.start(api)
            try:
                yield bridge, daemon
            finally:
                await daemon.stop()


def _received(bridge: Bridge) -> set[tuple[str, str]]:
    return {
        (json.loads(r.body)["callId"], json.loads(r.body)["event"]) for r in bridge.crm.received if r.status
    }


@pytest.mark.slow
async def test_nothing_is_lost_across_kill_9(db_url: str, tmp_path: Path) -> None:
    # A lease longer than a request plus a token refresh (§4), short enough for the test.
    async with process_bridge(db_url, tmp_path, lease_seconds=2, request_timeout=0.5) as (bridge, daemon):
        bridge.crm.rotate_refresh_tokens = True
        await bridge.configure(users=("anne",))
        original_refresh_token = bridge.refresh_tokens["anne"]

        # 1. Killed in the middle of a token refresh (the token endpoint has not answered yet).
        refresh_started = asyncio.Event()

        async def hang(grant_type: str) -> None:
            refresh_started.set()
            await asyncio.Event().wait()  # never answers (ended when the simulator stops)

        bridge.crm.token_hook = hang
        first = await bridge.xelion.place_call("incoming", callee="anne")
        await asyncio.wait_for(refresh_started.wait(), 10)

        async def committed(n: int) -> bool:
            return len(await bridge.deliveries()) == n

        # An event counts as received once committed (§1): wait for that, then kill at once.
        await bridge.wait_until(lambda: committed(3), what="the call's events to be committed")
        daemon.kill()
        bridge.crm.token_hook = None
        assert bridge.crm.refresh_token_valid(original_refresh_token)  # never answered: still good

        await daemon.start(bridge.api)
        await bridge.wait_subscribed()
        await bridge.wait_settled(3)
        assert {d["state"] for d in await bridge.deliveries()} == {"delivered"}
        assert _received(bridge) == {
            (first.call_id, e) for e in ("newCallEvent", "callConnectedEvent", "callHungUpEvent")
        }

        # 2. Killed in the middle of a CRM request, with more deliveries queued behind it.
        bridge.crm.add_rule("/calls/newCallEvent", Failure.slow(3600), times=1)
        calls = [await bridge.xelion.place_call("incoming", callee="anne") for _ in range(4)]
        await bridge.crm.wait_for(len(bridge.crm.received) + 1)

        # The first newCallEvent request after the rule is the one that hangs.
        interrupted = next(r for r in bridge.crm.received[3:] if r.path == "/calls/newCallEvent")
        await bridge.wait_until(lambda: committed(15), what="every event to be committed")
        assert interrupted.status == 0  # still unanswered
        daemon.kill()
        assert await _count_after_kill(db_url) == 15

        before = len(bridge.crm.received)
        await daemon.start(bridge.api)
        await bridge.wait_subscribed()
        # Due deliveries move again within 5 s of the restart.
        await bridge.crm.wait_for(before + 1, timeout=5)
        assert time.monotonic() - daemon.started_at < 5
        items = await bridge.wait_settled(15, timeout=20)
        assert len(items) == 15
        assert {d["state"] for d in items} == {"delivered"}
        wanted = {
            (c.call_id, e)
            for c in [first, *calls]
            for e in ("newCallEvent", "callConnectedEvent", "callHungUpEvent")
        }
        assert _received(bridge) == wanted
        again = [
            r
            for r in bridge.crm.received[before:]
            if r.headers["Idempotency-Key"] == interrupted.headers["Idempotency-Key"]
        ]
        assert len(again) == 1 and again[0].status == 201
        # Per-call order held across the crash too. A request the CRM answered just before the
        # kill, whose outcome was not yet committed, is sent once more with the same key (§5):
        # order is judged on each delivery's first arrival.
        for c in calls:
            first_arrivals: dict[str, str] = {}
            for r in bridge.crm.received:
                body = json.loads(r.body)
                if r.status and body["callId"] == c.call_id:
                    first_arrivals.setdefault(r.headers["Idempotency-Key"], body["event"])
            assert list(first_arrivals.values()) == ["newCallEvent", "callConnectedEvent", "callHungUpEvent"]


async def _count_after_kill(db_url: str) -> int:
    """How many deliveries the killed daemon left in the database (read directly: it is down)."""
    from sqlalchemy import func, select

    from cti_bridge.store.db import Database
    from cti_bridge.store.models import Delivery

    db = Database(db_url)
    try:
        return int(db.run_sync(lambda s: s.execute(select(func.count()).select_from(Delivery)).scalar_one()))
    finally:
        db.dispose()
