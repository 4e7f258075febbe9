"""Which HTTP transport for CRM requests: httpx's default (httpcore), httpx-aiohttp, plain aiohttp, or
the daemon's own (``delivery/http1.py`` through ``crm_client.CrmClient``).

Starts the CRM simulator in another process (``python -m cti_bridge.sim.crm --no-auth``), then, for
each client, sends REQUESTS small JSON POSTs with CONCURRENCY in flight over loopback, after a
warm-up, and prints requests/s (best of ROUNDS rounds) and this process's CPU time per request in
that round (user + system): the daemon is CPU-bound, so what a request costs it matters more than
the rate two processes reach together. The daemon sends CRM requests with ``crm_client.CrmClient``
(``http1.Http1Client`` behind the guard) and token refreshes with the httpx-aiohttp client
(``egress.build_http_client``, guard included).

    .venv/bin/python bench/bench_transport.py [--requests 5000] [--concurrency 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import httpx

from cti_bridge.config import Settings
from cti_bridge.delivery.crm_client import CrmClient
from cti_bridge.delivery.egress import build_http_client

PAYLOAD = b'{"callId":"c-1","callerPhoneNumber":"+31612345678","xelionEvent":"newCallEvent"}'
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer benchmark-token"}

Send = Callable[[str], Awaitable[int]]


@dataclass(order=True)
class Round:
    rate: float  # requests/s
    cpu_us: float  # this process's CPU microseconds per request


async def run(send: Send, url: str, requests: int, concurrency: int) -> Round:
    counter = iter(range(requests))

    async def worker() -> None:
        for _ in counter:
            status = await send(url)
            if status != 201:
                raise RuntimeError(f"unexpected status {status}")

    started, cpu = time.perf_counter(), time.process_time()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return Round(requests / (time.perf_counter() - started), (time.process_time() - cpu) / requests * 1e6)


async def bench_httpx(client: httpx.AsyncClient, url: str, args: argparse.Namespace) -> Round:
    async def send(u: str) -> int:
        response = await client.post(u, content=PAYLOAD, headers=HEADERS)
        return response.status_code

    await run(send, url, min(500, args.requests), args.concurrency)  # warm-up: fill the pool
    return max([await run(send, url, args.requests, args.concurrency) for _ in range(args.rounds)])


async def bench_aiohttp(url: str, args: argparse.Namespace) -> Round:
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send(u: str) -> int:
            async with session.post(u, data=PAYLOAD, headers=HEADERS) as response:
                await response.read()
                return response.status

        await run(send, url, min(500, args.requests), args.concurrency)
        return max([await run(send, url, args.requests, args.concurrency) for _ in range(args.rounds)])


async def bench_crm_client(url: str, args: argparse.Namespace) -> Round:
    crm = CrmClient(Settings(allow_private_targets=True))
    try:

        async def send(u: str) -> int:
            return (await crm.send("POST", u, HEADERS, PAYLOAD, max_bytes=4096)).status

        await run(send, url, min(500, args.requests), args.concurrency)
        return max([await run(send, url, args.requests, args.concurrency) for _ in range(args.rounds)])
    finally:
        await crm.aclose()


def show(label: str, best: Round) -> None:
    print(f"  {label:<52} {best.rate:8.0f} requests/s  {best.cpu_us:6.0f} µs CPU per request")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    proc = subprocess.Popen(
        [sys.executable, "-m", "cti_bridge.sim.crm", "--port", "0", "--no-auth"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        base = line.split(" on ", 1)[1].split(" ", 1)[0]
        url = base + "/services/apexrest/Call"
        print(
            f"CRM simulator (separate process) at {base}; {args.requests} POSTs x {args.rounds} rounds, "
            f"{args.concurrency} concurrent, loopback"
        )

        default = httpx.AsyncClient(limits=httpx.Limits(max_connections=100, max_keepalive_connections=100))
        async with default:
            show("httpx default transport (httpcore)", await bench_httpx(default, url, args))

        guarded = build_http_client(Settings(allow_private_targets=True))
        async with guarded:
            show("httpx + httpx-aiohttp (egress.build_http_client)", await bench_httpx(guarded, url, args))

        show("the worker's CrmClient (http1.py behind the guard)", await bench_crm_client(url, args))
        show("plain aiohttp ClientSession", await bench_aiohttp(url, args))
    finally:
        proc.terminate()
        proc.wait(timeout=5)


if __name__ == "__main__":
    asyncio.run(main())
