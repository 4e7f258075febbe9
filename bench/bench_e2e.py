"""End-to-end throughput of cti-bridge against the floor of the network path (issue 7).

Three kinds of process, so that nothing measured shares an event loop with what measures it:

- the CRM simulator with its OAuth2 token server (bench/sim_crm.py: ``cti_bridge.sim.crm`` plus a
  read-only path that reports arrival times), one for the whole run;
- per database, the Xelion simulator (bench/sim_xelion.py: ``cti_bridge.sim.xelion`` plus a push
  control) and the daemon itself, ``python -m cti_bridge run`` configured by environment only
  (a fresh SQLite file in a temp dir, or a fresh PostgreSQL database created and dropped here);
- this process: it configures the integration through the admin API as an operator would, starts
  the pushes, polls the CRM simulator's counters, and reads /proc of the daemon.

Measured:

- floor: pre-rendered POSTs (the bridge's URL, headers and body shape, a valid bearer token) from one
  plain client in this process to the CRM simulator, C in flight: aiohttp ``ClientSession`` (max(N,
  5,000) requests) and the daemon's own CRM client (``crm_client.CrmClient``: http1.py behind the
  outbound guard) as many, and, for reference, httpx with its default transport, 2,000 requests
  (it manages ~300-600/s here). Best of two rounds after a warm-up.
- bridge: the Xelion simulator pushes N call events as fast as one websocket takes them, as a
  Xelion server does (no flow control; ``--window W`` keeps the pusher at most W events ahead of
  what reached the CRM, as runs before 2026-12-06 did: see sim_xelion.py); the daemon commits
  each (event + delivery, one transaction) before delivering it with the user's
  OAuth2 token to the same CRM simulator, its per-host cap set to C like the floor's. Timed from
  the first event sent to the last CRM request received (the simulator's arrival clock; same
  machine, same wall clock). One event = one delivery = one CRM request (one user with credentials,
  one mapping per event type, distinct callIds). Also at N/10, to see whether 10x the events takes
  10x the time and the same memory. "ingest" is N over the time from the first event sent to the
  last event committed (read from the database afterwards).
- replay (``--no-replay`` skips it): right after the N run, its N deliveries (all delivered) are sent
  again with one ``POST api/deliveries/replay``, timed from that request to the last CRM request
  received; then one floor round, for a ratio side by side. Issue 7 names "a replay of a day of
  dead letters": such a backlog drains through the worker's claims, not the ingest's hand-off.
- side-by-side ratio (``--ratio-rounds``, 3): per database, after the N run, that many rounds of
  the aiohttp floor (N requests) and the bridge (N events) back to back, in alternating order; each
  round's ratio, and their median. The first ratio (the N run over the best floor round, minutes
  apart) takes in the machine's drift, which here reaches tens of percent within minutes.
- latency: events pushed at a fixed 200 per second (and at ``--low-rate``, 50); per event, CRM
  arrival minus push time (the event carries ``sentAt``; the mapping renders it into the payload).
- the daemon's CPU seconds (utime+stime from /proc/<pid>/stat) per 1,000 events of the N run, its
  resident memory after each run and its peak (VmHWM from /proc/<pid>/status); and the CPU that
  processes other than the benchmark's own used meanwhile (/proc/stat), since a 2-core machine
  shared with someone's test run gives other numbers.
- scale (SQLite; ``--scale-db`` for others): the same N-event run with 1,000 user credentials and
  200 mappings (4 that apply, 196 whose condition does not hold) instead of 1 and 4; events spread
  over the 1,000 users, whose tokens are fetched in a warm-up first. A 1-and-4 daemon runs beside
  it, and the two take turns for ``--scale-rounds`` (5) rounds; the medians are compared.

    .venv/bin/python bench/bench_e2e.py [--events N] [--db sqlite|postgresql|both] [--quick]
                                        [--concurrency 32] [--window 0] [--keep]
                                        [--profile DIR [--profile-mode cpu|gil|wall]]
                                        [--scale-users 1000] [--scale-rounds 5]

Default N is 5,000 (this benchmark then takes about 75 s here, both databases and the scale
rounds; the whole ``make bench``, with the template and retention benchmarks, about 3 minutes);
``--events 100000 --db sqlite --scale-users 0`` checks the memory target. Writes
bench/results/latest.json (with the commit and the changed files measured). ``--profile DIR`` also
records the daemon with py-spy during each N run (collapsed stacks, DIR/profile-<db>.txt) and prints
where the time goes (bench/profile_report.py).

Other simulators (``--crm-cmd "CMD"``, ``--xelion-cmd "CMD"``): the benchmark runs CMD with its own
arguments appended and talks to the process only through this contract, so a separately written
CRM or event source can stand in for ours.

- CRM: arguments ``--client ID:SECRET --tokens K``. Prints one JSON line when ready: ``{"url": base,
  "token_url": U, "refresh_tokens": {"ID": [K refresh tokens]}}``. Serves ``POST {base}/...`` (any
  path; answers 2xx to a valid ``Authorization: Bearer`` access token), the OAuth2 token endpoint at
  U (``grant_type=refresh_token`` with client ``ID``/``SECRET``; answers an access token), and the
  control paths: ``GET {base}/_sim/stats`` (``{"received": n, ...}``: CRM requests so far; the
  pusher's window reads it), ``POST {base}/_sim/reset`` (forget them), ``GET {base}/_sim/bench/last``
  (``{"received": n, "first_at": t, "last_at": t, "token_requests": {"ID": k}}``, times as
  ``time.time()`` on arrival) and ``GET {base}/_sim/bench/arrivals`` (``{"arrivals": [[arrival time,
  status, the JSON body's sentAt or null], ...]}``).
- Xelion: arguments ``--users U``. Prints one JSON line when ready: ``{"port": P, "control": C}``.
  Serves Xelion's REST login and notification websocket on 127.0.0.1:P exactly as
  shared/xelion-protocol.md describes (tenant ``master``, admin ``admin``/``admin-password``; the
  events' callee is ``anne`` or one of the users ``u0001``.., whom the scale run gives credentials),
  ``POST {C}/push`` as sim_xelion.py documents (its answer's ``window_waits`` is optional), and
  ``GET {C}/status`` (``{"subscriptions": [[event types of one subscribed websocket], ...]}``: the
  benchmark starts once a websocket is subscribed to all four call events).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from common import (
    BENCH,
    Child,
    ProcSample,
    command_cpu_seconds,
    cpu_busy_seconds,
    machine,
    percentile,
    process_cpu_seconds,
    python_argv,
)

CLIENT_ID = "bench-client"
CLIENT_SECRET = "bench-client-secret-0123456789"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
EVENT_TYPES = ("newCallEvent", "callConnectedEvent", "callHungUpEvent", "missedCallEvent")
RESULTS = BENCH / "results"
TARGETS = {
    "ratio": 0.5,
    "p99_ms": 50.0,
    "rss_mb": 150.0,
}


# --- the mappings and the floor's requests: the same shape ------------------------------------------


def crm_path(crm_url: str) -> str:
    return f"{crm_url}/services/apexrest/Call"


def payload_template(event: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "initiation": '${(initiation=="outgoing")?"calldialed":"callreceived"}',
        "callId": "${callId}",
        "eventType": event,
        "from": "${callerPhoneNumber}",
        "to": "${calleePhoneNumber}",
        "user": "${user.xelionUsername}",
        "deliveryId": "${deliveryId}",
        "sentAt": "${sentAt}",
    }
    if event == "callHungUpEvent":
        body["duration"] = "${duration}"
    return body


def mappings(crm_url: str, extra_per_type: int = 0) -> list[dict[str, Any]]:
    out = []
    for event in EVENT_TYPES:
        out.append(
            {
                "xelionEvent": event,
                "crmResourceUri": crm_path(crm_url) + "?user=${user.xelionUsername}",
                "crmResourcePayload": payload_template(event),
            }
        )
        for k in range(extra_per_type):
            # Routing by line: a mapping per number, none of which the benchmark's calls dial.
            out.append(
                {
                    "xelionEvent": event,
                    "crmResourceUri": crm_path(crm_url) + f"/line{k}?user=${{user.xelionUsername}}",
                    "crmResourcePayload": payload_template(event),
                    "condition": f"${{calleePhoneNumber == '+319900{k:05d}'}}",
                }
            )
    return out


def floor_requests(crm_url: str, n: int) -> list[tuple[str, bytes, dict[str, str]]]:
    """What the bridge would send for n events, rendered beforehand."""
    out = []
    url = crm_path(crm_url) + "?user=anne"
    for i in range(n):
        event = EVENT_TYPES[i % 4]
        body = {
            "initiation": "callreceived",
            "callId": f"floor-{i}",
            "eventType": event,
            "from": f"+316{i:08d}",
            "to": "+31152511401",
            "user": "anne",
            "deliveryId": f"00000000-0000-4000-8000-{i:012d}",
            "sentAt": f"{time.time():.6f}",
        }
        headers = {"Content-Type": "application/json", "Idempotency-Key": body["deliveryId"]}
        out.append((url, json.dumps(body).encode(), headers))
    return out


# --- small clients ------------------------------------------------------------------------------------


class Crm:
    """The CRM simulator process and its control API."""

    def __init__(self, http: aiohttp.ClientSession, child: Child) -> None:
        self.http = http
        self.child = child
        self.url: str = child.info["url"]
        self.token_url: str = child.info["token_url"]
        self.refresh_tokens: list[str] = child.info["refresh_tokens"][CLIENT_ID]

    async def received(self) -> int:
        async with self.http.get(self.url + "/_sim/stats") as r:
            return int((await r.json())["received"])

    async def last(self) -> dict[str, Any]:
        async with self.http.get(self.url + "/_sim/bench/last") as r:
            return dict(await r.json())

    async def arrivals(self) -> list[list[Any]]:
        async with self.http.get(self.url + "/_sim/bench/arrivals") as r:
            return list((await r.json())["arrivals"])

    async def reset(self) -> None:
        async with self.http.post(self.url + "/_sim/reset") as r:
            r.raise_for_status()

    async def access_token(self) -> str:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": self.refresh_tokens[0],
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        }
        async with self.http.post(self.token_url, data=form) as r:
            r.raise_for_status()
            return str((await r.json())["access_token"])

    async def wait_for(self, count: int, timeout: float, poll: float = 0.02) -> None:
        deadline = time.monotonic() + timeout
        while True:
            n = await self.received()
            if n >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the CRM simulator received {n} of {count} requests in {timeout:.0f} s")
            await asyncio.sleep(poll)


# --- the floor ----------------------------------------------------------------------------------------


async def drive(
    send: Callable[[str, bytes, dict[str, str]], Awaitable[int]], reqs: list[Any], c: int
) -> float:
    it = iter(reqs)
    bad = 0

    async def worker() -> None:
        nonlocal bad
        for url, body, headers in it:
            if not 200 <= await send(url, body, headers) < 300:
                bad += 1

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(c):
            tg.create_task(worker())
    elapsed = time.perf_counter() - t0
    if bad:
        raise RuntimeError(f"floor: {bad} requests were not answered 2xx")
    return len(reqs) / elapsed


async def aiohttp_floor(crm: Crm, n: int, concurrency: int) -> tuple[float, float]:
    """One round of the aiohttp floor (after a warm-up of its own): requests/s, and the CPU seconds
    per 1,000 requests of the whole path (the client, the CRM simulator)."""
    token = await crm.access_token()
    reqs = floor_requests(crm.url, n)
    for _, _, h in reqs:
        h["Authorization"] = "Bearer " + token
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:

        async def send(url: str, body: bytes, headers: dict[str, str]) -> int:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                return response.status

        await drive(send, reqs[: min(500, n)], concurrency)
        pids = (os.getpid(), crm.child.pid)
        cpu_before = sum(process_cpu_seconds(p) for p in pids)
        rate = await drive(send, reqs, concurrency)
        cpu = sum(process_cpu_seconds(p) for p in pids) - cpu_before
    await crm.reset()
    return rate, cpu / n * 1000


async def floor(crm: Crm, n: int, concurrency: int, rounds: int, ref_n: int) -> dict[str, float]:
    """Requests/s of the plain clients; the httpx ones (references) send min(n, ref_n) requests."""
    token = await crm.access_token()
    reqs = floor_requests(crm.url, n)
    for _, _, h in reqs:
        h["Authorization"] = "Bearer " + token
    warm = reqs[: min(500, n)]
    ref = reqs[: min(n, ref_n)]
    out: dict[str, float] = {"requests": n, "reference_requests": len(ref)}

    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send_aiohttp(url: str, body: bytes, headers: dict[str, str]) -> int:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                return response.status

        await drive(send_aiohttp, warm, concurrency)
        out["aiohttp"] = max([await drive(send_aiohttp, reqs, concurrency) for _ in range(rounds)])
    await crm.reset()

    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(limits=limits) as client:

        async def send_httpx(url: str, body: bytes, headers: dict[str, str]) -> int:
            response = await client.post(url, content=body, headers=headers)
            return response.status_code

        await drive(send_httpx, warm, concurrency)
        out["httpx"] = max([await drive(send_httpx, ref, concurrency) for _ in range(rounds)])
    await crm.reset()

    from cti_bridge.config import Settings
    from cti_bridge.delivery.crm_client import CrmClient

    crm_client = CrmClient(Settings(allow_private_targets=True))
    try:

        async def send_guarded(url: str, body: bytes, headers: dict[str, str]) -> int:
            answer = await crm_client.send("POST", url, headers, body, max_bytes=4096)
            return answer.status

        await drive(send_guarded, warm, concurrency)
        out["daemon_client"] = max([await drive(send_guarded, reqs, concurrency) for _ in range(rounds)])
    finally:
        await crm_client.aclose()
    await crm.reset()
    return out


# --- the bridge ---------------------------------------------------------------------------------------


@dataclass
class Stack:
    """The daemon and the Xelion simulator of one database."""

    db: str
    url: str
    workdir: Path
    daemon: Child
    xelion: Child
    admin: str
    admin_token: str
    http: aiohttp.ClientSession
    crm_url: str
    pg_name: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def control(self) -> str:
        return str(self.xelion.info["control"])

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"xelion {self.admin_token}"}
        async with self.http.request(method, self.admin + path, json=body, headers=headers) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text else None)

    async def push(
        self, count: int, rate: float, prefix: str, users: int = 1, window: int = 0
    ) -> dict[str, Any]:
        body = {
            "count": count,
            "rate": rate,
            "prefix": prefix,
            "users": users,
            "window": window,
            "ack_url": self.crm_url + "/_sim/stats",
        }
        timeout = aiohttp.ClientTimeout(total=None)
        async with self.http.post(self.control + "/push", json=body, timeout=timeout) as r:
            if r.status != 200:
                raise RuntimeError(f"push failed: {r.status} {await r.text()}")
            return dict(await r.json())

    def sample(self) -> ProcSample:
        return self.daemon.sample()

    async def subscribed(self) -> bool:
        """Whether the Xelion simulator has a websocket subscribed to every benchmark event type."""
        async with self.http.get(self.control + "/status") as r:
            doc = await r.json()
        return any(set(EVENT_TYPES) <= set(s) for s in doc["subscriptions"])

    def events_committed(self, prefix: str) -> tuple[int, float | None]:
        """How many events of a push are stored, and when the last one was (epoch seconds)."""
        sql = "SELECT count(*), max(received_at) FROM call_event WHERE call_id LIKE %s"
        pattern = prefix + "-%"
        if self.db == "sqlite":
            path = self.url.split(":///", 1)[1]
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as conn:
                n, last = conn.execute(sql.replace("%s", "?"), (pattern,)).fetchone()
        else:
            import psycopg

            with psycopg.connect(self.url.replace("+psycopg", "")) as conn:
                n, last = conn.execute(sql, (pattern,)).fetchone()
        return int(n), _epoch(last)


def _iso(epoch: float) -> str:
    """An epoch time as the admin API takes it (ISO 8601, UTC): ``_epoch``'s inverse."""
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def create_pg_database() -> tuple[str, str]:
    import psycopg

    name = f"ctibench_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sim_argv(command: str | None, script: str, *args: str) -> list[str]:
    """The command line of a simulator: ``command`` (split like a shell would) or our own ``script``,
    followed by the benchmark's arguments for it."""
    return [*shlex.split(command), *args] if command else python_argv(script, *args)


async def start_stack(
    http: aiohttp.ClientSession, crm: Crm, db: str, args: argparse.Namespace, users: int, extra_mappings: int
) -> Stack:
    from common import free_port

    workdir = Path(tempfile.mkdtemp(prefix=f"cti-bench-{db}-"))
    pg_name: str | None = None
    if db == "sqlite":
        url = f"sqlite:///{workdir / 'bench.db'}"
    else:
        pg_name, url = create_pg_database()
    xelion = Child("xelion", sim_argv(args.xelion_cmd, "sim_xelion.py", "--users", str(max(0, users - 1))))
    port = free_port()
    admin_token = secrets.token_urlsafe(24)
    env = {
        "CTI_BRIDGE_DATABASE_URL": url,
        "CTI_BRIDGE_ADMIN_PORT": str(port),
        "CTI_BRIDGE_ADMIN_TOKEN": admin_token,
        "CTI_BRIDGE_ALLOWED_XELION_HOSTS": f"127.0.0.1:{xelion.info['port']}",
        "CTI_BRIDGE_ALLOW_PRIVATE_TARGETS": "true",
        "CTI_BRIDGE_SECRET_KEY": secrets.token_urlsafe(36),
        "CTI_BRIDGE_PER_HOST_CONCURRENCY": str(args.concurrency),
        "CTI_BRIDGE_LOG_LEVEL": args.log_level,
    }
    daemon = Child(
        "daemon",
        [sys.executable, "-m", "cti_bridge", "run"],
        env=env,
        log_path=workdir / "daemon.log",
        ready_json=False,
    )
    stack = Stack(
        db, url, workdir, daemon, xelion, f"http://127.0.0.1:{port}", admin_token, http, crm.url, pg_name
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if not daemon.alive():
                raise RuntimeError(f"the daemon exited: {(workdir / 'daemon.log').read_text()[-2000:]}")
            try:
                status, _ = await stack.api("GET", "/api/health")
                if status == 200:
                    break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon's admin API did not come up in 60 s")
            await asyncio.sleep(0.1)
        names = ["anne"] + [f"u{i:04d}" for i in range(1, users)]
        body = {
            "xelionContext": {
                "adminUsername": "admin",
                "adminPassword": "admin-password",
                "host": f"127.0.0.1:{xelion.info['port']}",
                "tenant": "master",
                "protocol": "http",
            },
            "crmContext": {"authorizationServerUri": crm.token_url, "authorizationHeaderPrefix": "Bearer "},
            "userCredentials": [
                {
                    "xelionUsername": name,
                    "clientId": CLIENT_ID,
                    "clientSecret": CLIENT_SECRET,
                    "refreshToken": crm.refresh_tokens[i],
                }
                for i, name in enumerate(names)
            ],
            "eventUriMappings": mappings(crm.url, extra_mappings),
        }
        t0 = time.monotonic()
        status, doc = await stack.api("POST", "/api/crm-integrations", body)
        if status != 200:
            raise RuntimeError(f"configuring the integration failed: {status} {doc}")
        stack.info["configure_seconds"] = round(time.monotonic() - t0, 2)
        # /api/ready alone is not enough: it answers 200 before the new integration's source exists.
        deadline = time.monotonic() + 30
        while not (await stack.subscribed() and (await stack.api("GET", "/api/ready"))[0] == 200):
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon's Xelion source never subscribed")
            await asyncio.sleep(0.05)
    except BaseException:
        await stop_stack(stack)
        raise
    return stack


async def stop_stack(stack: Stack, keep: bool = False) -> int | None:
    code = stack.daemon.stop(timeout=30)
    stack.xelion.stop()
    if keep:
        print(f"kept: {stack.workdir} (daemon.log), database {stack.url}", file=sys.stderr)
        return code
    if stack.pg_name is not None:
        drop_pg_database(stack.pg_name)
    shutil.rmtree(stack.workdir, ignore_errors=True)
    return code


class Profiler:
    """py-spy recording the daemon (collapsed stacks, one line per stack with its sample count)."""

    MODES = {"cpu": [], "gil": ["--gil"], "wall": ["--idle"]}

    def __init__(self, pid: int, out: Path, rate: int, mode: str) -> None:
        exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.out = out
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking", "--threads"]
            + self.MODES[mode]
            + ["--format", "raw", "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def throughput(
    stack: Stack,
    crm: Crm,
    n: int,
    prefix: str,
    users: int = 1,
    profile: Path | None = None,
    profile_mode: str = "cpu",
    window: int = 0,
) -> dict[str, Any]:
    await crm.reset()
    before = stack.sample()
    ours = [os.getpid(), crm.child.pid, stack.xelion.pid, stack.daemon.pid]
    ours_before = sum(process_cpu_seconds(p) for p in ours)
    sims = (crm.child.pid, stack.xelion.pid)
    sims_before = sum(process_cpu_seconds(p) for p in sims)
    busy_before = cpu_busy_seconds()
    pg_cpu = (lambda: command_cpu_seconds("postgres", stack.pg_name)) if stack.pg_name else (lambda: 0.0)
    pg_before = pg_cpu()
    profiler = Profiler(stack.daemon.pid, profile, 200, profile_mode) if profile is not None else None
    if profiler is not None:
        await asyncio.sleep(1.0)  # py-spy attaches
    push = asyncio.create_task(stack.push(n, 0, prefix, users, window))
    try:
        await crm.wait_for(n, timeout=max(120.0, n / 50))
        sent = await push
    finally:
        if not push.done():
            push.cancel()
        if profiler is not None:
            profiler.stop()
    after = stack.sample()
    pg = pg_cpu() - pg_before  # the daemon's backends (pooled, so they live through the run)
    busy = cpu_busy_seconds() - busy_before
    foreign = busy - (sum(process_cpu_seconds(p) for p in ours) - ours_before) - pg
    sims_cpu = sum(process_cpu_seconds(p) for p in sims) - sims_before
    last = await crm.last()
    committed, last_commit = stack.events_committed(prefix)
    if committed != n:
        raise RuntimeError(f"{committed} of {n} events were stored")
    elapsed = last["last_at"] - sent["first_sent"]
    cpu = after.cpu_seconds - before.cpu_seconds
    return {
        "events": n,
        "seconds": round(elapsed, 3),
        "events_per_s": round(n / elapsed, 1),
        "ingest_per_s": round(n / (last_commit - sent["first_sent"]), 1) if last_commit else None,
        "push_seconds": round(sent["last_sent"] - sent["first_sent"], 3),
        "window_waits": sent.get("window_waits"),
        "cpu_s_per_1000": round(cpu / n * 1000, 3),
        "cpu_utilisation": round(cpu / elapsed, 2),
        # The two simulators' CPU: on a 2-core machine they share the cores with the daemon.
        "sims_cpu_s_per_1000": round(sims_cpu / n * 1000, 3),
        "rss_mb_after": round(after.rss_mb, 1),
        # Cores kept busy by processes other than the benchmark's own (py-spy, other people's tests).
        "foreign_cores": round(max(0.0, foreign) / elapsed, 2),
        "postgres_cores": round(pg / elapsed, 2),
        "crm_received": last["received"],
        "token_requests": sum(last["token_requests"].values()),
    }


async def latency(stack: Stack, crm: Crm, rate: float, seconds: float, prefix: str) -> dict[str, Any]:
    await crm.reset()
    n = int(rate * seconds)
    sent = await stack.push(n, rate, prefix)
    await crm.wait_for(n, timeout=60)
    arrivals = await crm.arrivals()
    lat = sorted((at - float(sent_at)) * 1000 for at, _status, sent_at in arrivals if sent_at is not None)
    bad = sum(1 for _at, status, _s in arrivals if not 200 <= status < 300)
    offered = (n - 1) / (sent["last_sent"] - sent["first_sent"]) if n > 1 else rate
    last_at = max(at for at, _s, _t in arrivals)
    return {
        "rate": rate,
        "offered_per_s": round(offered, 1),
        "delivered_per_s": round(n / (last_at - sent["first_sent"]), 1),
        "events": n,
        "p50_ms": round(percentile(lat, 0.50), 2),
        "p90_ms": round(percentile(lat, 0.90), 2),
        "p99_ms": round(percentile(lat, 0.99), 2),
        "max_ms": round(lat[-1], 2) if lat else None,
        "non_2xx": bad,
    }


async def replay(
    stack: Stack,
    crm: Crm,
    n: int,
    since: float,
    until: float,
    profile: Path | None = None,
    profile_mode: str = "cpu",
) -> dict[str, Any]:
    """A replay of a day of deliveries (issue 7: "a replay of a day of dead letters"): the N run's
    deliveries, all delivered, sent again with one ``POST api/deliveries/replay``; timed from that
    request to the last CRM request received. Unlike the N run, nothing is handed over from the
    ingest: every delivery goes through the worker's claims, the path a backlog drains by."""
    await crm.reset()
    before = stack.sample()
    sims = (crm.child.pid, stack.xelion.pid)
    sims_before = sum(process_cpu_seconds(p) for p in sims)
    profiler = Profiler(stack.daemon.pid, profile, 200, profile_mode) if profile is not None else None
    if profiler is not None:
        await asyncio.sleep(1.0)  # py-spy attaches
    t0 = time.time()
    status, body = await stack.api(
        "POST", "/api/deliveries/replay", {"state": "delivered", "since": _iso(since), "until": _iso(until)}
    )
    answered = time.time()
    if status != 200 or body.get("replayed") != n:
        raise RuntimeError(f"replay: {status} {body} (expected {n} replayed)")
    try:
        await crm.wait_for(n, timeout=max(120.0, n / 50))
    finally:
        if profiler is not None:
            profiler.stop()
    after = stack.sample()
    last = await crm.last()
    if last["received"] != n:
        raise RuntimeError(f"replay: the CRM received {last['received']} of {n} requests")
    elapsed = last["last_at"] - t0
    cpu = after.cpu_seconds - before.cpu_seconds
    sims_cpu = sum(process_cpu_seconds(p) for p in sims) - sims_before
    return {
        "deliveries": n,
        "seconds": round(elapsed, 3),
        "per_s": round(n / elapsed, 1),
        "replay_request_seconds": round(answered - t0, 3),
        "cpu_s_per_1000": round(cpu / n * 1000, 3),
        "cpu_utilisation": round(cpu / elapsed, 2),
        "sims_cpu_s_per_1000": round(sims_cpu / n * 1000, 3),
    }


async def bridge(http: aiohttp.ClientSession, crm: Crm, db: str, args: argparse.Namespace) -> dict[str, Any]:
    stack = await start_stack(http, crm, db, args, users=1, extra_mappings=0)
    out: dict[str, Any] = {"database": db, "configure_seconds": stack.info["configure_seconds"]}
    try:
        await crm.reset()
        await stack.push(args.warmup, 0, "warm", 1, args.window)
        await crm.wait_for(args.warmup, timeout=60)
        small = max(100, args.events // 10)
        out["small"] = await throughput(stack, crm, small, "small", window=args.window)
        profile = args.profile / f"profile-{db}.txt" if args.profile else None
        large_since = time.time() - 0.001
        out["large"] = await throughput(
            stack,
            crm,
            args.events,
            "large",
            profile=profile,
            profile_mode=args.profile_mode,
            window=args.window,
        )
        if args.replay:
            out["replay"] = await replay(
                stack,
                crm,
                args.events,
                large_since,
                time.time() + 1.0,
                profile=args.profile / f"profile-replay-{db}.txt" if args.profile else None,
                profile_mode=args.profile_mode,
            )
            if args.ratio_rounds:
                # And the floor right after it, as the side-by-side rounds do for the N run.
                rate, _cpu = await aiohttp_floor(crm, args.events, args.concurrency)
                out["replay"]["floor_after"] = round(rate, 1)
                out["replay"]["ratio_side_by_side"] = round(out["replay"]["per_s"] / rate, 3)
        out["ratio_rounds"] = []
        for r in range(args.ratio_rounds):
            # The floor and the bridge back to back, in turns: the machine's speed drifts by tens
            # of percent within minutes, and a ratio of two runs apart takes that drift in.
            pair: dict[str, float] = {}
            for which in ("floor", "bridge") if r % 2 == 0 else ("bridge", "floor"):
                if which == "floor":
                    rate, floor_cpu = await aiohttp_floor(crm, args.events, args.concurrency)
                    pair["floor"] = round(rate, 1)
                    pair["floor_cpu_s_per_1000"] = round(floor_cpu, 3)
                else:
                    await crm.reset()
                    run = await throughput(stack, crm, args.events, f"round{r}", window=args.window)
                    pair["bridge"] = run["events_per_s"]
                    pair["cpu_s_per_1000"] = run["cpu_s_per_1000"]
                    pair["sims_cpu_s_per_1000"] = run["sims_cpu_s_per_1000"]
            pair["ratio"] = round(pair["bridge"] / pair["floor"], 3)
            # What the machine's cores could give at most: every core busy with the bridge's
            # processes (daemon and simulators), at the CPU per event this round measured.
            whole = pair["cpu_s_per_1000"] + pair["sims_cpu_s_per_1000"]
            pair["ceiling"] = round((os.cpu_count() or 1) * 1000 / whole / pair["floor"], 3)
            out["ratio_rounds"].append(pair)
        if out["ratio_rounds"]:
            out["ratio_median"] = statistics.median(p["ratio"] for p in out["ratio_rounds"])
        out["latency"] = await latency(stack, crm, args.rate, args.latency_seconds, "lat")
        if args.low_rate > 0:
            out["latency_low"] = await latency(stack, crm, args.low_rate, args.latency_seconds, "low")
        final = stack.sample()
        out["rss_mb_final"] = round(final.rss_mb, 1)
        out["peak_rss_mb"] = round(final.hwm_mb, 1)
        if profile is not None:
            out["profile"] = str(profile)
    finally:
        out["exit_code"] = await stop_stack(stack, args.keep)
    return out


async def scale(http: aiohttp.ClientSession, crm: Crm, db: str, args: argparse.Namespace) -> dict[str, Any]:
    """The N-event run with 1,000 users and 200 mappings, and beside it a daemon with 1 user and 4
    mappings, both up at once (idle while the other runs), in ``--scale-rounds`` rounds that
    alternate which goes first: on a machine this noisy (+-20 % run to run) only runs side by side,
    many times over, compare. Reports each round's pair and the medians."""
    users, per_type = args.scale_users, (args.scale_mappings - 4) // 4
    stack = await start_stack(http, crm, db, args, users=users, extra_mappings=per_type)
    base: Stack | None = None
    out: dict[str, Any] = {
        "database": db,
        "users": users,
        "mappings": 4 + 4 * per_type,
        "configure_seconds": stack.info["configure_seconds"],
        "rounds": [],
    }
    try:
        base = await start_stack(http, crm, db, args, users=1, extra_mappings=0)
        # One event per user first: each credential gets its access token, as in a running daemon.
        await crm.reset()
        await stack.push(users, 0, "warm", users, args.window)
        await crm.wait_for(users, timeout=120)
        await crm.reset()
        await base.push(args.warmup, 0, "warm", 1, args.window)
        await crm.wait_for(args.warmup, timeout=60)
        profile = args.profile / f"profile-scale-{db}.txt" if args.profile else None
        for r in range(max(1, args.scale_rounds)):
            pair: dict[str, Any] = {}
            order = ("scale", "base") if r % 2 else ("base", "scale")
            for which in order:
                if which == "scale":
                    pair["scale"] = await throughput(
                        stack,
                        crm,
                        args.events,
                        f"scale{r}",
                        users,
                        profile=profile if r == 0 else None,
                        profile_mode=args.profile_mode,
                        window=args.window,
                    )
                else:
                    pair["base"] = await throughput(base, crm, args.events, f"base{r}", window=args.window)
            out["rounds"].append(pair)
        for which in ("scale", "base"):
            out[f"{which}_cpu_s_per_1000_median"] = statistics.median(
                p[which]["cpu_s_per_1000"] for p in out["rounds"]
            )
            out[f"{which}_events_per_s_median"] = statistics.median(
                p[which]["events_per_s"] for p in out["rounds"]
            )
        ratios = [p["scale"]["cpu_s_per_1000"] / p["base"]["cpu_s_per_1000"] for p in out["rounds"]]
        out["cpu_ratio_median"] = round(statistics.median(ratios), 3)
        out["large"] = out["rounds"][0]["scale"]
        out["peak_rss_mb"] = round(stack.sample().hwm_mb, 1)
        if profile is not None:
            out["profile"] = str(profile)
    finally:
        out["exit_code"] = await stop_stack(stack, args.keep)
        if base is not None:
            await stop_stack(base, args.keep)
    return out


# --- the report ---------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ",.0f") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def report(results: dict[str, Any]) -> str:
    m, a = results["machine"], results["args"]
    lines = [
        f"cti-bridge end-to-end benchmark: {m['nproc']} x {m['cpu']}, Python {m['python']}, "
        f"{m['memory_mb']:,} MB; code {results['code']['commit']}"
        + (
            f" + uncommitted changes in {len(results['code']['changed'])} files"
            if results["code"]["changed"]
            else ""
        ),
        f"N = {a['events']:,} events; one event = 1 delivery = 1 CRM request (1 user with credentials, "
        f"1 mapping per event type); {a['concurrency']} concurrent requests to the CRM host; "
        + (
            f"the pusher stays at most {a['window']} events ahead of the CRM"
            if a["window"]
            else "the pusher sends as fast as the websocket takes the events (no flow control)"
        ),
        "",
    ]
    fl = results["floor"]
    lines += [
        f"floor: pre-rendered POSTs, one plain client -> CRM simulator (another process), "
        f"{a['concurrency']} in flight, best of {a['floor_rounds']} rounds",
        f"  aiohttp ClientSession                 {fmt(fl['aiohttp']):>8} req/s  "
        f"({fl['requests']:,} requests)",
        f"  httpx, default transport              {fmt(fl['httpx']):>8} req/s  "
        f"({fl['reference_requests']:,} requests)",
        f"  the daemon's own CRM client           {fmt(fl['daemon_client']):>8} req/s  "
        f"({fl['requests']:,} requests; the ceiling of its transport)",
        "    (crm_client.py: http1.py keep-alive HTTP/1.1, outbound guard)",
        "",
    ]
    dbs = [r for r in results["bridge"]]
    if dbs:
        head = f"{'bridge: Xelion sim -> websocket -> daemon -> CRM':<50}" + "".join(
            f"{r['database']:>13}" for r in dbs
        )
        lines.append(head)

        def row(label: str, values: list[str], target: str = "") -> None:
            lines.append(
                f"  {label:<48}" + "".join(f"{v:>13}" for v in values) + (f"   {target}" if target else "")
            )

        floor_rate = fl["aiohttp"]
        row("events/s, N events", [fmt(r["large"]["events_per_s"]) for r in dbs])
        row(
            "  ratio to the aiohttp floor",
            [fmt(r["large"]["events_per_s"] / floor_rate, ".3f") for r in dbs],
            f"target >= {TARGETS['ratio']}",
        )
        if all(r.get("ratio_rounds") for r in dbs):
            n_rounds = len(dbs[0]["ratio_rounds"])
            row(
                f"  ratio, median of {n_rounds} side-by-side rounds",
                [fmt(r["ratio_median"], ".3f") for r in dbs],
                f"target >= {TARGETS['ratio']}",
            )
            row(
                "    (floor and bridge back to back) lowest-highest",
                [
                    f"{min(p['ratio'] for p in r['ratio_rounds']):.2f}-"
                    f"{max(p['ratio'] for p in r['ratio_rounds']):.2f}"
                    for r in dbs
                ],
            )
        if all(r.get("ratio_rounds") for r in dbs):
            row(
                "    CPU s per 1,000: floor (client + CRM sim)",
                [
                    fmt(statistics.median(p["floor_cpu_s_per_1000"] for p in r["ratio_rounds"]), ".3f")
                    for r in dbs
                ],
            )
            row(
                "      bridge (daemon + both sims)",
                [
                    fmt(
                        statistics.median(
                            p["cpu_s_per_1000"] + p["sims_cpu_s_per_1000"] for p in r["ratio_rounds"]
                        ),
                        ".3f",
                    )
                    for r in dbs
                ],
            )
            row(
                f"    ceiling: ratio with all {os.cpu_count()} cores busy (median)",
                [fmt(statistics.median(p["ceiling"] for p in r["ratio_rounds"]), ".3f") for r in dbs],
            )
        row("  ingest: events committed/s", [fmt(r["large"]["ingest_per_s"]) for r in dbs])
        if all("replay" in r for r in dbs):
            row(
                "replay of the N run's deliveries: deliveries/s",
                [fmt(r["replay"]["per_s"]) for r in dbs],
            )
            row(
                "  ratio to the aiohttp floor",
                [fmt(r["replay"]["per_s"] / floor_rate, ".3f") for r in dbs],
            )
            if all("ratio_side_by_side" in r["replay"] for r in dbs):
                row(
                    "  ratio to the floor measured right after",
                    [fmt(r["replay"]["ratio_side_by_side"], ".3f") for r in dbs],
                )
            row(
                "  daemon CPU s per 1,000 deliveries",
                [fmt(r["replay"]["cpu_s_per_1000"], ".3f") for r in dbs],
            )
            row(
                "  daemon CPU use (cores)",
                [fmt(r["replay"]["cpu_utilisation"], ".2f") for r in dbs],
            )
            row(
                "  the replay request itself, s",
                [fmt(r["replay"]["replay_request_seconds"], ".2f") for r in dbs],
            )
        row(
            f"events/s, N/10 = {dbs[0]['small']['events']:,} events",
            [fmt(r["small"]["events_per_s"]) for r in dbs],
        )
        row(
            "time(N) / time(N/10)",
            [fmt(r["large"]["seconds"] / r["small"]["seconds"], ".1f") for r in dbs],
            "ideal 10",
        )
        row("daemon CPU s per 1,000 events (N run)", [fmt(r["large"]["cpu_s_per_1000"], ".3f") for r in dbs])
        row(
            "  daemon CPU use (cores) during the N run",
            [fmt(r["large"]["cpu_utilisation"], ".2f") for r in dbs],
        )
        row(
            "  simulators' CPU s per 1,000 events (N run)",
            [fmt(r["large"]["sims_cpu_s_per_1000"], ".3f") for r in dbs],
        )
        row(
            "  its PostgreSQL backends' CPU (cores), N run",
            [fmt(r["large"].get("postgres_cores"), ".2f") for r in dbs],
        )
        row(
            "  other processes' CPU (cores) during the N run",
            [fmt(r["large"]["foreign_cores"], ".2f") for r in dbs],
            "0 on a quiet machine",
        )
        lat = dbs[0]["latency"]
        row(
            f"latency at {lat['rate']:.0f} ev/s ({lat['events']:,} events) p50 ms",
            [fmt(r["latency"]["p50_ms"], ".1f") for r in dbs],
        )
        row(
            "  p99 ms", [fmt(r["latency"]["p99_ms"], ".1f") for r in dbs], f"target < {TARGETS['p99_ms']:.0f}"
        )
        row("  max ms", [fmt(r["latency"]["max_ms"], ".1f") for r in dbs])
        row(
            "  delivered/s meanwhile (< offered: saturated)",
            [fmt(r["latency"]["delivered_per_s"]) for r in dbs],
        )
        if all("latency_low" in r for r in dbs):
            low = dbs[0]["latency_low"]
            row(
                f"latency at {low['rate']:.0f} ev/s ({low['events']:,} events) p50 ms",
                [fmt(r["latency_low"]["p50_ms"], ".1f") for r in dbs],
            )
            row("  p99 ms", [fmt(r["latency_low"]["p99_ms"], ".1f") for r in dbs])
        row("RSS MB after N/10 run", [fmt(r["small"]["rss_mb_after"], ".1f") for r in dbs])
        row("RSS MB after N run", [fmt(r["large"]["rss_mb_after"], ".1f") for r in dbs])
        row("peak RSS MB (VmHWM, whole life)", [fmt(r["peak_rss_mb"], ".1f") for r in dbs], "target < 150")
        row(
            "token requests (N run) / daemon exit code",
            [f"{r['large']['token_requests']} / {r['exit_code']}" for r in dbs],
        )
    for s in results.get("scale", []):
        rounds = s["rounds"]
        lines += [
            "",
            f"scale ({s['database']}): {s['users']:,} credentials, {s['mappings']} mappings "
            f"(configured in {s['configure_seconds']} s), against 1 user and 4 mappings, "
            f"{len(rounds)} rounds side by side",
            "  daemon CPU s per 1,000 events, each round (scale / 1-and-4):  "
            + ",  ".join(
                f"{p['scale']['cpu_s_per_1000']:.3f} / {p['base']['cpu_s_per_1000']:.3f}" for p in rounds
            ),
            f"  median CPU s per 1,000 events    {s['scale_cpu_s_per_1000_median']:>8.3f}"
            f"   (1 user, 4 mappings: {s['base_cpu_s_per_1000_median']:.3f})",
            f"  median of the rounds' ratios     {s['cpu_ratio_median']:>8.3f}   target about 1",
            f"  median events/s, N events        {fmt(s['scale_events_per_s_median']):>8}"
            f"   (1 user, 4 mappings: {fmt(s['base_events_per_s_median'])})",
            f"  peak RSS MB                      {fmt(s['peak_rss_mb'], '.1f'):>8}",
        ]
    for error in results.get("errors", []):
        lines += ["", f"FAILED: {error}"]
    return "\n".join(lines)


def summarise_profile(path: Path, cpu_ms_per_event: float, top: int = 20) -> str:
    """Where the daemon's CPU went, per stage and function (bench/profile_report.py)."""
    from profile_report import summarise

    return summarise(path, top, cpu_ms_per_event)


def code_version() -> dict[str, Any]:
    """Which code was measured: the commit and the files changed since (read-only git)."""

    def git(*argv: str) -> str:
        try:
            return subprocess.run(
                ["git", *argv], cwd=BENCH.parent, capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except OSError:
            return ""

    changed = [
        line[3:] for line in git("status", "--porcelain").splitlines() if line[3:].startswith("cti_bridge")
    ]
    return {"commit": git("rev-parse", "--short", "HEAD"), "changed": changed}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": machine(),
        "code": code_version(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {
            "events": args.events,
            "db": args.db,
            "concurrency": args.concurrency,
            "rate": args.rate,
            "low_rate": args.low_rate,
            "latency_seconds": args.latency_seconds,
            "floor_rounds": args.floor_rounds,
            "ratio_rounds": args.ratio_rounds,
            "window": args.window,
        },
        "bridge": [],
        "scale": [],
        "errors": [],
    }
    max_users = max(1, args.scale_users)
    crm_child = Child(
        "crm",
        sim_argv(
            args.crm_cmd, "sim_crm.py", "--client", f"{CLIENT_ID}:{CLIENT_SECRET}", "--tokens", str(max_users)
        ),
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            crm = Crm(http, crm_child)
            print(f"floor: {args.events:,} requests ...", file=sys.stderr, flush=True)
            results["floor"] = await floor(
                crm, max(args.events, 5000), args.concurrency, args.floor_rounds, args.reference_requests
            )
            dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
            for db in dbs:
                print(f"bridge on {db} ...", file=sys.stderr, flush=True)
                try:
                    results["bridge"].append(await bridge(http, crm, db, args))
                except Exception as exc:  # one failed part must not hide the others' numbers
                    results["errors"].append(f"bridge on {db}: {type(exc).__name__}: {exc}")
            if args.scale_users > 1:
                for db in args.scale_db or (["sqlite"] if "sqlite" in dbs else dbs[:1]):
                    print(f"scale on {db} ...", file=sys.stderr, flush=True)
                    try:
                        results["scale"].append(await scale(http, crm, db, args))
                    except Exception as exc:
                        results["errors"].append(f"scale on {db}: {type(exc).__name__}: {exc}")
    finally:
        crm_child.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=None, help="N (default 5000; 1000 with --quick)")
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="small N, short latency run, no scale run")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="floor clients; the daemon's per-host cap"
    )
    parser.add_argument("--rate", type=float, default=200.0, help="offered load of the latency run (ev/s)")
    parser.add_argument("--low-rate", type=float, default=50.0, help="a second latency run (0: none)")
    parser.add_argument("--latency-seconds", type=float, default=None, help="default 5 (2 with --quick)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument(
        "--window",
        type=int,
        default=0,
        help="the pusher stays at most this many events ahead of the CRM (0, the default: unbounded, "
        "as a Xelion server; see sim_xelion.py)",
    )
    parser.add_argument(
        "--crm-cmd",
        default=None,
        help="another CRM simulator: a command line run instead of bench/sim_crm.py (see 'Other simulators')",
    )
    parser.add_argument(
        "--xelion-cmd",
        default=None,
        help="another Xelion simulator: a command line run instead of bench/sim_xelion.py",
    )
    parser.add_argument("--floor-rounds", type=int, default=2)
    parser.add_argument(
        "--ratio-rounds",
        type=int,
        default=3,
        help="rounds of the aiohttp floor and the bridge (N each) back to back, per database (0: none)",
    )
    parser.add_argument("--reference-requests", type=int, default=2000, help="per round, httpx clients")
    parser.add_argument("--scale-users", type=int, default=None, help="default 1000 (0: no scale run)")
    parser.add_argument("--scale-mappings", type=int, default=200)
    parser.add_argument("--scale-rounds", type=int, default=5, help="side-by-side rounds of the scale run")
    parser.add_argument("--scale-db", action="append", choices=["sqlite", "postgresql"])
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--profile", type=Path, default=None, help="record the daemon with py-spy into DIR")
    parser.add_argument(
        "--profile-mode",
        choices=sorted(Profiler.MODES),
        default="cpu",
        help="cpu: running threads; gil: the thread holding the GIL; wall: every thread, idle too",
    )
    parser.add_argument(
        "--no-replay",
        dest="replay",
        action="store_false",
        help="skip the replay run (the N run's deliveries sent again through the claims)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the databases and daemon logs")
    parser.add_argument("--json", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args()
    if args.events is None:
        args.events = 1000 if args.quick else 5000
    if args.latency_seconds is None:
        args.latency_seconds = 2.0 if args.quick else 5.0
    if args.scale_users is None:
        args.scale_users = 0 if args.quick else 1000
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    results = asyncio.run(run(args))
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    print(report(results))
    print(f"\n(whole benchmark: {results['wall_seconds']} s)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.json}")
    if args.profile is not None:
        for r in results["bridge"] + results["scale"]:
            if "profile" in r:
                what = "scale " if "users" in r else ""
                print(f"\nprofile of the daemon, {what}{r['database']}, N run ({r['profile']}):")
                print(summarise_profile(Path(r["profile"]), r["large"]["cpu_s_per_1000"]))


if __name__ == "__main__":
    main()
