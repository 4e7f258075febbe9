"""The delivery worker's HTTP client: one CRM request straight over aiohttp, behind the outbound guard.

Why not httpx here: the worker sends one request per delivery, and measured with
``bench/bench_transport.py`` (32 concurrent requests over loopback) httpx's request and response
objects on top of aiohttp's connection pool (``httpx-aiohttp``) cost about twice aiohttp's own work;
``make bench`` showed that layer as the daemon's largest single cost. Token refreshes (authlib), the
Xelion REST calls and the external API keep using httpx: they are few. Both CRM paths share one
aiohttp session, so one connection pool and one guarded resolver (``egress.guarded_session``).

Every promise of the httpx path holds here (reliability.md §8, §15): ``check_url`` on every request
(scheme, IP-literal hosts), hostnames judged by ``egress.GuardedResolver`` when connecting, redirects
never followed, the URL sent exactly as rendered (its percent-encoding untouched), one whole-request
timeout covering connect, send and the body, at most ``max_bytes`` of a body read (a longer body's
connection is closed, not pooled), no cookie jar (a CRM's cookie must not travel to another user's
request). aiohttp's errors are raised as the httpx exception of the same meaning (``retry.classify``
knows those, and ``last_error`` reads the same on both paths), and the guard's refusal as itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import NamedTuple

import aiohttp
import httpx
import yarl

from cti_bridge.config import Settings
from cti_bridge.delivery.egress import EgressRefused, check_url, find_refusal, guarded_session


class CrmAnswer(NamedTuple):
    """What a CRM answered: the status, the body (at most ``max_bytes``) and its one header we use;
    ``body_error`` when the body broke off after the status arrived (the body is then empty)."""

    status: int
    body: bytes
    truncated: bool
    retry_after: str | None
    body_error: Exception | None = None


async def _read_body(response: aiohttp.ClientResponse, max_bytes: int) -> tuple[bytes, bool]:
    """At most ``max_bytes`` of the body, and whether there was more (then the connection is closed
    rather than pooled: the rest is not read)."""
    length = response.content_length
    if length is not None and length <= max_bytes:
        # The usual answer: small, with a Content-Length. One read (aiohttp stops at the length).
        return await response.read(), False
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await response.content.read(max_bytes + 1 - size)
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            response.close()
            return b"".join(chunks)[:max_bytes], True


def _as_httpx(exc: Exception) -> Exception:
    """aiohttp's error as the httpx error of the same meaning (or the guard's refusal itself)."""
    refused = find_refusal(exc)
    if refused is not None:
        return refused
    text = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(text)
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return httpx.ReadTimeout(text)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return httpx.TimeoutException("the whole-request timeout expired")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(text)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(f"the server closed the connection: {text}")
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(text)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.InvalidURL(text)
    if isinstance(exc, aiohttp.ClientOSError):
        return httpx.ReadError(text)
    return httpx.TransportError(text)


class CrmClient:
    """Sends CRM requests for the delivery worker (one per process; ``aclose()`` at the end)."""

    def __init__(
        self, settings: Settings, session_factory: Callable[[], aiohttp.ClientSession] | None = None
    ) -> None:
        self._settings = settings
        self._allow_private = settings.allow_private_targets
        self._factory = session_factory or (lambda: guarded_session(settings))
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=settings.request_timeout,
            # Waiting for a pooled connection is bounded by ``total``; only the TCP/TLS handshake
            # itself by the connect timeout.
            connect=None,
            sock_connect=settings.connect_timeout,
        )

    def session(self) -> aiohttp.ClientSession:
        """The shared session, created on first use (inside the running loop, as aiohttp needs)."""
        if self._session is None or self._session.closed:
            self._session = self._factory()
        return self._session

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, *, max_bytes: int
    ) -> CrmAnswer:
        """Send one request and read at most ``max_bytes`` of the answer's body.

        Raises ``EgressRefused`` (the guard), or an ``httpx.TransportError``/``TimeoutException`` for
        a request that got no answer. Cancellation propagates as is; the connection is closed.
        """
        check_url(url, self._allow_private)
        session = self.session()
        try:
            async with session.request(
                method,
                yarl.URL(url, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,  # §15: a redirect is an answer, never followed
                compress=False,
                timeout=self._timeout,
            ) as response:
                retry_after = response.headers.get("Retry-After")
                try:
                    data, truncated = await _read_body(response, max_bytes)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    # The status line arrived, so the CRM has processed the request: the status
                    # decides (retry.py), not the body that broke off (which a record may show).
                    response.close()
                    return CrmAnswer(response.status, b"", False, retry_after, _as_httpx(exc))
                return CrmAnswer(response.status, data, truncated, retry_after)
        except EgressRefused:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _as_httpx(exc) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
