"""What a CRM's answer, or its failure, becomes in a delivery: ``DeliveryWorker._send`` with the real
CRM client (``crm_client.CrmClient``) against a small HTTP/1.1 server on 127.0.0.1.

The server is raw asyncio, so a test can do what the CRM simulator cannot: trickle a body, cut it off
after the status line, compress it. Assertions are on the delivery's result (status, state, outcome,
``last_error``, excerpt), so they hold whichever client carries the request.

A status line that arrived decides even when reading the body failed afterwards (retry.py: a status
wins over an error): the CRM has the request, and resending a 201 would duplicate it.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import pytest

from cti_bridge.config import Settings
from cti_bridge.delivery.crm_client import CrmClient
from cti_bridge.delivery.oauth import AccessToken, TokenManager
from cti_bridge.delivery.worker import DeliveryWorker, _Result
from cti_bridge.metrics import Metrics
from cti_bridge.render import MappingSpec, compile_mapping
from cti_bridge.routing import MappingCache
from cti_bridge.store.db import Database
from cti_bridge.store.deliveries import Claimed
from tests.unit.raw_http import serving

TOKEN = "access-token-0123456789"
KIND = "callConnectedEvent"


@dataclass
class Seen:
    """One request as the server read it (header names lower-cased)."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int


#: Answers one request; returns whether the connection stays open for the next one.
Handler = Callable[[Seen, asyncio.StreamWriter], Awaitable[bool]]


def answer(status: int, body: bytes = b'{"ok":true}', headers: dict[str, str] | None = None) -> Handler:
    async def handler(_seen: Seen, writer: asyncio.StreamWriter) -> bool:
        lines = [f"HTTP/1.1 {status} Status", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        return True

    return handler


def trickle(status: int, length: int = 1000, every: float = 0.05) -> Handler:
    """The status line and headers at once, then the body one byte per ``every`` seconds."""

    async def handler(_seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(f"HTTP/1.1 {status} Status\r\nContent-Length: {length}\r\n\r\n".encode())
        for _ in range(length):
            await writer.drain()
            writer.write(b"x")
            await asyncio.sleep(every)
        return False

    return handler


def cut_off(status: int) -> Handler:
    """The status line, a Content-Length of 100, three bytes of body, then the connection closes."""

    async def handler(_seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(f"HTTP/1.1 {status} Status\r\nContent-Length: 100\r\n\r\nabc".encode())
        await writer.drain()
        return False

    return handler


def chunked(size: int) -> Handler:
    """A 200 with a ``size``-byte body in chunked transfer encoding (no Content-Length)."""

    async def handler(_seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        left = size
        while left:
            n = min(left, 8192)
            writer.write(b"%x\r\n" % n + b"y" * n + b"\r\n")
            await writer.drain()
            left -= n
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    return handler


def gzipped_if_asked(status: int, text: bytes) -> Handler:
    """Compresses the body when the request accepts gzip, as many HTTP servers do."""

    async def handler(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if "gzip" in seen.headers.get("accept-encoding", ""):
            return await answer(status, gzip.compress(text), {"Content-Encoding": "gzip"})(seen, writer)
        return await answer(status, text)(seen, writer)

    return handler


async def close_at_once(_seen: Seen, _writer: asyncio.StreamWriter) -> bool:
    return False


@dataclass
class Server:
    routes: dict[str, Handler] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _connections: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        connection = next(self._connections)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, target, _version = request_line.split(" ", 2)
                headers = {}
                for line in header_lines:
                    if line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                seen = Seen(method, target, headers, body, connection)
                self.seen.append(seen)
                handler = self.routes.get(urlsplit(target).path, answer(201))
                if not await handler(seen, writer):
                    return
        except ConnectionError:
            return  # the client gave up (a timeout, a cancelled request)
        finally:
            writer.close()
            self._tasks.discard(task)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with serving(Server()) as srv:
        yield srv


def settings(**overrides: object) -> Settings:
    defaults = {"allow_private_targets": True, "request_timeout": 0.5, "connect_timeout": 0.5}
    return Settings(**{**defaults, **overrides})  # type: ignore[arg-type]


def claimed() -> Claimed:
    return Claimed(
        id="delivery-1",
        claim="claim-1",
        attempts=0,
        event_id=1,
        notification_type=KIND,
        payload={"callId": "c-1"},
        mapping_id=1,
        credential_id=1,
        xelion_username="anne",
        xelion_oid=None,
        user_role="user",
        authorization_header_prefix="Bearer ",
        ordering_key="c-1/anne",
    )


@pytest.fixture
async def crm() -> AsyncIterator[list[CrmClient]]:
    """The clients a test made, closed at the end."""
    made: list[CrmClient] = []
    yield made
    for client in made:
        await client.aclose()


def make_worker(crm: list[CrmClient], s: Settings) -> DeliveryWorker:
    client = CrmClient(s)
    crm.append(client)
    return DeliveryWorker(
        db=cast(Database, None),  # _send needs neither the database nor the token manager
        mappings=MappingCache(),
        tokens=cast(TokenManager[int], None),
        crm=client,
        settings=s,
    )


async def attempt(worker: DeliveryWorker, url: str) -> _Result:
    """One attempt of a POST of ``{"callId": ...}`` to ``url``, as the worker makes it."""
    compiled = compile_mapping(
        MappingSpec(xelion_event=KIND, crm_resource_uri=url, crm_resource_payload={"callId": "${callId}"})
    )
    token = AccessToken(access_token=TOKEN, expires_at=None, extra={}, version=1)
    return await worker._send(claimed(), compiled, token)


async def send(crm: list[CrmClient], url: str, s: Settings | None = None) -> _Result:
    """One delivery attempt through a worker with a real CRM client."""
    worker = make_worker(crm, s or settings())
    result = await attempt(worker, url)
    host = urlsplit(url).netloc
    assert worker.limiter.in_use(host) == 0  # the per-host slot is always given back
    return result


# -- what reaches the CRM ------------------------------------------------------------------------


async def test_a_delivered_request_carries_the_token_and_the_idempotency_key(
    server: Server, crm: list[CrmClient]
) -> None:
    result = await send(crm, server.url("/calls"))
    assert (result.state, result.status, result.error) == ("delivered", 201, None)
    [seen] = server.seen
    assert (seen.method, seen.target, seen.body) == ("POST", "/calls", b'{"callId":"c-1"}')
    assert seen.headers["authorization"] == "Bearer " + TOKEN
    assert seen.headers["idempotency-key"] == "delivery-1"
    assert seen.headers["content-type"] == "application/json"


# -- answers -------------------------------------------------------------------------------------


async def test_a_redirect_is_a_permanent_answer_not_followed(server: Server, crm: list[CrmClient]) -> None:
    server.routes["/moved"] = answer(301, b"moved", {"Location": server.url("/elsewhere")})
    result = await send(crm, server.url("/moved"))
    assert (result.state, result.status, result.error) == ("dead", 301, "HTTP 301")
    assert [s.target for s in server.seen] == ["/moved"]


async def test_retry_after_sets_the_delay(server: Server, crm: list[CrmClient]) -> None:
    server.routes["/busy"] = answer(503, b"{}", {"Retry-After": "42"})
    result = await send(crm, server.url("/busy"))
    assert (result.state, result.outcome, result.status, result.delay) == ("pending", "retry", 503, 42.0)


async def test_a_long_body_is_cut_at_max_response_bytes_and_its_connection_not_reused(
    server: Server, crm: list[CrmClient]
) -> None:
    server.routes["/big"] = chunked(200_000)  # no Content-Length: the cap applies while reading
    s = settings(max_response_bytes=1024)
    client = CrmClient(s)
    crm.append(client)
    big = await client.send("GET", server.url("/big"), {}, None, max_bytes=1024)
    small = await client.send("GET", server.url("/small"), {}, None, max_bytes=1024)
    assert (big.status, len(big.body), big.truncated) == (200, 1024, True)
    assert (small.status, small.truncated) == (201, False)
    # The unread rest of the long body stays behind on its connection: the next request gets a new one.
    assert [s.connection for s in server.seen] == [1, 2]
    result = await send(crm, server.url("/big"), s)
    assert (result.state, result.status, len(result.response_body or b"")) == ("delivered", 200, 1024)


async def test_a_short_body_keeps_its_connection(server: Server, crm: list[CrmClient]) -> None:
    client = CrmClient(settings())
    crm.append(client)
    for _ in range(3):
        assert (await client.send("POST", server.url("/x"), {}, b"{}", max_bytes=4096)).status == 201
    assert [s.connection for s in server.seen] == [1, 1, 1]


async def test_an_error_body_is_stored_readable_not_compressed(server: Server, crm: list[CrmClient]) -> None:
    server.routes["/bad"] = gzipped_if_asked(400, b'{"error":"unknown field callId"}')
    result = await send(crm, server.url("/bad"))
    assert (result.state, result.status) == ("dead", 400)
    assert result.response_body == b'{"error":"unknown field callId"}'
    # The session does not decompress, so it asks for no compression (egress.guarded_session).
    assert server.seen[0].headers["accept-encoding"] == "identity"


# -- failures: what last_error says, and whether it is retried -------------------------------------


async def test_connection_refused_is_retried_as_a_connect_error(crm: list[CrmClient]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = await send(crm, f"http://127.0.0.1:{port}/calls")
    assert (result.state, result.outcome, result.status) == ("pending", "retry", None)
    assert (result.error or "").startswith("ConnectError: ")


async def test_a_connection_closed_without_an_answer_is_retried_as_a_protocol_error(
    server: Server, crm: list[CrmClient]
) -> None:
    server.routes["/drop"] = close_at_once
    result = await send(crm, server.url("/drop"))
    assert (result.state, result.outcome, result.status) == ("pending", "retry", None)
    # Not "ConnectTimeout: Server disconnected" (httpx-aiohttp's name for it).
    assert (result.error or "").startswith("RemoteProtocolError: ")


async def test_no_answer_within_the_request_timeout_is_retried(server: Server, crm: list[CrmClient]) -> None:
    async def silent(_seen: Seen, _writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(10)
        return False

    server.routes["/silent"] = silent
    started = time.monotonic()
    result = await send(crm, server.url("/silent"))
    assert time.monotonic() - started < 2.0
    assert (result.state, result.outcome, result.status) == ("pending", "retry", None)
    assert "Timeout" in (result.error or "").split(":", 1)[0]


async def test_a_trickled_body_is_cut_off_by_the_whole_request_timeout(
    server: Server, crm: list[CrmClient]
) -> None:
    # reliability.md §8: the timeout bounds the whole request, body included, so a CRM trickling
    # its body frees the slot (1,000 bytes at 20 a second would take 50 s).
    server.routes["/trickle"] = trickle(503)
    started = time.monotonic()
    result = await send(crm, server.url("/trickle"))
    assert time.monotonic() - started < 2.0
    assert (result.state, result.outcome) == ("pending", "retry")


async def test_the_outbound_guard_refuses_a_host_resolving_to_loopback(
    server: Server, crm: list[CrmClient]
) -> None:
    result = await send(crm, f"http://localhost:{server.port}/calls", settings(allow_private_targets=False))
    assert (result.state, result.outcome, result.status) == ("dead", "dead", None)
    assert (result.error or "").startswith("refused by the outbound guard: refused host localhost")
    assert server.seen == []


async def test_the_outbound_guard_refuses_a_loopback_literal(server: Server, crm: list[CrmClient]) -> None:
    result = await send(crm, server.url("/calls"), settings(allow_private_targets=False))
    assert (result.state, result.status) == ("dead", None)
    assert (result.error or "").startswith("refused by the outbound guard: refused host 127.0.0.1")
    assert server.seen == []


async def test_cancelling_a_send_propagates_and_gives_the_slot_back(
    server: Server, crm: list[CrmClient]
) -> None:
    server.routes["/trickle"] = trickle(201)
    worker = make_worker(crm, settings(request_timeout=30.0))
    url = server.url("/trickle")
    task = asyncio.create_task(attempt(worker, url))
    while not server.seen:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # reading the body by now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert worker.limiter.in_use(urlsplit(url).netloc) == 0


# -- a status wins over an error (retry.py) -------------------------------------------------------


async def test_a_201_whose_body_then_times_out_is_delivered(server: Server, crm: list[CrmClient]) -> None:
    # The CRM has processed the request: sending it again would duplicate it.
    server.routes["/trickle"] = trickle(201)
    result = await send(crm, server.url("/trickle"))
    assert (result.state, result.status) == ("delivered", 201)


async def test_a_201_whose_body_is_cut_off_is_delivered(server: Server, crm: list[CrmClient]) -> None:
    server.routes["/cut"] = cut_off(201)
    result = await send(crm, server.url("/cut"))
    assert (result.state, result.status) == ("delivered", 201)


async def test_a_400_whose_body_is_cut_off_is_permanent(server: Server, crm: list[CrmClient]) -> None:
    server.routes["/cut"] = cut_off(400)
    result = await send(crm, server.url("/cut"))
    assert (result.state, result.status, result.error) == ("dead", 400, "HTTP 400")


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/calls", "http://" + "a" * 64 + ".example/calls"])
async def test_a_url_the_transport_cannot_send_is_dead_at_once(crm: list[CrmClient], url: str) -> None:
    """Not an "internal error" retried for hours: the mapping's URL must change. (A non-ASCII or
    white-space character in the URI is refused earlier now, when the mapping is saved or rendered:
    test_render.test_uri_text_a_request_line_cannot_carry_is_refused; and by the transport itself:
    test_http1.test_request_targets. Saving refuses a port out of range in a literal base, but one
    stored before still renders, and only the transport refuses it; so does a host label longer
    than DNS allows.)"""
    result = await send(crm, url)
    assert (result.state, result.outcome, result.status) == ("dead", "dead", None)
    assert result.error is not None and "internal error" not in result.error


async def test_a_token_holding_a_line_break_is_dead_and_never_written(
    server: Server, crm: list[CrmClient]
) -> None:
    """A token endpoint's access token goes into a header as it came (the prefix too): with CR/LF
    in it the request would carry a second, smuggled one. Nothing is sent, the delivery is dead,
    and neither the error nor the attempt record quotes the token (§14)."""
    worker = make_worker(crm, settings())
    compiled = compile_mapping(
        MappingSpec(xelion_event=KIND, crm_resource_uri=server.url("/calls"), crm_resource_payload={})
    )
    smuggling = "tok-0123456789\r\nContent-Length: 0\r\n\r\nDELETE /contacts/42 HTTP/1.1"
    token = AccessToken(access_token=smuggling, expires_at=None, extra={}, version=1)
    result = await worker._send(claimed(), compiled, token)
    assert (result.state, result.outcome, result.status) == ("dead", "dead", None)
    assert result.error is not None and "tok-0123456789" not in result.error
    assert server.seen == []


async def test_nothing_is_sent_once_the_lease_would_end_before_the_request(
    server: Server, crm: list[CrmClient]
) -> None:
    """A replica that waited long for a token (another replica hung holding the refresh lock) had
    its lease run out; its claim loop claimed the delivery again, and every claim's task sent it
    when the wait ended: the CRM got one event up to seven times. A task whose lease would end
    before the request could (the request timeout) now sends nothing."""
    worker = make_worker(crm, settings(request_timeout=0.5))
    worker.metrics = metrics = Metrics(cast(Database, None))
    compiled = compile_mapping(
        MappingSpec(xelion_event=KIND, crm_resource_uri=server.url("/calls"), crm_resource_payload={"a": 1})
    )
    token = AccessToken(access_token=TOKEN, expires_at=None, extra={}, version=1)
    now = time.monotonic()
    late = await worker._send(claimed(), compiled, token, lease_end=now + 0.4)
    assert (late.state, late.outcome, late.count_attempt, late.status) == ("pending", "retry", False, None)
    assert late.error is not None and "lease" in late.error
    assert server.seen == []
    sample = metrics.registry.get_sample_value
    assert sample("cti_bridge_delivery_not_sent_total", {"reason": "lease"}) == 1
    assert sample("cti_bridge_delivery_attempts_total", {"status_class": "error"}) is None
    in_time = await worker._send(claimed(), compiled, token, lease_end=now + 60)
    assert (in_time.state, in_time.status) == ("delivered", 201)
    assert len(server.seen) == 1
    assert sample("cti_bridge_delivery_not_sent_total", {"reason": "lease"}) == 1
    assert sample("cti_bridge_delivery_attempts_total", {"status_class": "2xx"}) == 1


def test_the_hosts_of_retired_mappings_are_not_kept_for_ever(crm: list[CrmClient]) -> None:
    """Every PUT of the mappings makes new ids: the worker remembered each one's host for the
    process's life, copied the whole map for every ingest batch and scanned it for every claim."""
    from cti_bridge.delivery.worker import MAX_KNOWN_MAPPINGS

    worker = make_worker(crm, settings())
    for mapping_id in range(1, 3 * MAX_KNOWN_MAPPINGS):
        worker._learn_host(mapping_id, "crm.example.org:443", None)
        assert len(worker._mapping_host) <= MAX_KNOWN_MAPPINGS
    assert worker._host_of(3 * MAX_KNOWN_MAPPINGS - 1) == "crm.example.org:443"  # the newest are known
    assert worker._host_of(1) == "mapping 1"  # the oldest are learnt again when needed
