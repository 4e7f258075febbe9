"""The admin port under a client that means harm, with the daemon's own server (admin/http.py):
connections that never send a request, or drip one, are closed; a request head that never ends is
refused, not buffered; the login limiter keys on the socket's peer, not on X-Forwarded-For. Before
(a security review's findings): such connections stayed open until the process ran out of file
descriptors (and its CRM connections failed with it), five endless headers took 500 MB, and a
client rotating X-Forwarded-For was never locked out."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from cti_bridge.admin import http as admin_http
from tests.e2e.stack import Stack, running_stack

HEAD_TIMEOUT = 0.5


def _port(st: Stack) -> int:
    return int(st.api.base_url.port or 0)


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Seconds until the server closed the connection (EOF), or fail after ``seconds``."""
    started = time.monotonic()
    while True:
        data = await asyncio.wait_for(reader.read(65536), seconds)
        if not data:
            return time.monotonic() - started


async def test_a_connection_that_sends_no_request_or_drips_one_is_closed(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_http, "REQUEST_HEAD_TIMEOUT", HEAD_TIMEOUT)
    async with running_stack(db_url) as st:
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", _port(st))
        dripping_r, dripping_w = await asyncio.open_connection("127.0.0.1", _port(st))
        dripping_w.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")

        async def drip() -> None:
            for n in range(40):
                dripping_w.write(b"X-Slow-%d: 1\r\n" % n)
                await asyncio.sleep(0.1)

        dripper = asyncio.create_task(drip())
        try:
            assert await _closed_within(silent_r, 5 * HEAD_TIMEOUT) < 4 * HEAD_TIMEOUT
            assert await _closed_within(dripping_r, 5 * HEAD_TIMEOUT) < 4 * HEAD_TIMEOUT
        finally:
            dripper.cancel()
            silent_w.close()
            dripping_w.close()
        # A request that comes in time, and the next one on the same connection, are answered.
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(st))
        for _ in range(2):
            writer.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
            status = await asyncio.wait_for(reader.readline(), 5)
            assert status.startswith(b"HTTP/1.1 200"), status
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
        writer.close()


async def test_a_request_head_that_never_ends_is_refused_not_buffered(db_url: str) -> None:
    async with running_stack(db_url) as st:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(st))
        writer.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        answer = b""
        try:
            for _ in range(64):  # up to 4 MiB, 64 KiB at a time
                writer.write(b"a" * 65536)
                await writer.drain()
                sent += 65536
                try:
                    answer = await asyncio.wait_for(reader.read(200), 0.05)
                except TimeoutError:
                    continue
                break
        except ConnectionError:
            pass  # closed while we wrote: refused all the same
        finally:
            writer.close()
        assert sent <= 1024 * 1024, sent  # refused long before the 4 MiB were taken
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer


async def _status_of(port: int, head: bytes) -> bytes:
    """The status line the admin port answers ``head`` (sent in one write) with."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


async def test_a_request_head_over_64_kib_that_arrives_whole_is_refused_too(db_url: str) -> None:
    """h11 holds its bound only while a head is incomplete: one that arrived in one read (or was
    completed by the next) was answered at up to 128 KiB (an operator walkthrough measured it
    against the README's 64 KiB). Within the bound it is answered, in every size of write."""
    async with running_stack(db_url) as st:
        port = _port(st)
        start = b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: "
        for size in (70_000, 127_000):
            status = await _status_of(port, start + b"a" * size + b"\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 400"), (size, status)
        fits = admin_http.MAX_REQUEST_HEAD - len(start) - 4 - 100
        assert (await _status_of(port, start + b"a" * fits + b"\r\n\r\n")).startswith(b"HTTP/1.1 200")


async def test_x_forwarded_for_does_not_choose_the_login_limiters_address(db_url: str) -> None:
    async with running_stack(db_url) as st:
        await st.configure(users=("anne",), mappings=[st.mapping("callHungUpEvent")])
        bad = {
            "adminUsername": "admin",
            "adminPassword": "a-guess",
            "host": f"127.0.0.1:{st.xelion.port}",
            "tenant": "master",
        }
        statuses = []
        for n in range(8):
            r = await st.api.post(
                "/api/session/login", json=bad, headers={"X-Forwarded-For": f"203.0.113.{n}"}
            )
            statuses.append(r.status_code)
        assert statuses[:5] == [401] * 5 and statuses[5:] == [429] * 3, statuses  # the default limit: 5


async def test_a_request_target_in_absolute_form_reaches_its_route(db_url: str) -> None:
    """A client behind a forward proxy may send ``GET http://host:port/path``; HTTP/1.1 servers
    must accept that form (RFC 9112 §3.2.2). The h11 server hands the target on as it is, and the
    route was not found (404 "no resource at /http://...")."""
    async with running_stack(db_url) as st:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(st))
        writer.write(b"GET http://127.0.0.1:%d/api/health HTTP/1.1\r\nHost: x\r\n\r\n" % _port(st))
        status = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert status.startswith(b"HTTP/1.1 200"), status


async def test_a_body_that_never_ends_is_cut_off_and_holds_no_login_attempt(
    db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A login whose head came in time and whose body never finished counted as an attempt in
    flight for ever: six such connections locked every correct login of the address out (429),
    and the connections stayed open (a review's finding). The body is read before the attempt
    counts, and must arrive within REQUEST_BODY_TIMEOUT."""
    monkeypatch.setattr(admin_http, "REQUEST_HEAD_TIMEOUT", HEAD_TIMEOUT)
    monkeypatch.setattr(admin_http, "REQUEST_BODY_TIMEOUT", 2 * HEAD_TIMEOUT)
    async with running_stack(db_url) as st:
        await st.configure(users=("anne",), mappings=[st.mapping("callHungUpEvent")])
        stalled = []
        for _ in range(6):  # more than the limit of attempts (5)
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(st))
            writer.write(
                b"POST /api/session/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 500\r\n\r\n{"adminUsername": "adm'
            )
            stalled.append((reader, writer))
        await asyncio.sleep(0.2)
        login = {
            "adminUsername": "admin",
            "adminPassword": "admin-password",
            "host": f"127.0.0.1:{st.xelion.port}",
            "tenant": "master",
        }
        r = await st.api.post("/api/session/login", json=login)
        assert r.status_code == 200, r.text  # the stalled bodies hold no attempt
        for reader, writer in stalled:
            assert await _closed_within(reader, 10 * HEAD_TIMEOUT) < 8 * HEAD_TIMEOUT
            writer.close()
    # A client that left is no error of ours: no "unhandled error" with a traceback per request.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
