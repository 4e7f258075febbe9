"""The CRM requests' HTTP/1.1 transport (``delivery/http1.py``) against raw servers on 127.0.0.1.

What the CRM client's and the worker's tests (test_crm_client.py, test_worker_send.py) do not
reach: the pool's own rules (a stale pooled connection, idle expiry, ``Connection: close``), how an
answer may be framed (end of connection, chunks, interim 1xx answers), what the request line and
headers hold, TLS, and the limits on what a CRM may send back.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cti_bridge.delivery import http1
from cti_bridge.delivery.egress import EgressRefused
from cti_bridge.delivery.http1 import MAX_HEADER_BYTES, Http1Client, InvalidRequest, request_target
from cti_bridge.delivery.retry import Outcome, classify
from tests.unit.raw_http import serving


@dataclass
class Request:
    line: str
    headers: list[tuple[str, str]]
    body: bytes
    connection: int

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


#: Answers one request on a connection; returns whether the connection stays open.
Reply = Callable[[Request, asyncio.StreamWriter], Awaitable[bool]]


def raw(*data: bytes, keep: bool = True, linger: float = 0.0) -> Reply:
    """Answer with ``data`` as written; then wait ``linger`` seconds, and keep the connection open
    (``keep``) or close it."""

    async def reply(_req: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"".join(data))
        await writer.drain()
        if linger:
            await asyncio.sleep(linger)
        return keep

    return reply


def ok(body: bytes = b"{}", extra: str = "") -> Reply:
    return raw(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body)


@dataclass
class RawServer:
    """Reads requests (Content-Length bodies) and answers each with the next reply of ``replies``
    (the last one repeats)."""

    replies: list[Reply] = field(default_factory=lambda: [ok()])
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    #: (connection, loop time) of each connection the client closed (its EOF read here).
    eofs: list[tuple[int, float]] = field(default_factory=list)
    port: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def url(self, path: str = "/x", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        number = self.connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial:
                        self.eofs.append((number, asyncio.get_running_loop().time()))
                    return
                except ConnectionError:
                    return
                line, *rest = head.decode("utf-8").split("\r\n")
                headers = [tuple(x.split(": ", 1)) for x in rest if x]
                length = sum(int(v) for n, v in headers if n.lower() == "content-length")
                body = await reader.readexactly(length)
                req = Request(line, headers, body, number)  # type: ignore[arg-type]
                self.requests.append(req)
                reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
                if not await reply(req, writer):
                    return
        except ConnectionError:
            return
        finally:
            writer.close()
            self._tasks.discard(task)


@pytest.fixture
async def server() -> AsyncIterator[RawServer]:
    async with serving(RawServer()) as srv:
        yield srv


@pytest.fixture
async def client() -> AsyncIterator[Http1Client]:
    c = Http1Client(
        allow_private=True,
        connect_timeout=0.5,
        request_timeout=1.0,
        default_headers={"User-Agent": "cti-bridge/test", "Accept-Encoding": "identity"},
    )
    try:
        yield c
    finally:
        await c.aclose()


async def post(client: Http1Client, url: str, body: bytes = b'{"a":1}', **headers: str) -> int:
    answer = await client.request(
        "POST", url, {"Content-Type": "application/json", **headers}, body, max_bytes=4096
    )
    return answer.status


# -- the pool ------------------------------------------------------------------------------------


async def test_requests_reuse_one_connection(server: RawServer, client: Http1Client) -> None:
    for _ in range(3):
        assert await post(client, server.url()) == 200
    assert [r.connection for r in server.requests] == [1, 1, 1]
    assert client.idle_connections() == 1


async def test_a_pooled_connection_dropped_without_an_answer_is_an_error_never_resent(
    server: RawServer, client: Http1Client
) -> None:
    """The CRM may have acted on a request whose connection dropped: the worker's schedule decides
    (an attempt in the log), the transport never sends it again by itself."""

    async def close_unanswered(_req: Request, _writer: asyncio.StreamWriter) -> bool:
        return False  # read the request, answer nothing, close

    server.replies = [ok(), close_unanswered, ok()]
    assert await post(client, server.url()) == 200
    with pytest.raises(httpx.RemoteProtocolError) as info:
        await post(client, server.url())
    assert classify(None, info.value) is Outcome.RETRY
    assert [r.connection for r in server.requests] == [1, 1]
    assert await post(client, server.url()) == 200
    assert [r.connection for r in server.requests] == [1, 1, 2]


async def test_a_connection_the_server_closed_while_idle_leaves_the_pool(
    server: RawServer, client: Http1Client
) -> None:
    async def answer_then_close(req: Request, writer: asyncio.StreamWriter) -> bool:
        await ok(extra="")(req, writer)
        return False  # an idle timeout of the server's: the connection closes after the answer

    server.replies = [answer_then_close, ok()]
    assert await post(client, server.url()) == 200
    for _ in range(100):
        if client.idle_connections() == 0:
            break
        await asyncio.sleep(0.01)
    assert client.idle_connections() == 0
    assert await post(client, server.url()) == 200
    assert [r.connection for r in server.requests] == [1, 2]


async def test_a_fresh_connection_closed_unanswered_is_an_error_not_retried(
    server: RawServer, client: Http1Client
) -> None:
    async def close_unanswered(_req: Request, _writer: asyncio.StreamWriter) -> bool:
        return False

    server.replies = [close_unanswered, ok()]
    with pytest.raises(httpx.RemoteProtocolError) as info:
        await post(client, server.url())
    assert classify(None, info.value) is Outcome.RETRY
    assert len(server.requests) == 1


async def test_a_pooled_connection_that_broke_off_mid_answer_is_not_retried(
    server: RawServer, client: Http1Client
) -> None:
    half_a_status_line = raw(b"HTTP/1.1 2", keep=False)

    server.replies = [ok(), half_a_status_line, ok()]
    assert await post(client, server.url()) == 200
    with pytest.raises(httpx.RemoteProtocolError):
        await post(client, server.url())
    assert len(server.requests) == 2  # the CRM may have acted on it: the worker's schedule decides


async def test_connection_close_from_the_server_is_honoured(server: RawServer, client: Http1Client) -> None:
    server.replies = [ok(extra="Connection: close\r\n")]
    assert await post(client, server.url()) == 200
    assert await post(client, server.url()) == 200
    assert [r.connection for r in server.requests] == [1, 2]


async def test_an_idle_connection_older_than_the_keepalive_is_not_reused(server: RawServer) -> None:
    c = Http1Client(
        allow_private=True, connect_timeout=0.5, request_timeout=1.0, default_headers={}, keepalive=0.05
    )
    try:
        assert await post(c, server.url()) == 200
        await asyncio.sleep(0.1)
        assert await post(c, server.url()) == 200
    finally:
        await c.aclose()
    assert [r.connection for r in server.requests] == [1, 2]


async def _until(done: Callable[[], bool], within: float) -> None:
    """Wait until ``done()`` holds, ``within`` seconds at most (then the caller's asserts fail)."""
    for _ in range(int(within / 0.01)):
        if done():
            return
        await asyncio.sleep(0.01)


async def test_an_idle_connection_is_closed_by_the_client_after_the_keepalive(server: RawServer) -> None:
    """Idle connections are closed on their own once idle for the keep-alive, and their origins
    leave the pool: before, one was only closed when its origin was used again, so every origin
    used once (a mapping's old CRM host, a per-user instance URL) and every connection of a burst
    kept a socket and a pool key for as long as the server kept the connection open. A request
    timeout far longer than the keep-alive: the close is the idle time's, not a deadline's. Fails on
    the old code."""

    async def slow(req: Request, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)  # the burst's requests overlap: a connection each
        return await ok()(req, writer)

    server.replies = [slow]
    loop = asyncio.get_running_loop()
    async with serving(RawServer()) as other:
        c = Http1Client(
            allow_private=True, connect_timeout=0.5, request_timeout=30.0, default_headers={}, keepalive=0.2
        )
        try:
            started = loop.time()
            burst = [post(c, server.url()) for _ in range(3)]
            assert await asyncio.gather(*burst, post(c, other.url())) == [200] * 4
            assert c.idle_connections() == 4
            await _until(lambda: len(server.eofs) == 3 and len(other.eofs) == 1, within=3.0)
            assert sorted(n for n, _ in server.eofs) == [1, 2, 3]
            assert [n for n, _ in other.eofs] == [1]
            assert min(t for _, t in server.eofs + other.eofs) - started >= 0.2  # not before
            assert c.idle_connections() == 0
            assert c._idle == {}  # no key left for either origin
            assert not c._all
            assert await post(c, server.url()) == 200  # the origin is still served: a new connection
            assert server.requests[-1].connection == 4
        finally:
            await c.aclose()


async def test_a_connection_in_use_or_used_again_within_the_keepalive_is_not_closed(
    server: RawServer,
) -> None:
    """The idle close counts from the end of the last answer: an answer slower than the keep-alive
    and requests more often than it keep the one connection, and only once left idle for the
    keep-alive is it closed (which fails on the old code)."""

    async def slow(req: Request, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.6)  # twice the keep-alive, the connection in use all along
        return await ok()(req, writer)

    server.replies = [slow, ok()]
    loop = asyncio.get_running_loop()
    c = Http1Client(
        allow_private=True, connect_timeout=0.5, request_timeout=5.0, default_headers={}, keepalive=0.3
    )
    try:
        assert await post(c, server.url()) == 200
        for _ in range(4):  # 0.6 s in all, never 0.3 s idle
            await asyncio.sleep(0.15)
            assert await post(c, server.url()) == 200
        last = loop.time()
        assert [r.connection for r in server.requests] == [1] * 5
        assert server.eofs == []
        assert c.idle_connections() == 1
        await _until(lambda: bool(server.eofs), within=3.0)
        assert [n for n, _ in server.eofs] == [1]
        assert server.eofs[0][1] - last >= 0.29  # idle for the keep-alive first
        assert c._idle == {}
    finally:
        await c.aclose()


async def test_a_busy_connection_arms_its_timer_once_not_per_request(
    server: RawServer, client: Http1Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle close rides on the connection's deadline timer: a call_at and a cancel per request
    would be a heap push and a cancelled handle per request (``_Connection._watch``)."""
    loop = asyncio.get_running_loop()
    armed: list[float] = []
    call_at = loop.call_at

    def counting(when: float, callback: Callable[..., object], *args: object, **kwargs: object) -> object:
        if getattr(callback, "__name__", "") == "_timed_out":
            armed.append(when)
        return call_at(when, callback, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "call_at", counting)
    for _ in range(200):
        assert await post(client, server.url()) == 200
    assert {r.connection for r in server.requests} == {1}
    assert len(armed) == 1


async def test_concurrent_requests_each_get_a_connection(server: RawServer, client: Http1Client) -> None:
    async def slow(_req: Request, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)
        return await ok()(_req, writer)

    server.replies = [slow]
    statuses = await asyncio.gather(*(post(client, server.url()) for _ in range(5)))
    assert statuses == [200] * 5
    assert len({r.connection for r in server.requests}) == 5
    assert client.idle_connections() == 5


# -- how an answer may be framed -------------------------------------------------------------------


async def test_a_body_ending_with_the_connection(server: RawServer, client: Http1Client) -> None:
    until_close = raw(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it", keep=False)

    server.replies = [until_close]
    answer = await client.request("GET", server.url(), {}, None, max_bytes=4096)
    assert (answer.status, answer.body, answer.body_error) == (200, b"all of it", None)


async def test_a_chunked_body_is_read_whole_and_the_connection_kept(
    server: RawServer, client: Http1Client
) -> None:
    chunks = raw(
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )

    server.replies = [chunks]
    first = await client.request("POST", server.url(), {}, b"{}", max_bytes=4096)
    second = await client.request("POST", server.url(), {}, b"{}", max_bytes=4096)
    assert (first.status, first.body) == (second.status, second.body) == (201, b"abcde")
    assert [r.connection for r in server.requests] == [1, 1]


async def test_an_interim_answer_is_skipped_for_the_final_one(server: RawServer, client: Http1Client) -> None:
    early_hints = raw(
        b"HTTP/1.1 103 Early Hints\r\nRetry-After: 99\r\n\r\n",
        b"HTTP/1.1 429 Too Many\r\nRetry-After: 7\r\nContent-Length: 2\r\n\r\nno",
    )

    server.replies = [early_hints]
    answer = await client.request("POST", server.url(), {}, b"{}", max_bytes=4096)
    assert (answer.status, answer.retry_after, answer.body) == (429, "7", b"no")


async def test_a_no_content_answer_has_no_body_and_keeps_the_connection(
    server: RawServer, client: Http1Client
) -> None:
    no_content = raw(b"HTTP/1.1 204 No Content\r\n\r\n")

    server.replies = [no_content]
    assert (await client.request("DELETE", server.url(), {}, None, max_bytes=10)).status == 204
    assert (await client.request("DELETE", server.url(), {}, None, max_bytes=10)).status == 204
    assert [r.connection for r in server.requests] == [1, 1]


async def test_headers_larger_than_the_limit_are_a_protocol_error(
    server: RawServer, client: Http1Client
) -> None:
    async def huge_headers(_req: Request, writer: asyncio.StreamWriter) -> bool:
        filler = "".join(f"X-Filler-{i}: {'v' * 1000}\r\n" for i in range(MAX_HEADER_BYTES // 1000 + 2))
        writer.write(f"HTTP/1.1 200 OK\r\n{filler}Content-Length: 0\r\n\r\n".encode())
        await writer.drain()
        return True

    server.replies = [huge_headers]
    with pytest.raises(httpx.RemoteProtocolError, match="too large"):
        await post(client, server.url())


async def test_an_answer_that_is_not_http_is_a_protocol_error(server: RawServer, client: Http1Client) -> None:
    garbage = raw(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    server.replies = [garbage]
    with pytest.raises(httpx.RemoteProtocolError, match="not valid HTTP"):
        await post(client, server.url())


async def test_a_body_cut_at_max_bytes_closes_its_connection(server: RawServer, client: Http1Client) -> None:
    server.replies = [ok(b"x" * 10_000)]
    big = await client.request("GET", server.url(), {}, None, max_bytes=100)
    assert (big.status, len(big.body), big.truncated) == (200, 100, True)
    small = await client.request("GET", server.url(), {}, None, max_bytes=100_000)
    assert (len(small.body), small.truncated) == (10_000, False)
    assert [r.connection for r in server.requests] == [1, 2]


# -- what is sent --------------------------------------------------------------------------------------


async def test_the_request_line_and_headers(server: RawServer, client: Http1Client) -> None:
    await client.request(
        "PUT",
        server.url("/a%2Fb/c?phone=%2B316&x=1#fragment"),
        {
            "X-Custom": "v",
            "user-agent": "mapping-agent",
            "Content-Length": "999",
            "Transfer-Encoding": "chunked",
        },
        b"12345",
        max_bytes=100,
    )
    [req] = server.requests
    assert req.line == "PUT /a%2Fb/c?phone=%2B316&x=1 HTTP/1.1"  # as rendered, without the fragment
    assert req.header("Host") == [f"127.0.0.1:{server.port}"]
    assert req.header("User-Agent") == ["mapping-agent"]  # a mapping's header replaces the default
    assert req.header("Accept-Encoding") == ["identity"]
    assert req.header("X-Custom") == ["v"]
    assert req.header("Content-Length") == ["5"]  # ours, never a mapping's
    assert req.header("Transfer-Encoding") == []
    assert req.body == b"12345"


async def test_a_post_without_a_body_says_so_and_a_get_sends_no_length(
    server: RawServer, client: Http1Client
) -> None:
    await client.request("POST", server.url(), {}, None, max_bytes=100)
    await client.request("GET", server.url(), {}, None, max_bytes=100)
    assert [r.header("Content-Length") for r in server.requests] == [["0"], []]


def test_request_targets() -> None:
    assert request_target("http://crm:8080?x=1", "crm:8080") == "/?x=1"
    assert request_target("http://crm", "crm") == "/"
    assert request_target("https://u:p@crm/p?q#f", "u:p@crm") == "/p?q"
    for bad in ("http://crm/a b", "http://crm/\u00e9", "http://crm/a\tb"):
        with pytest.raises(httpx.InvalidURL):
            request_target(bad, "crm")


async def test_a_url_with_a_space_is_permanent_and_nothing_is_sent(
    server: RawServer, client: Http1Client
) -> None:
    with pytest.raises(httpx.InvalidURL) as info:
        await post(client, server.url("/a b"))
    assert classify(None, info.value) is Outcome.PERMANENT
    assert server.requests == []


async def test_an_ipv6_literal(client: Http1Client) -> None:
    srv = RawServer()
    try:
        async with serving(srv, "::1"):
            assert await post(client, f"http://[::1]:{srv.port}/v6") == 200
    except OSError:
        if not srv.requests:
            pytest.skip("no IPv6 loopback on this machine")
        raise
    assert srv.requests[0].header("Host") == [f"[::1]:{srv.port}"]


async def test_the_guard_refuses_before_connecting(server: RawServer) -> None:
    guarded = Http1Client(allow_private=False, connect_timeout=0.5, request_timeout=1.0, default_headers={})
    try:
        with pytest.raises(EgressRefused):
            await post(guarded, server.url())
        with pytest.raises(EgressRefused, match="localhost"):
            await post(guarded, server.url(host="localhost"))
    finally:
        await guarded.aclose()
    assert server.connections == 0


@pytest.mark.parametrize(
    "host",
    [
        "\uff11\uff12\uff17.\uff10.\uff10.\uff11",  # fullwidth digits
        "\u2460\u2461\u2466.0.0.1",  # circled digits
        "127\u30020\u30020\u30021",  # ideographic full stops
    ],
)
async def test_a_unicode_host_that_is_an_address_in_its_idna_form_is_judged_as_that_address(
    server: RawServer, host: str
) -> None:
    """The guard took such a host for a name (to be judged by the resolver), and the client then
    connected to its IDNA form, 127.0.0.1, without asking the resolver (a security review's
    finding; templates refuse non-ASCII URIs, so only this client's other callers could reach it)."""
    guarded = Http1Client(allow_private=False, connect_timeout=0.5, request_timeout=1.0, default_headers={})
    try:
        with pytest.raises(EgressRefused):
            await post(guarded, f"http://{host}:{server.port}/calls")
    finally:
        await guarded.aclose()
    assert server.connections == 0


# -- TLS ------------------------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_https_verifies_the_certificate_and_reuses_the_connection(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    c = Http1Client(
        allow_private=True, connect_timeout=1.0, request_timeout=2.0, default_headers={}, ssl_context=trusting
    )
    untrusting = Http1Client(allow_private=True, connect_timeout=1.0, request_timeout=2.0, default_headers={})
    try:
        async with serving(RawServer(), ssl=server_ctx) as srv:
            assert await post(c, f"https://localhost:{srv.port}/tls") == 200
            assert await post(c, f"https://localhost:{srv.port}/tls") == 200
            with pytest.raises(httpx.ConnectError, match="TLS"):
                await post(untrusting, f"https://localhost:{srv.port}/tls")
    finally:
        await c.aclose()
        await untrusting.aclose()
    assert [r.connection for r in srv.requests] == [1, 1]


# -- time -----------------------------------------------------------------------------------------------


async def test_the_deadline_after_the_status_returns_the_status(
    server: RawServer, client: Http1Client
) -> None:
    status_then_silence = raw(b"HTTP/1.1 201 Created\r\nContent-Length: 50\r\n\r\nabc", keep=False, linger=5)

    server.replies = [status_then_silence]
    answer = await client.request("POST", server.url(), {}, b"{}", max_bytes=4096)
    assert answer.status == 201
    assert isinstance(answer.body_error, httpx.ReadTimeout)
    assert client.idle_connections() == 0


async def test_a_later_request_on_a_kept_alive_connection_gets_its_own_whole_deadline(
    server: RawServer, client: Http1Client
) -> None:
    """The connection's one timer is armed for the first request's deadline (1 s after it); the
    second request starts 0.6 s later on the same connection and hangs. The timer firing at 1 s
    must re-arm for the second request's deadline, not end it 0.4 s in, nor leave it waiting."""

    async def silence(_req: Request, _writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(10)
        return False

    server.replies = [ok(), silence]
    loop = asyncio.get_running_loop()
    assert await post(client, server.url()) == 200
    await asyncio.sleep(0.6)
    started = loop.time()
    with pytest.raises(httpx.TimeoutException, match="whole-request timeout"):
        await asyncio.wait_for(post(client, server.url()), 5.0)
    assert loop.time() - started >= 0.95  # its own 1 s (the timer may fire a clock tick early)
    assert [r.connection for r in server.requests] == [1, 1]
    assert client.idle_connections() == 0


async def test_a_connect_timeout_is_a_connect_timeout() -> None:
    # A listener that never accepts, its backlog filled: Linux drops further SYNs, so a connect hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    c = Http1Client(allow_private=True, connect_timeout=0.2, request_timeout=5.0, default_headers={})
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(httpx.ConnectTimeout) as info:
            await post(c, f"http://127.0.0.1:{port}/x")
    finally:
        await c.aclose()
        for s in fillers:
            s.close()
        listener.close()
    assert loop.time() - started < 2.0
    assert classify(None, info.value) is Outcome.RETRY


async def test_closing_the_client_closes_its_connections(server: RawServer) -> None:
    c = Http1Client(allow_private=True, connect_timeout=0.5, request_timeout=1.0, default_headers={})
    assert await post(c, server.url()) == 200
    await c.aclose()
    with pytest.raises(httpx.TransportError):
        await post(c, server.url())
    for _ in range(50):
        if not server._tasks:
            break
        await asyncio.sleep(0.01)
    assert not server._tasks  # the server saw the connection close


# -- what a CRM (or a token) must not be able to do ------------------------------------------------


async def test_an_answer_nobody_asked_for_in_the_same_read_is_never_given_to_the_next_request(
    server: RawServer, client: Http1Client
) -> None:
    """A 201 followed, in the same read, by the start of another answer: the connection is not
    pooled, so the next request cannot be given that stray answer's status."""

    two_answers = raw(
        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\nHTTP/1.1 503 Busy\r\nContent-Length: 0\r\n"
    )

    server.replies = [two_answers, ok()]
    assert await post(client, server.url()) == 201
    assert await post(client, server.url()) == 200
    assert [r.connection for r in server.requests] == [1, 2]


async def test_a_request_cancelled_after_its_answer_leaves_the_pooled_connection_alone(
    server: RawServer, client: Http1Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's answer arrives and its connection goes back to the pool; before A resumes, B takes that
    connection and A is cancelled. B must get its answer (closing the connection under B would
    fail B, and the CRM would receive B a second time on the retry)."""
    loop = asyncio.get_running_loop()
    tasks: dict[str, asyncio.Task[int]] = {}
    original = http1._Connection.on_message_complete

    def then_b_and_cancel_a(conn: http1._Connection) -> None:
        original(conn)
        if "b" not in tasks:
            tasks["b"] = loop.create_task(post(client, server.url("/b")))
            tasks["a"].cancel()

    monkeypatch.setattr(http1._Connection, "on_message_complete", then_b_and_cancel_a)
    tasks["a"] = loop.create_task(post(client, server.url("/a")))
    with pytest.raises(asyncio.CancelledError):
        await tasks["a"]
    assert await tasks["b"] == 200
    assert [(r.line.split()[1], r.connection) for r in server.requests] == [("/a", 1), ("/b", 1)]


async def test_a_header_line_that_never_ends_is_cut_off_at_the_limit(server: RawServer) -> None:
    async def endless_header(_req: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        for _ in range(200):  # 200 x 4 KiB, never a line end
            writer.write(b"a" * 4096)
            await writer.drain()
        await asyncio.sleep(5)
        return False

    server.replies = [endless_header]
    c = Http1Client(allow_private=True, connect_timeout=0.5, request_timeout=5.0, default_headers={})
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(httpx.RemoteProtocolError, match="too large"):
            await post(c, server.url())
    finally:
        await c.aclose()
    assert loop.time() - started < 3.0  # at the limit, not at the request deadline


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer abc\r\nContent-Length: 0\r\n\r\nDELETE /contacts/42 HTTP/1.1\r\nHost: x"},
        {"Authorization": "Bearer abc\nX-Injected: 1"},
        {"X-Nul": "a\0b"},
        {"Bad Name": "v"},
        {"X-Surrogate": "\udce9"},
    ],
)
async def test_a_header_http_cannot_carry_is_refused_before_anything_is_sent(
    server: RawServer, client: Http1Client, headers: dict[str, str]
) -> None:
    with pytest.raises(InvalidRequest) as info:
        await client.request("POST", server.url(), headers, b"{}", max_bytes=100)
    assert classify(None, info.value) is Outcome.PERMANENT
    assert server.connections == 0


async def test_an_internationalised_host_is_sent_in_its_idna_form(client: Http1Client) -> None:
    origin, _ = client.origin_of("http://crm.b\u00fccher.example:8080/x")
    assert (origin.host, origin.host_header) == (
        "crm.xn--bcher-kva.example",
        "crm.xn--bcher-kva.example:8080",
    )
    with pytest.raises(InvalidRequest):
        client.origin_of("http://" + "a" * 70 + "\u00e9.example/x")  # a label IDNA cannot carry


async def test_a_body_whose_last_coding_is_not_chunked_ends_with_the_connection(
    server: RawServer, client: Http1Client
) -> None:
    gzip_until_close = raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nwhole body", keep=False)

    server.replies = [gzip_until_close]
    answer = await client.request("GET", server.url(), {}, None, max_bytes=100)
    assert (answer.status, answer.body, answer.body_error) == (200, b"whole body", None)


async def test_a_trailer_does_not_replace_the_retry_after_header(
    server: RawServer, client: Http1Client
) -> None:
    with_trailer = raw(
        b"HTTP/1.1 503 Busy\r\nRetry-After: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nno\r\n0\r\nRetry-After: 86400\r\n\r\n"
    )

    server.replies = [with_trailer]
    answer = await client.request("POST", server.url(), {}, b"{}", max_bytes=100)
    assert (answer.status, answer.retry_after, answer.body) == (503, "5", b"no")


async def test_a_switching_protocols_answer_is_a_protocol_error(
    server: RawServer, client: Http1Client
) -> None:
    upgrade = raw(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        keep=False,
        linger=5,
    )

    server.replies = [upgrade]
    with pytest.raises(httpx.RemoteProtocolError):
        await post(client, server.url())


def _idle_closing_server(idle_timeout: float) -> tuple[socket.socket, list[int]]:
    """A server in a thread of its own (it must act while the client's loop is blocked): answers
    each request of a connection and closes the connection after ``idle_timeout`` s without one."""
    listener = socket.create_server(("127.0.0.1", 0))
    connections: list[int] = []

    def serve(conn: socket.socket) -> None:
        conn.settimeout(idle_timeout)
        buf = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    return  # idle too long: close
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:  # the bodies here are 7 bytes: {"a":1}
                    _head, _, rest = buf.partition(b"\r\n\r\n")
                    buf = rest[7:]
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connections.append(1)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, connections


async def test_a_connection_the_server_closed_while_the_loop_was_busy_is_not_reused(
    client: Http1Client,
) -> None:
    """A server's idle timeout (uvicorn 5 s, gunicorn 2 s, nginx's keepalive_timeout) closed the
    connection while the loop was busy (rendering, a commit), its close unread in the kernel: the
    pool still held it, the next request was written into it and failed unanswered, a retry and an
    attempt lost though nothing reached the CRM (a review against real servers: nginx with a 1 s
    keepalive_timeout, 3 of 41 requests with 20 ms of loop lag). Fails on the old code."""
    listener, connections = _idle_closing_server(0.05)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/x"
    try:
        assert await post(client, url) == 200
        time.sleep(0.3)  # the loop is busy while the server's close arrives
        assert await post(client, url) == 200
    finally:
        listener.close()
    assert len(connections) == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 201 Created\r\nContent-Length: 2, 2\r\n\r\nok",
        b"HTTP/1.1 201 Created\r\nX-Fold: a\r\n  b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
    ],
    ids=["content-length-twice", "content-length-list", "folded-header", "chunked-and-length"],
)
async def test_a_status_that_arrived_decides_though_the_headers_are_malformed(
    server: RawServer, client: Http1Client, answer: bytes
) -> None:
    """The CRM answered 201 (the call log exists) with a flaw in its headers that llhttp refuses:
    that was a protocol error, a retry, and the call posted again at every step of the schedule (a
    review against real servers). The status decides, as one that arrived always does; the flaw
    is the answer's error, and its connection is not kept. Fails on the old code."""
    server.replies = [raw(answer), ok()]
    got = await client.request("POST", server.url(), {}, b"{}", max_bytes=4096)
    assert got.status == 201 and classify(got.status, None) is Outcome.SUCCESS
    assert await post(client, server.url()) == 200
    assert [r.connection for r in server.requests] == [1, 2]
