"""The CRM requests' HTTP/1.1 transport: keep-alive connections on asyncio, answers parsed by httptools.

Why not aiohttp's ``ClientSession`` here: every delivery is one small request, and aiohttp's request
path (its request and response objects, timers, tracing hooks, a task per request body on Python
3.11) cost about 330 µs of CPU per request on this machine against about 90 µs for the same
request written on an ``asyncio.Protocol`` with the response parsed by llhttp through ``httptools``
(``bench/bench_transport.py``). In a daemon that is CPU-bound on one core, that was a quarter of an
event's cost. The parsing (status line, headers, chunked and length-delimited bodies, keep-alive
rules) is httptools' own; what this module adds is what a pool needs: connections per origin,
reuse, one request at a time on a connection, and the bridge's rules.

The rules (reliability.md §8, §15), the same the aiohttp path kept:

- the outbound guard: ``check_url`` on every request; a host name is resolved by
  ``egress.GuardedResolver`` when a connection is opened, and the addresses it leaves are the only
  ones connected to (a DNS-rebinding host cannot pass with one answer and connect with another);
- the URL is sent as rendered (its percent-encoding untouched; the fragment is never sent);
- redirects are answers, never followed; no cookie jar; no proxy from the environment;
- one whole-request deadline (connecting, sending, reading the body), a connect timeout for the
  handshake; at most ``max_bytes`` of a body read (a longer body's connection is closed, not
  pooled);
- errors are raised as the httpx exception of the same meaning (``retry.classify`` knows those),
  the guard's refusal as itself; once the status line arrived, the status decides and a body that
  breaks off afterwards is reported beside it (``body_error``), never instead of it.

A connection idle for ``keepalive`` seconds is closed by the client (its own timer, the one that
times its requests, does it), and one the server closed while it was idle leaves the pool as soon
as the loop hears of it; neither is reused, and an origin with no idle connection left has no entry
in the pool. A request that a connection drops without an answer is never sent again here: it may
have reached the CRM, so it is an attempt like any other, and the worker's schedule retries it
(reliability.md §6).
"""

from __future__ import annotations

import asyncio
import re
import select
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import httptools
import httpx

from cti_bridge.delivery.egress import EgressRefused, GuardedResolver, check_host, check_url

#: Response headers larger than this in all are a protocol error (llhttp sets no limit of its own).
MAX_HEADER_BYTES = 64 * 1024
#: Methods whose request carries a ``Content-Length`` even without a body (as aiohttp and curl do).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: An HTTP header name (RFC 9110 token).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Request headers this transport writes itself; a mapping's own value is not sent.
_OWN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


class CrmAnswer(NamedTuple):
    """What a CRM answered: the status, the body (at most ``max_bytes``) and its one header we use;
    ``body_error`` when the body broke off after the status arrived (the body is then empty)."""

    status: int
    body: bytes
    truncated: bool
    retry_after: str | None
    body_error: Exception | None = None


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a URL's requests go: scheme, host (as in the URL, without brackets), port, and the
    ``Host`` header (the netloc without any user info)."""

    scheme: str
    host: str
    port: int
    host_header: str

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


def parse_origin(scheme: str, netloc: str) -> Origin:
    """The origin of a URL that ``check_url`` passed (``netloc`` as it returned it)."""
    hostport = netloc.rpartition("@")[2]
    if hostport.startswith("["):
        end = hostport.find("]")
        host, rest = hostport[1:end], hostport[end + 1 :]
    else:
        host, _, port_text = hostport.partition(":")
        rest = f":{port_text}" if port_text else ""
    port_text = rest[1:] if rest.startswith(":") else ""
    default = 443 if scheme == "https" else 80
    try:
        port = int(port_text) if port_text else default
    except ValueError:
        raise httpx.InvalidURL("the URL's port is not a number") from None
    if not 0 < port < 65536:
        raise httpx.InvalidURL("the URL's port is out of range")
    if not host.isascii():
        # An internationalised host name goes out (Host, SNI, DNS) in its IDNA form, as browsers send it.
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise InvalidRequest(f"the host name {host!r} has no IDNA form") from None
        hostport, host = hostport.replace(host, ascii_host, 1), ascii_host
    return Origin(scheme, host.lower(), port, hostport)


def request_target(url: str, netloc: str) -> str:
    """The request target of ``url``: everything after its netloc up to a fragment, as written."""
    start = url.find(netloc, url.find("://") + 3) + len(netloc)
    target = url[start:].partition("#")[0]
    if not target.startswith("/"):
        target = "/" + target  # "http://crm?x=1" asks for "/?x=1"
    if not target.isascii() or not target.isprintable() or " " in target:
        # A space or a control character would break the request line; an operator fixes the URL.
        raise httpx.InvalidURL("the URL holds a space, a control character or a non-ASCII character")
    return target


class _Exchange:
    """One request's answer as it arrives on a connection."""

    __slots__ = (
        "chunks",
        "deadline",
        "framed",
        "future",
        "header_bytes",
        "max_bytes",
        "received",
        "retry_after",
        "size",
        "status",
        "truncated",
    )

    def __init__(self, future: asyncio.Future[CrmAnswer], max_bytes: int, deadline: float) -> None:
        self.future = future
        self.max_bytes = max_bytes
        self.deadline = deadline  # loop time at which the whole request times out
        self.status = 0  # 0 until a final (non-1xx) status line and its headers arrived
        self.retry_after: str | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False
        self.header_bytes = 0
        self.received = 0  # bytes of the answer so far
        self.framed = False  # Content-Length or Transfer-Encoding: the body does not end at EOF

    def answer(self, body_error: Exception | None = None) -> CrmAnswer:
        body = b"".join(self.chunks) if body_error is None else b""
        return CrmAnswer(self.status, body, self.truncated, self.retry_after, body_error)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer parsed as it arrives."""

    def __init__(self, pool: Http1Client, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._exchange: _Exchange | None = None
        # One timer per connection, not per request, for its deadlines and its idle time (``_watch``).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        ex = self._exchange
        if ex is None:
            self.abort()  # bytes nobody asked for: the connection cannot be trusted with the next request
            return
        ex.received += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if isinstance(exc.__context__, _HeadersTooLarge):
                error = httpx.RemoteProtocolError("the CRM's answer headers are too large")
            elif isinstance(exc.__context__, _Unsolicited):
                error = httpx.RemoteProtocolError("the CRM sent an answer nobody asked for")
            else:
                error = httpx.RemoteProtocolError(f"the CRM's answer is not valid HTTP: {exc!r}")
                status = self._parser.get_status_code()
                if not ex.status and status >= 200 and not isinstance(exc, httptools.HttpParserUpgrade):
                    # The status line arrived and the flaw is in the headers (a Content-Length
                    # twice, Transfer-Encoding with Content-Length, a folded line): the CRM has
                    # acted and said so, and that decides, as any status that arrived does. Taken
                    # as an error, a 201 was a retry: the call posted again at every step of the
                    # schedule. The connection is closed below, so nothing can be smuggled.
                    ex.status = status
            self._fail_exchange(ex, error)
            self.abort()
            return
        if self._exchange is ex and (
            # httptools buffers a header line until it ends, so a line that never ends would grow
            # without bound before on_header could count it; and whatever a CRM sends beyond the
            # body we keep (chunk framing, trailers) is bounded too.
            (not ex.status and ex.received > MAX_HEADER_BYTES)
            or ex.received > 8 * (ex.max_bytes + MAX_HEADER_BYTES)
        ):
            self._fail_exchange(ex, httpx.RemoteProtocolError("the CRM's answer headers are too large"))
            self.abort()

    def dropped(self) -> bool:
        """Whether the idle connection has something to read: the server's close (or bytes nobody
        asked for) still waiting in the kernel, while the loop was busy and ``eof_received`` has
        not run yet. One ``select`` without waiting, as httpcore and urllib3 check before reuse."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return True
        try:
            return bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):  # closed meanwhile
            return True

    def eof_received(self) -> bool | None:
        # The server is done with this connection: out of the pool at once, not a loop turn later
        # when connection_lost runs. False: the transport closes (a half-closed one is not reused).
        self.closed = True
        self._pool._forget(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pool._forget(self)
        ex, self._exchange = self._exchange, None
        if ex is None or ex.future.done():
            return
        if ex.status and not ex.framed and exc is None:
            ex.future.set_result(ex.answer())  # a body delimited by the end of the connection
        elif ex.status:
            ex.future.set_result(
                ex.answer(httpx.RemoteProtocolError("the connection closed before the body ended"))
            )
        elif exc is not None:
            ex.future.set_exception(httpx.ReadError(str(exc) or type(exc).__name__))
        else:
            ex.future.set_exception(httpx.RemoteProtocolError("the server disconnected without an answer"))

    # -- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._exchange is None:
            # An answer nobody asked for (after the last one, in the same read): the connection
            # cannot be trusted with the next request (data_received aborts it).
            raise _Unsolicited

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self._exchange
        if ex is None or ex.status:
            return  # ex.status: a chunked body's trailer, which changes nothing here
        ex.header_bytes += len(name) + len(value) + 4
        if ex.header_bytes > MAX_HEADER_BYTES:
            raise _HeadersTooLarge
        lower = name.lower()
        if lower == b"retry-after":
            ex.retry_after = value.decode("latin-1").strip()
        elif lower == b"content-length" or (
            # llhttp reads a body whose last coding is not chunked until the connection ends
            lower == b"transfer-encoding" and value.rstrip().lower().endswith(b"chunked")
        ):
            ex.framed = True

    def on_headers_complete(self) -> None:
        ex = self._exchange
        if ex is None:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the final one follows.
            ex.retry_after, ex.framed, ex.header_bytes = None, False, 0
            return
        ex.status = status

    def on_body(self, body: bytes) -> None:
        ex = self._exchange
        if ex is None or ex.truncated or not ex.status:
            return
        room = ex.max_bytes - ex.size
        if len(body) <= room:
            ex.chunks.append(body)
            ex.size += len(body)
            return
        # Longer than we read: keep the first max_bytes and close the connection (the rest is not
        # read, so the connection cannot carry another request).
        ex.chunks.append(body[:room])
        ex.size = ex.max_bytes
        ex.truncated = True
        self._exchange = None
        if not ex.future.done():
            ex.future.set_result(ex.answer())
        self.abort()

    def on_message_complete(self) -> None:
        ex = self._exchange
        if ex is None or not ex.status:
            return  # the end of an interim answer
        self._exchange = None
        keep = self._parser.should_keep_alive()
        if not ex.future.done():
            ex.future.set_result(ex.answer())
        if keep and not self.closed:
            self._pool._release(self)
        else:
            self.abort()

    # -- use ---------------------------------------------------------------------------------------

    def send(
        self,
        head: bytes,
        body: bytes | None,
        future: asyncio.Future[CrmAnswer],
        max_bytes: int,
        deadline: float,
    ) -> _Exchange:
        assert self.transport is not None
        ex = self._exchange = _Exchange(future, max_bytes, deadline)
        self._watch(deadline)
        self.transport.write(head + body if body else head)
        return ex

    def _watch(self, deadline: float) -> None:
        """Make sure the timer fires by ``deadline``.

        A timer per request (``call_at`` and ``cancel``) was a heap push and a cancelled handle per
        request, tens of thousands of them waiting in the loop's heap under load. Requests on one
        connection go one at a time with deadlines that only grow, so the connection keeps one
        timer, armed when it opens and, each time it fires, again for what is due next
        (``_timed_out``): the running request's deadline, or the end of the idle time. It is
        re-armed earlier only for an earlier deadline, which a request's never is (``_arm``).
        """
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        """Arm the timer for ``when``, or sooner: never further ahead than the keep-alive time or
        the request timeout, whichever is shorter (``Http1Client._tick``, at least 10 ms).

        Not past the keep-alive, so that a connection that goes idle finds its timer due within the
        keep-alive and is closed on time without arming anything when its answer comes in. Not
        past the request timeout, so that a new request's deadline (request timeout from its start)
        is never earlier than the timer and sending it arms nothing. Under load that is one wake-up
        per connection every ``_tick`` seconds, and no timer work per request.
        """
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        when = min(when, loop.time() + self._pool._tick)
        self._timer, self._timer_at = loop.call_at(when, self._timed_out), when

    def _timed_out(self) -> None:
        self._timer = None
        if self.closed:
            return
        # The loop may run a timer a clock tick early: the time it was armed for counts as come.
        now = max(asyncio.get_running_loop().time(), self._timer_at)
        ex = self._exchange
        if ex is not None:
            if now >= ex.deadline:
                self.expire(ex)
            else:
                self._arm(ex.deadline)  # this request started after the timer was armed
            return
        closes_at = self.idle_since + self._pool._keepalive
        if now >= closes_at:
            # Idle for the keep-alive: closed here, not when its origin is next used (which may be
            # never: a mapping's CRM host changed, a per-user instance URL), and out of the pool.
            self.abort()
        else:
            self._arm(closes_at)

    def expire(self, ex: _Exchange) -> None:
        """The whole-request deadline passed: once the status arrived it decides, with the body's
        timeout beside it; before, the request timed out. The connection is closed either way."""
        if ex.future.done():
            return
        if ex.status:
            ex.future.set_result(
                ex.answer(httpx.ReadTimeout("the whole-request timeout expired while reading the body"))
            )
        else:
            ex.future.set_exception(httpx.TimeoutException("the whole-request timeout expired"))
        if self._exchange is ex:
            self._exchange = None
        self.abort()

    def abort(self) -> None:
        """Close at once; the connection is not reused."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._exchange is not None:
            self._fail_exchange(self._exchange, httpx.RemoteProtocolError("the connection was closed"))
        self.closed = True
        self._pool._forget(self)
        if self.transport is not None:
            self.transport.abort()

    def _fail_exchange(self, ex: _Exchange, error: Exception) -> None:
        self._exchange = None
        if ex.future.done():
            return
        if ex.status:
            ex.future.set_result(ex.answer(error))  # the status arrived: it decides
        else:
            ex.future.set_exception(error)


class _HeadersTooLarge(Exception):
    """Raised in ``on_header``; httptools reports it as the context of its callback error."""


class _Unsolicited(Exception):
    """Raised in ``on_message_begin`` for an answer no request waits for."""


class InvalidRequest(ValueError):
    """The request cannot be written: a header name or value that HTTP cannot carry (CR, LF or NUL
    in a value would let it write a second request), or a host name that has no IDNA form. Never
    retried (retry.py): the mapping, the token or the URL must change."""


class Http1Client:
    """Keep-alive HTTP/1.1 connections per origin for CRM requests (one per process)."""

    def __init__(
        self,
        *,
        allow_private: bool,
        connect_timeout: float,
        request_timeout: float,
        default_headers: Mapping[str, str],
        keepalive: float = 15.0,
        resolver: GuardedResolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._allow_private = allow_private
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._keepalive = keepalive
        # How far ahead a connection's timer is armed at most (``_Connection._arm``); not 0, or a
        # busy connection's timer would fire at every turn of the loop.
        self._tick = max(min(keepalive, request_timeout), 0.01)
        self._resolver = resolver  # made on first use: aiohttp's resolver wants a running loop
        self._ssl = ssl_context
        self._defaults = {name.lower(): (name, value) for name, value in default_headers.items()}
        self._idle: dict[Origin, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._origins: dict[tuple[str, str], Origin] = {}
        self._good_names: set[str] = set()  # header names that passed _TOKEN (a handful, in practice)
        self._closed = False

    # -- the pool ---------------------------------------------------------------------------------

    def _release(self, conn: _Connection) -> None:
        if self._closed:
            conn.abort()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        # Those past the keep-alive (after a burst, the oldest, at the front: _pooled takes the
        # newest) are closed by their own timers (``_Connection._timed_out``), not here.
        idle = self._idle.get(conn.origin)
        if idle is None:
            self._idle[conn.origin] = [conn]
        else:
            idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle is not None and conn in idle:
            idle.remove(conn)
            if not idle:
                # An empty list per origin ever used would grow with every CRM host a mapping
                # pointed to and every per-user instance URL.
                del self._idle[conn.origin]

    def _pooled(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if idle is None:
            return None
        # Past the keep-alive though its timer has not run yet (a busy loop): not reused either.
        oldest = asyncio.get_running_loop().time() - self._keepalive
        found = None
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been timed out
            # A server's idle timeout (uvicorn 5 s, gunicorn 2 s, nginx's keepalive_timeout) may
            # have closed it while the loop was busy: written into, the request failed unanswered,
            # a retry and an attempt lost though nothing reached the CRM.
            if not conn.closed and conn.idle_since >= oldest and not conn.dropped():
                found = conn
                break
            conn.abort()
        if not idle:
            self._idle.pop(origin, None)  # no key without an idle connection (see _forget)
        return found

    def idle_connections(self) -> int:
        """Pooled connections, all origins (for tests)."""
        return sum(len(v) for v in self._idle.values())

    async def _addresses(self, origin: Origin) -> list[tuple[str, int]]:
        """The addresses to connect to: an IP literal as it is, if the guard allows it, a host name
        through the guarded resolver (which raises ``EgressRefused`` if none is allowed)."""
        family = socket.AF_INET6 if ":" in origin.host else socket.AF_INET
        try:
            socket.inet_pton(family, origin.host)
        except OSError:
            pass
        else:
            # Judged again here: a Unicode host that check_url took for a name may only have become
            # this literal in its IDNA form (fullwidth digits are 127.0.0.1; a security review's finding).
            check_host(origin.host, self._allow_private)
            return [(origin.host, family)]
        try:
            if self._resolver is None:
                self._resolver = GuardedResolver(self._allow_private)
            found = await self._resolver.resolve(origin.host, origin.port, socket.AF_UNSPEC)
        except EgressRefused:
            raise
        except UnicodeError:
            raise InvalidRequest(f"the host name {origin.host[:80]!r} is not a valid DNS name") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot resolve {origin.host}: {exc}") from exc
        return [(r["host"], int(r["family"])) for r in found]

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    # -- one request ------------------------------------------------------------------------------

    def origin_of(self, url: str) -> tuple[Origin, str]:
        """The origin and request target of ``url``, after the outbound guard passed it."""
        netloc = check_url(url, self._allow_private)
        scheme = url[: url.find("://")].lower()
        key = (scheme, netloc)
        origin = self._origins.get(key)
        if origin is None:
            origin = parse_origin(scheme, netloc)
            if len(self._origins) >= 4096:
                self._origins.clear()
            self._origins[key] = origin
        return origin, request_target(url, netloc)

    def _head(
        self, method: str, target: str, origin: Origin, headers: Mapping[str, str], size: int | None
    ) -> bytes:
        merged = dict(self._defaults)
        merged.setdefault("host", ("Host", origin.host_header))
        for name, value in headers.items():
            lower = name.lower()
            if lower not in _OWN_HEADERS:
                merged[lower] = (name, value)
        lines = [f"{method} {target} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in merged.values()]
        if size is not None:
            lines.append(f"Content-Length: {size}")
        text = "\r\n".join(lines)
        # CR, LF or NUL inside a header (an access token or a header prefix from outside) would let
        # it end the head early and write a second request: the line breaks must be ours alone.
        breaks = len(lines) - 1
        if text.count("\n") != breaks or text.count("\r") != breaks or "\0" in text:
            raise InvalidRequest("a header value holds CR, LF or NUL")
        for name, _ in merged.values():
            if name not in self._good_names:
                if not _TOKEN.fullmatch(name):
                    raise InvalidRequest(f"invalid header name {name[:40]!r}")
                self._good_names.add(name)
        try:
            return (text + "\r\n\r\n").encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest("a header value cannot be encoded (a lone surrogate)") from None

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, *, max_bytes: int
    ) -> CrmAnswer:
        """Send one request and read at most ``max_bytes`` of the answer's body.

        Raises ``EgressRefused`` (the guard), ``httpx.InvalidURL`` or ``InvalidRequest`` (nothing
        was sent; permanent), or an ``httpx.TransportError`` or ``TimeoutException`` for a request
        that got no answer. Cancellation propagates; the connection is closed.
        """
        if self._closed:
            raise httpx.TransportError("the CRM client is closed")
        origin, target = self.origin_of(url)
        size = len(body) if body is not None else (0 if method in _BODY_METHODS else None)
        head = self._head(method, target, origin, headers, size)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._request_timeout
        conn = self._pooled(origin) or await self._connect(origin, deadline)
        # Send and wait for the answer here, not in a coroutine of its own: each resumption of the
        # request passes through every frame of its chain.
        future: asyncio.Future[CrmAnswer] = loop.create_future()
        ex = conn.send(head, body, future, max_bytes, deadline)
        try:
            return await future
        except BaseException:
            if conn._exchange is ex:
                # Cancelled while the answer was still coming: it will not be read, so the
                # connection cannot carry another request. (Once answered, the connection may
                # already serve another request from the pool: it is not ours to close.)
                conn.abort()
            raise

    async def _connect(self, origin: Origin, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        whole = deadline - loop.time()
        try:
            async with asyncio.timeout(min(self._connect_timeout, whole)):
                addresses = await self._addresses(origin)
                last: OSError | None = None
                for address, family in addresses:
                    try:
                        _, conn = await loop.create_connection(
                            lambda: _Connection(self, origin),
                            address,
                            origin.port,
                            family=family,
                            ssl=self._tls() if origin.tls else None,
                            server_hostname=origin.host if origin.tls else None,
                        )
                    except ssl.SSLError as exc:
                        raise httpx.ConnectError(f"TLS with {origin.host_header} failed: {exc}") from exc
                    except OSError as exc:
                        last = exc
                        continue
                    if self._closed:  # aclose() while connecting
                        conn.abort()
                        raise httpx.TransportError("the CRM client is closed")
                    self._all.add(conn)
                    return conn
        except TimeoutError:
            if whole <= self._connect_timeout:
                raise httpx.TimeoutException("the whole-request timeout expired") from None
            raise httpx.ConnectTimeout(f"connecting to {origin.host_header} timed out") from None
        raise httpx.ConnectError(f"cannot connect to {origin.host_header}: {last}")

    async def aclose(self) -> None:
        """Close every connection."""
        self._closed = True
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
        if self._resolver is not None:
            await self._resolver.close()
