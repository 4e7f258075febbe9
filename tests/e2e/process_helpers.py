"""The daemon as a real process for the process-level tests (``tests/e2e/test_process_*.py``).

The Xelion and CRM simulators run in the test's event loop on 127.0.0.1 (port 0); ``cti-bridge run``
runs as a child process (``sys.executable -m cti_bridge run``) configured only through environment
variables, and is killed (SIGKILL), stopped (SIGTERM) and restarted on the same database with the same
secret key. Nothing here blocks the event loop: the child is an ``asyncio`` subprocess and every wait
polls with ``asyncio.sleep``. The daemon's output goes to ``daemon-<n>.log`` files in the test's
temporary directory and is printed (and so shown by pytest) when a test fails.

After the daemon has stopped, ``read_db`` reads what it committed with plain SQLAlchemy.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx
from sqlmodel import Session, select

from cti_bridge.sim.crm import CrmSimulator, Received
from cti_bridge.sim.xelion import XelionSimulator, add_demo_tenant
from cti_bridge.store.db import make_engine
from cti_bridge.store.models import CallEvent, Delivery

CLIENT_ID = "process-client"
CLIENT_SECRET = "process-client-secret-value"
SECRET_KEY = "process-test-secret-key-0123456789-abcdefgh"
USER_SPACE_PREFIX = "cti-bridge-"
#: How long the daemon may take to start answering api/health (Python start-up, migrations).
BOOT_TIMEOUT = 30.0


def cli(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``cti-bridge <args>`` in a process of its own, to its end, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "cti_bridge", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


class DaemonProcess:
    """One ``cti-bridge run`` child process at a time, restartable on the same settings."""

    def __init__(self, env: dict[str, str], workdir: Path, admin_port: int) -> None:
        self.env = env
        self.workdir = workdir
        self.admin_port = admin_port
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.log_files: list[Path] = []
        self._log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        assert not self.running, "the daemon is already running"
        self.starts += 1
        path = self.workdir / f"daemon-{self.starts}.log"
        self.log_files.append(path)
        self._log = open(path, "wb")  # noqa: SIM115 - closed when the process ends
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cti_bridge",
            "run",
            env=self.env,
            cwd=self.workdir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
        )

    def logs(self, last: int | None = None) -> str:
        parts = []
        for path in self.log_files:
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"----- {path.name} -----\n{text}")
        out = "\n".join(parts)
        return out if last is None else out[-last:]

    async def _get(self, client: httpx.AsyncClient, path: str) -> int | None:
        try:
            return (await client.get(f"http://127.0.0.1:{self.admin_port}{path}")).status_code
        except httpx.HTTPError:
            return None

    async def wait_status(self, path: str, timeout: float, headers: dict[str, str] | None = None) -> float:
        """Poll ``path`` until it answers 200; returns the wall-clock time (time.time()) it did."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0, headers=headers) as client:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise AssertionError(
                        f"the daemon exited with {self.proc.returncode} while waiting for {path}\n"
                        + self.logs(4000)
                    )
                if await self._get(client, path) == 200:
                    return time.time()
                await asyncio.sleep(0.02)
        raise AssertionError(f"{path} did not answer 200 within {timeout} s\n" + self.logs(4000))

    async def wait_healthy(self, timeout: float = BOOT_TIMEOUT) -> float:
        return await self.wait_status("/api/health", timeout)

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs (no drain, no logout)."""
        assert self.proc is not None and self.running
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self._close_log()

    async def terminate(self, timeout: float = 30.0) -> tuple[int, float]:
        """SIGTERM and wait; returns (exit code, seconds from the signal to the exit)."""
        assert self.proc is not None and self.running
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"no exit within {timeout} s of SIGTERM\n" + self.logs(4000)) from None
        elapsed = time.monotonic() - t0
        self._close_log()
        return code, elapsed

    async def ensure_stopped(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class World:
    """The simulators, the daemon process and an admin API client with the operator token."""

    db_url: str
    xelion: XelionSimulator
    crm: CrmSimulator
    daemon: DaemonProcess
    api: httpx.AsyncClient
    admin_token: str
    lease_seconds: float
    integration: dict[str, Any] = field(default_factory=dict)

    @property
    def xelion_context_id(self) -> int:
        return int(self.integration["xelionContext"]["id"])

    @property
    def user_space(self) -> str:
        return f"{USER_SPACE_PREFIX}{self.xelion_context_id}"

    def mapping(self, event: str, path: str) -> dict[str, Any]:
        return {
            "xelionEvent": event,
            "crmResourceUri": f"{self.crm.url}/{path}?user=${{user.xelionUsername}}",
            "crmResourcePayload": {
                "callId": "${callId}",
                "event": "${xelionEvent}",
                "user": "${user.xelionUsername}",
                "deliveryId": "${deliveryId}",
            },
        }

    async def configure(self, users: Iterable[str], mappings: list[dict[str, Any]]) -> dict[str, Any]:
        """POST api/crm-integrations as an operator (like tests/e2e/stack.py), then wait for ready."""
        users = list(users)
        body = {
            "xelionContext": {
                "adminUsername": "admin",
                "adminPassword": "admin-password",
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
                    "refreshToken": self.crm.issue_refresh_token(CLIENT_ID),
                }
                for u in users
            ],
            "eventUriMappings": mappings,
        }
        resp = await self.api.post("/api/crm-integrations", json=body)
        assert resp.status_code == 200, resp.text
        self.integration = resp.json()
        await self.wait_ready()
        return self.integration

    async def wait_ready(self, timeout: float = 15.0) -> float:
        return await self.daemon.wait_status(
            "/api/ready", timeout, headers={"Authorization": f"xelion {self.admin_token}"}
        )

    async def restart(self) -> float:
        """Start the daemon again (same database, key and port); returns when api/health answered."""
        await self.daemon.start()
        return await self.daemon.wait_healthy()

    async def states(self) -> dict[str, int]:
        """Deliveries by state, from one listing (one read: no delivery counted twice or missed)."""
        resp = await self.api.get("/api/deliveries", params={"limit": 1000})
        assert resp.status_code == 200, resp.text
        doc = resp.json()
        assert doc["total"] <= 1000, "more deliveries than one page holds"
        out: dict[str, int] = {}
        for item in doc["items"]:
            out[item["state"]] = out.get(item["state"], 0) + 1
        return out

    async def wait_settled(self, timeout: float) -> None:
        """Wait until no delivery is pending or sending (asked through the admin API)."""
        deadline = time.monotonic() + timeout
        states: dict[str, int] = {}
        while time.monotonic() < deadline:
            states = await self.states()
            if not states.get("pending") and not states.get("sending"):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"not settled within {timeout} s: {states}\n" + self.daemon.logs(3000))

    async def wait_deliveries(self, total: int, timeout: float = 10.0) -> None:
        """Wait until at least ``total`` deliveries exist (committed by the daemon)."""
        deadline = time.monotonic() + timeout
        found = 0
        while time.monotonic() < deadline:
            resp = await self.api.get("/api/deliveries", params={"limit": 1})
            assert resp.status_code == 200, resp.text
            found = int(resp.json()["total"])
            if found >= total:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{found} deliveries committed, expected {total}")


def in_progress(crm: CrmSimulator, path_prefix: str = "/") -> list[Received]:
    """CRM requests received and not answered yet (a slow rule still sleeping)."""
    return [r for r in crm.received if r.status == 0 and r.path.startswith(path_prefix)]


def keys_of(records: Iterable[Received], *, answered_ok: bool = False) -> list[str]:
    """The Idempotency-Keys of CRM requests (only those answered 2xx with ``answered_ok``)."""
    return [
        r.headers["Idempotency-Key"]
        for r in records
        if "Idempotency-Key" in r.headers and (not answered_ok or 200 <= r.status < 300)
    ]


@asynccontextmanager
async def process_world(tmp_path: Path, db_url: str, **env: str) -> AsyncIterator[World]:
    """Start both simulators and the daemon process (healthy, not yet configured).

    ``env`` overrides settings by their field name: ``shutdown_grace_seconds="5"`` sets
    ``CTI_BRIDGE_SHUTDOWN_GRACE_SECONDS``. Everything is stopped on the way out; a daemon still
    running then is killed. On failure the daemon's logs are printed.
    """
    xelion = XelionSimulator()
    add_demo_tenant(xelion)
    crm = CrmSimulator()
    await xelion.start()
    await crm.start()
    crm.add_client(CLIENT_ID, CLIENT_SECRET)
    admin_token = secrets.token_urlsafe(24)
    port = free_port()
    settings = {
        "database_url": db_url,
        "admin_host": "127.0.0.1",
        "admin_port": str(port),
        "admin_token": admin_token,
        "secret_key": SECRET_KEY,
        "allowed_xelion_hosts": f"127.0.0.1:{xelion.port}",
        "allow_private_targets": "true",
        "retry_schedule": "0,0.2,0.5,1,1,1,1,1",
        "retry_jitter": "0",
        "lease_seconds": "3",
        # A lease must outlast a token refresh and the CRM request (config.py): 3 s > 2 x 1 s.
        "request_timeout": "1",
        **env,
    }
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("CTI_BRIDGE_")}
    child_env.update({f"CTI_BRIDGE_{k.upper()}": str(v) for k, v in settings.items()})
    daemon = DaemonProcess(child_env, tmp_path, port)
    api = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"xelion {admin_token}"}, timeout=10
    )
    world = World(
        db_url=db_url,
        xelion=xelion,
        crm=crm,
        daemon=daemon,
        api=api,
        admin_token=admin_token,
        lease_seconds=float(settings["lease_seconds"]),
    )
    try:
        await daemon.start()
        await daemon.wait_healthy()
        yield world
    except BaseException:
        print(daemon.logs(20000))
        raise
    finally:
        await daemon.ensure_stopped()
        await api.aclose()
        await xelion.stop()
        await crm.stop()


@dataclass
class DbState:
    """What the daemon committed, read with plain SQLAlchemy once it is not running."""

    events: list[CallEvent]
    deliveries: list[Delivery]

    def by_id(self) -> dict[str, Delivery]:
        return {d.id: d for d in self.deliveries}

    def states(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.deliveries:
            out[d.state] = out.get(d.state, 0) + 1
        return out


def read_db(db_url: str) -> DbState:
    engine = make_engine(db_url)
    try:
        with Session(engine, expire_on_commit=False) as session:
            state = DbState(
                events=list(session.exec(select(CallEvent)).all()),
                deliveries=list(session.exec(select(Delivery)).all()),
            )
            session.expunge_all()
            return state
    finally:
        engine.dispose()


async def read_db_async(db_url: str) -> DbState:
    """``read_db`` in a thread, so the simulators keep serving meanwhile."""
    return await asyncio.to_thread(read_db, db_url)
