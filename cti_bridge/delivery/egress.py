"""The outbound guard, and the httpx client for token refreshes and the external API.

reliability.md §15: requests go only to ``http(s)`` URLs, redirects are never followed, and the
address a CRM host resolves to is checked *when connecting*: loopback, private, link-local,
multicast, reserved and cloud-metadata addresses are refused unless ``allow_private_targets``.
The check lives in the connector's DNS resolver, so the address checked is the address connected
to (a DNS-rebinding host cannot pass the check with one answer and connect with another). aiohttp
skips the resolver for IP-literal hosts, so those are checked per request by ``check_url``, which
the transport calls on every request (a caller cannot forget it).

reliability.md §8: bounded waits. The connect timeout and the whole-request timeout (connection,
sending, and reading the body) come from the settings; ``read_limited`` reads at most
``max_response_bytes`` of a body. §9: ``HostLimiter`` caps concurrent requests per CRM host.

Transport: httpx's API over aiohttp's connection pool (``httpx-aiohttp``), on the aiohttp session
(``guarded_session``) that the delivery worker's client (``crm_client.CrmClient``) holds for token
refreshes; CRM requests themselves go over ``http1.Http1Client``, which connects through the same
``GuardedResolver``. Measured with ``bench/bench_transport.py`` against the CRM
simulator (32 concurrent requests over loopback) httpx-aiohttp is several times faster than httpx's
default httpcore transport, and aiohttp alone about twice as fast again; see that script.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import typing
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream, map_aiohttp_exceptions

from cti_bridge import __version__
from cti_bridge.config import Settings
from cti_bridge.errors import CtiBridgeError

log = logging.getLogger(__name__)

ALLOWED_SCHEMES = frozenset({"http", "https"})
# Cloud metadata endpoints (AWS, GCP, Azure, ...: 169.254.169.254; AWS IPv6: fd00:ec2::254). Both
# are already link-local / unique-local, listed explicitly so the refusal never depends on that.
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)


class EgressRefused(CtiBridgeError, OSError):
    """The outbound guard refused a URL or an address (reliability.md §15). Never retried.

    An ``OSError`` so that, raised inside aiohttp's resolver, it travels as the connection error's
    cause instead of being swallowed. The message names the host and the reason, never a URL's
    query (which may hold a token).
    """


def address_refused(address: str) -> str | None:
    """Why ``address`` (an IP literal) may not be connected to, or None when it is a public one."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        # ::ffff:127.0.0.1 and 2002:7f00:1::/48 (6to4) reach IPv4 addresses: judge those.
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            inner = address_refused(str(mapped))
            if inner is not None:
                return inner
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_reserved:
        return "a reserved address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        # fec0::/10: deprecated site-local, still routed inside some networks; Python counts it as
        # global (a security review's finding).
        return "a site-local address"
    if ip.is_private or not ip.is_global:
        # is_global also rules out shared (100.64/10), documentation and benchmark ranges.
        return "a private address"
    return None


def _legacy_ipv4(host: str) -> bool:
    """Whether ``host`` is a numeric IPv4 form other than dotted-quad (``2130706433``, ``127.1``),
    which ``inet_aton`` would map onto an address."""
    try:
        ipaddress.ip_address(host)
        return False
    except ValueError:
        pass
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


#: Verdicts of ``check_host`` by (host, allow_private): every request checks its host, nearly always
#: one of a handful of CRM hosts. Bounded: cleared when full.
_VERDICTS: dict[tuple[str, bool], str | None] = {}
_VERDICTS_MAX = 4096


def check_host(host: str, allow_private: bool) -> None:
    """Refuse an IP-literal host that is not public (hostnames are checked by the resolver)."""
    key = (host, allow_private)
    try:
        refusal = _VERDICTS[key]
    except KeyError:
        refusal = _host_refusal(host, allow_private)
        if len(_VERDICTS) >= _VERDICTS_MAX:
            _VERDICTS.clear()
        _VERDICTS[key] = refusal
    if refusal is not None:
        raise EgressRefused(refusal)


def _host_refusal(host: str, allow_private: bool) -> str | None:
    """Why ``check_host`` refuses ``host``, or None."""
    bare = host.strip("[]")
    if _legacy_ipv4(bare):
        return f"refused host {bare!r}: a non-canonical numeric IPv4 form"
    try:
        ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        return None  # a hostname: judged at connect time by GuardedResolver
    if allow_private:
        return None
    reason = address_refused(bare)
    return None if reason is None else f"refused host {bare}: {reason}"


#: Origins (``scheme://netloc/``, as written) of URLs that ``check_url`` passed, by allow_private,
#: with their netloc. A URL that begins with one has that scheme and netloc (a netloc ends at the
#: first "/", "?" or "#", and holds none of them), so it passes without being parsed again: CRM
#: URLs carry a callId or a user, and urlsplit's own cache (128 URLs) nearly never holds them.
#: Bounded: cleared when full.
_ORIGINS: dict[tuple[str, bool], str] = {}
_ORIGINS_MAX = 4096


def _origin(url: str) -> str | None:
    """``url`` up to and with the first "/" after its "://", or None."""
    start = url.find("://")
    if start <= 0:
        return None
    slash = url.find("/", start + 3)
    return url[: slash + 1] if slash > 0 else None


def check_url(url: str, allow_private: bool) -> str:
    """Raise ``EgressRefused`` unless ``url`` is http(s) with a host the guard allows (§15).
    Returns the URL's netloc (``host[:port]`` as written)."""
    origin = _origin(url)
    if origin is not None:
        known = _ORIGINS.get((origin, allow_private))
        if known is not None:
            return known
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise EgressRefused("refused URL: it cannot be parsed") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise EgressRefused(f"refused URL: scheme {scheme or '(none)'!r} is not http or https")
    if not host:
        raise EgressRefused("refused URL: it has no host")
    check_host(host, allow_private)
    if origin is not None and origin == f"{parts.scheme}://{parts.netloc}/":
        if len(_ORIGINS) >= _ORIGINS_MAX:
            _ORIGINS.clear()
        _ORIGINS[(origin, allow_private)] = parts.netloc
    return parts.netloc


def netloc_of(url: str) -> str:
    """The netloc of ``url``: from the origins ``check_url`` passed if it begins with one, else
    parsed."""
    origin = _origin(url)
    if origin is not None:
        known = _ORIGINS.get((origin, False)) or _ORIGINS.get((origin, True))
        if known is not None:
            return known
    return urlsplit(url).netloc


class GuardedResolver(AbstractResolver):
    """Resolves with the system resolver and drops every address the guard refuses.

    Runs when aiohttp opens a connection, so the addresses judged are the ones connected to. When
    no address is left, ``EgressRefused`` is raised (aiohttp wraps it as the connection error's
    cause).
    """

    def __init__(self, allow_private: bool, inner: AbstractResolver | None = None) -> None:
        self._allow_private = allow_private
        self._inner = inner or ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._allow_private:
            return results
        allowed = [r for r in results if address_refused(r["host"]) is None]
        if not allowed:
            reasons = sorted({address_refused(r["host"]) or "" for r in results})
            raise EgressRefused(f"refused host {host}: it resolves to {', '.join(reasons) or 'nothing'}")
        if len(allowed) < len(results):
            log.warning("egress: dropped %d non-public addresses of %s", len(results) - len(allowed), host)
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class _TimeoutMappedStream(AiohttpResponseStream):
    """A response stream that reports aiohttp's whole-request timeout as an httpx timeout."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in super().__aiter__():
                yield chunk
        except TimeoutError as exc:
            raise httpx.ReadTimeout("the whole-request timeout expired while reading the body") from exc


class GuardedAiohttpTransport(AiohttpTransport):
    """httpx-aiohttp's transport with the guard, the whole-request timeout and no redirects.

    httpx-aiohttp maps httpx's per-phase timeouts onto aiohttp's socket timeouts only; reliability.md
    §8 wants the *whole* request bounded (a CRM trickling its body must free the slot), which is
    aiohttp's ``total`` timeout: it covers connecting, sending and reading the body.
    """

    def __init__(
        self, session_factory: typing.Callable[[], aiohttp.ClientSession], settings: Settings
    ) -> None:
        super().__init__(client=session_factory)
        self._allow_private = settings.allow_private_targets
        self._timeout = aiohttp.ClientTimeout(
            total=settings.request_timeout,
            # Waiting for a pooled connection is bounded by ``total``; only the TCP/TLS handshake
            # itself by the connect timeout.
            connect=None,
            sock_connect=settings.connect_timeout,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ALLOWED_SCHEMES:
            raise EgressRefused(f"refused URL: scheme {url.scheme!r} is not http or https")
        check_host(url.host, self._allow_private)
        if not isinstance(self.client, aiohttp.ClientSession):
            self.client = self.get_client()
        data: Any
        try:
            data = request.content or None
        except httpx.RequestNotRead:
            data = request.stream
            request.headers.pop("transfer-encoding", None)
        try:
            with map_aiohttp_exceptions():
                response = await self.client.request(
                    method=request.method,
                    # Sent as encoded: the caller's percent-encoding (an E.164 "%2B", an
                    # encoded "/" in a query) must reach the CRM unchanged, not re-encoded.
                    url=yarl.URL(str(url), encoded=True),
                    headers=request.headers,
                    data=data,
                    allow_redirects=False,  # §15: a redirect is an answer, never followed
                    auto_decompress=False,  # httpx decodes
                    compress=False,
                    timeout=self._timeout,
                    server_hostname=request.extensions.get("sni_hostname"),
                ).__aenter__()
        except httpx.TransportError as exc:
            # httpx-aiohttp maps connector errors loosely (a DNS failure becomes ConnectTimeout);
            # the guard's refusal is dug out of the cause chain so it is reported as itself.
            refused = find_refusal(exc)
            if refused is not None:
                raise refused from None
            raise
        except TimeoutError as exc:
            raise httpx.TimeoutException("the whole-request timeout expired") from exc
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode()
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_TimeoutMappedStream(response),
            request=request,
            extensions=extensions,
        )


def find_refusal(error: BaseException | None) -> EgressRefused | None:
    """The outbound guard's refusal inside ``error``, if it is one: raised by ``GuardedResolver``,
    aiohttp carries it as a connector error's ``os_error`` or cause, and callers may wrap it again."""
    current = error
    for _ in range(16):
        if current is None:
            return None
        if isinstance(current, EgressRefused):
            return current
        os_error = getattr(current, "os_error", None)
        if isinstance(os_error, EgressRefused):
            return os_error
        current = current.__cause__ or current.__context__
    return None


def guarded_session(settings: Settings) -> aiohttp.ClientSession:
    """The one aiohttp session for CRM requests and token refreshes (create inside the running loop).

    Keep-alive pooling with ``GuardedResolver``; per-host fairness is ``HostLimiter``'s job (§9), so
    the connector has no per-host limit; ``trust_env=False`` so an ``HTTP(S)_PROXY`` variable cannot
    route requests around the guard; no cookie jar (a CRM's cookie must not travel to another
    user's request); bodies handed over as received.

    ``Accept-Encoding: identity`` by default: the session does not decompress (httpx decodes on the
    token path, and sends its own ``Accept-Encoding``, which replaces this one), so a CRM request
    must not invite a compressed answer, or a CRM's error body would be stored as gzip bytes in the
    attempt's excerpt and ``max_response_bytes`` would count compressed bytes. A mapping that sets
    its own ``Accept-Encoding`` replaces it too.
    """
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(settings.allow_private_targets),
        limit=max(100, settings.worker_concurrency * 2),
        limit_per_host=0,
        keepalive_timeout=15.0,
        ttl_dns_cache=10,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        # User-Agent: a CRM's logs name the bridge. A mapping's own headers replace either default.
        headers={"Accept-Encoding": "identity", "User-Agent": f"cti-bridge/{__version__}"},
    )


def build_http_client(
    settings: Settings, session_factory: typing.Callable[[], aiohttp.ClientSession] | None = None
) -> httpx.AsyncClient:
    """The httpx client for token refreshes (authlib) and the external API (build once in ``app.py``).

    Over ``session_factory``'s aiohttp session: the daemon passes ``CrmClient.session``, so CRM
    requests and token refreshes share one pool and one guarded resolver. Without one, a session of
    its own with the same settings (``guarded_session``). No redirects; timeouts from the
    settings. Must be created inside the running loop's lifetime and closed with ``await
    client.aclose()``.
    """
    if session_factory is None:

        def session_factory() -> aiohttp.ClientSession:
            # Built lazily on the first request, inside the running event loop (aiohttp needs one).
            return guarded_session(settings)

    transport = GuardedAiohttpTransport(session_factory, settings)
    return httpx.AsyncClient(
        transport=transport,
        headers={"User-Agent": f"cti-bridge/{__version__}"},
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(settings.request_timeout, connect=settings.connect_timeout),
    )


class LimitedBody(typing.NamedTuple):
    """A response body read with a cap: the bytes, and whether more was left unread."""

    body: bytes
    truncated: bool


async def read_limited(response: httpx.Response, limit: int) -> LimitedBody:
    """Read at most ``limit`` bytes of a streamed response body (reliability.md §8), then close it.

    Returns ``(body, truncated)``: ``truncated`` is True when the body was longer (the rest is not
    read; the connection is then closed instead of returned to the pool).

    Cancellation: the response is closed and the CancelledError propagates.
    """
    chunks: list[bytes] = []
    size = 0
    truncated = False
    try:
        async for chunk in response.aiter_bytes():
            room = limit - size
            if len(chunk) > room:
                chunks.append(chunk[:room])
                size = limit
                truncated = True
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        await response.aclose()
    return LimitedBody(b"".join(chunks), truncated)


class _HostSlots:
    __slots__ = ("active", "semaphore", "users")

    def __init__(self, per_host: int) -> None:
        self.semaphore = asyncio.Semaphore(per_host)
        self.users = 0  # waiting or active: the entry is dropped when it reaches 0
        self.active = 0


class _Slot:
    """``HostLimiter.slot``'s block: a class rather than an ``asynccontextmanager``, whose generator
    and helper objects cost more than the semaphore itself, once per CRM request."""

    __slots__ = ("_entry", "_key", "_limiter")

    def __init__(self, limiter: HostLimiter, key: str) -> None:
        self._limiter = limiter
        self._key = key
        self._entry: _HostSlots | None = None

    async def __aenter__(self) -> None:
        limiter, key = self._limiter, self._key
        entry = limiter._slots.get(key)
        if entry is None:
            entry = limiter._slots[key] = _HostSlots(limiter.per_host)
        entry.users += 1
        try:
            await entry.semaphore.acquire()
        except BaseException:
            limiter._leave(key, entry)
            raise
        entry.active += 1
        self._entry = entry

    async def __aexit__(self, *_exc: object) -> None:
        entry = self._entry
        assert entry is not None
        entry.active -= 1
        entry.semaphore.release()
        self._limiter._leave(self._key, entry)


class HostLimiter:
    """At most ``per_host`` concurrent requests per host (reliability.md §9, default 8), so that one
    slow CRM cannot take every worker. Semaphores are created on demand and dropped when idle."""

    def __init__(self, per_host: int) -> None:
        if per_host < 1:
            raise ValueError("per_host must be at least 1")
        self.per_host = per_host
        self._slots: dict[str, _HostSlots] = {}

    def slot(self, host: str) -> _Slot:
        """Hold one of ``host``'s slots for an ``async with`` block.

        Cancellation: cancelled while waiting, no slot is taken; cancelled inside the block, the
        slot is released.
        """
        return _Slot(self, host.lower())

    def _leave(self, key: str, entry: _HostSlots) -> None:
        entry.users -= 1
        if entry.users == 0:
            self._slots.pop(key, None)

    def in_use(self, host: str) -> int:
        """How many slots of ``host`` are taken now (for metrics and tests)."""
        entry = self._slots.get(host.lower())
        return 0 if entry is None else entry.active
