"""The delivery worker's CRM client (delivery/http1.py behind the outbound guard) keeps every promise of the
httpx path (reliability.md §8, §15), against the CRM simulator on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import httpx
import pytest

from cti_bridge.config import Settings
from cti_bridge.delivery.crm_client import CrmClient
from cti_bridge.delivery.egress import EgressRefused, build_http_client
from cti_bridge.delivery.retry import Outcome, classify
from cti_bridge.sim.crm import CrmSimulator, Failure

JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def sim() -> AsyncIterator[CrmSimulator]:
    async with CrmSimulator(auth_required=False) as s:
        yield s


def client(**overrides: object) -> CrmClient:
    return CrmClient(Settings(**overrides))  # type: ignore[arg-type]


async def test_a_request_and_its_answer(sim: CrmSimulator) -> None:
    crm = client(allow_private_targets=True)
    try:
        answer = await crm.send("POST", f"{sim.url}/calls", {**JSON, "X-A": "1"}, b'{"a":1}', max_bytes=4096)
    finally:
        await crm.aclose()
    assert (answer.status, answer.body, answer.truncated) == (201, b'{"ok":true}', False)
    assert answer.retry_after is None
    [got] = sim.received
    assert (got.method, got.path, got.body, got.headers["X-A"]) == ("POST", "/calls", b'{"a":1}', "1")
    assert got.headers["User-Agent"].startswith("cti-bridge/")


async def test_ip_literal_refused_before_connecting(sim: CrmSimulator) -> None:
    crm = client(allow_private_targets=False)
    try:
        with pytest.raises(EgressRefused):
            await crm.send("POST", f"http://127.0.0.1:{sim.port}/x", JSON, b"{}", max_bytes=4096)
    finally:
        await crm.aclose()
    assert sim.received == []


async def test_hostname_resolving_to_loopback_refused_at_connect(sim: CrmSimulator) -> None:
    crm = client(allow_private_targets=False)
    try:
        with pytest.raises(EgressRefused) as info:
            await crm.send("POST", f"http://localhost:{sim.port}/x", JSON, b"{}", max_bytes=4096)
    finally:
        await crm.aclose()
    assert "localhost" in str(info.value)
    assert classify(None, info.value) is Outcome.PERMANENT
    assert sim.received == []


async def test_hostname_resolving_to_loopback_passes_when_allowed(sim: CrmSimulator) -> None:
    crm = client(allow_private_targets=True)
    try:
        answer = await crm.send("POST", f"http://localhost:{sim.port}/x", JSON, b"{}", max_bytes=4096)
    finally:
        await crm.aclose()
    assert answer.status == 201


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "file:///etc/passwd", "//no-scheme/x"])
async def test_only_http_and_https(url: str) -> None:
    crm = client(allow_private_targets=True)
    try:
        with pytest.raises(EgressRefused):
            await crm.send("GET", url, {}, None, max_bytes=10)
    finally:
        await crm.aclose()


async def test_redirect_is_an_answer_not_followed(sim: CrmSimulator) -> None:
    sim.add_rule("/moved", Failure(status=302, headers={"Location": f"{sim.url}/elsewhere"}, body=b""))
    crm = client(allow_private_targets=True)
    try:
        answer = await crm.send("POST", f"{sim.url}/moved", JSON, b"{}", max_bytes=4096)
    finally:
        await crm.aclose()
    assert answer.status == 302
    assert [r.path for r in sim.received] == ["/moved"]


async def test_percent_encoding_reaches_the_crm_unchanged(sim: CrmSimulator) -> None:
    crm = client(allow_private_targets=True)
    try:
        await crm.send("GET", f"{sim.url}/find?phone=%2B31612345678&q=a%2Fb", {}, None, max_bytes=4096)
    finally:
        await crm.aclose()
    assert sim.received[0].query == "phone=%2B31612345678&q=a%2Fb"


async def test_body_read_is_capped_and_the_pool_still_works(sim: CrmSimulator) -> None:
    sim.script(Failure(status=200, body=b"x" * 200_000))
    crm = client(allow_private_targets=True)
    try:
        big = await crm.send("GET", f"{sim.url}/big", {}, None, max_bytes=4096)
        small = await crm.send("GET", f"{sim.url}/small", {}, None, max_bytes=4096)
    finally:
        await crm.aclose()
    assert (len(big.body), big.truncated, big.status) == (4096, True, 200)
    assert (small.body, small.truncated) == (b'{"ok":true}', False)


async def test_retry_after_is_returned(sim: CrmSimulator) -> None:
    sim.script(Failure.retry_after(7))
    crm = client(allow_private_targets=True)
    try:
        answer = await crm.send("POST", f"{sim.url}/x", JSON, b"{}", max_bytes=4096)
    finally:
        await crm.aclose()
    assert (answer.status, answer.retry_after) == (429, "7")


async def test_whole_request_timeout(sim: CrmSimulator) -> None:
    sim.script(Failure.slow(3.0))
    crm = client(allow_private_targets=True, request_timeout=0.3, connect_timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(httpx.TimeoutException) as info:
            await crm.send("POST", f"{sim.url}/slow", JSON, b"{}", max_bytes=4096)
    finally:
        await crm.aclose()
    assert loop.time() - started < 2.0
    assert classify(None, info.value) is Outcome.RETRY


async def test_connection_refused_is_a_retryable_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    crm = client(allow_private_targets=True)
    try:
        with pytest.raises(httpx.ConnectError) as info:
            await crm.send("GET", f"http://127.0.0.1:{port}/x", {}, None, max_bytes=10)
    finally:
        await crm.aclose()
    assert classify(None, info.value) is Outcome.RETRY


async def test_dropped_connection_is_named_for_what_it_is_and_retryable(sim: CrmSimulator) -> None:
    sim.script(Failure.dropped())
    crm = client(allow_private_targets=True)
    try:
        with pytest.raises(httpx.TransportError) as info:
            await crm.send("POST", f"{sim.url}/x", JSON, b"{}", max_bytes=4096)
        assert (await crm.send("POST", f"{sim.url}/x", JSON, b"{}", max_bytes=4096)).status == 201
    finally:
        await crm.aclose()
    # Not a "ConnectTimeout" (httpx-aiohttp's name for it): the server closed the connection.
    assert type(info.value) is httpx.RemoteProtocolError
    assert classify(None, info.value) is Outcome.RETRY
    assert [r.status for r in sim.received] == [0, 201]


async def test_cancellation_propagates(sim: CrmSimulator) -> None:
    sim.script(Failure.slow(3.0))
    crm = client(allow_private_targets=True)
    try:
        task = asyncio.create_task(crm.send("POST", f"{sim.url}/slow", JSON, b"{}", max_bytes=4096))
        while not sim.received:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await crm.aclose()


async def test_no_cookie_travels_to_the_next_request(sim: CrmSimulator) -> None:
    sim.script(Failure(status=200, headers={"Set-Cookie": "session=user-a; Path=/"}, body=b"{}"))
    crm = client(allow_private_targets=True)
    url = f"http://localhost:{sim.port}/x"  # a host name: cookie jars ignore the cookies of IP hosts
    try:
        await crm.send("POST", url, JSON, b"{}", max_bytes=4096)
        await crm.send("POST", url, JSON, b"{}", max_bytes=4096)
    finally:
        await crm.aclose()
    assert "Cookie" not in sim.received[1].headers


async def test_token_client_shares_the_session(sim: CrmSimulator) -> None:
    crm = client(allow_private_targets=True)
    http = build_http_client(Settings(allow_private_targets=True), crm.session)
    try:
        response = await http.post(f"{sim.url}/token-side", json={"a": 1})
        assert response.status_code == 201
        assert crm.session() is http._transport.client  # type: ignore[attr-defined]
    finally:
        await http.aclose()
        await crm.aclose()


async def test_a_status_that_arrived_decides_even_if_the_body_breaks_off() -> None:
    """retry.py: once the status line arrived the CRM has processed the request, so a body cut off
    afterwards must not turn a 201 into a retry (which would send the request again)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)  # the b"{}" body
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\n" + b'{"id":')
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    crm = client(allow_private_targets=True)
    try:
        got = await crm.send("POST", f"http://127.0.0.1:{port}/x", JSON, b"{}", max_bytes=4096)
    finally:
        await crm.aclose()
        server.close()
        await server.wait_closed()
    assert got.status == 201
    assert isinstance(got.body_error, httpx.TransportError)
    assert classify(got.status, None) is Outcome.SUCCESS


async def test_the_token_client_names_the_bridge_too(sim: CrmSimulator) -> None:
    crm = client(allow_private_targets=True)
    http = build_http_client(Settings(allow_private_targets=True), crm.session)
    try:
        await http.post(f"{sim.url}/token-side", json={})
    finally:
        await http.aclose()
        await crm.aclose()
    assert sim.received[0].headers["User-Agent"].startswith("cti-bridge/")
