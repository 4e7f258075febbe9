"""The delivery worker's HTTP client: CRM requests over ``http1.Http1Client``, behind the outbound guard.

Why not httpx here: the worker sends one request per delivery, and httpx's request and response
objects cost several times the transport's own work (``bench/bench_transport.py``). Why not
aiohttp's ``ClientSession`` either: its request path cost about 330 µs of CPU per request here
against about 90 µs for ``http1.py``'s keep-alive connections with llhttp (httptools) parsing the
answers, and the daemon is CPU-bound on one core (``make bench``). Token refreshes (authlib), the
Xelion REST calls and the external API keep using httpx over the aiohttp session this client also
holds (``session()``): they are few, and share its guarded resolver's rules
(``egress.guarded_session``).

Every promise of the httpx path holds here (reliability.md §8, §15): ``check_url`` on every request
(scheme, IP-literal hosts), hostnames judged by ``egress.GuardedResolver`` when connecting, redirects
never followed, the URL sent exactly as rendered (its percent-encoding untouched), one whole-request
timeout covering connect, send and the body, at most ``max_bytes`` of a body read (a longer body's
connection is closed, not pooled), no cookie jar (a CRM's cookie must not travel to another user's
request). Errors are raised as the httpx exception of the same meaning (``retry.classify`` knows
those, and ``last_error`` reads the same on both paths), and the guard's refusal as itself.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping

import aiohttp

from cti_bridge import __version__
from cti_bridge.config import Settings
from cti_bridge.delivery.egress import guarded_session
from cti_bridge.delivery.http1 import CrmAnswer, Http1Client

__all__ = ["CrmAnswer", "CrmClient"]


class CrmClient:
    """Sends CRM requests for the delivery worker (one per process; ``aclose()`` at the end)."""

    def __init__(
        self, settings: Settings, session_factory: Callable[[], aiohttp.ClientSession] | None = None
    ) -> None:
        self._factory = session_factory or (lambda: guarded_session(settings))
        self._session: aiohttp.ClientSession | None = None
        # A mapping's own headers replace these (User-Agent: a CRM's logs name the bridge;
        # Accept-Encoding: answers are stored as they come, so none may come compressed).
        self.http = Http1Client(
            allow_private=settings.allow_private_targets,
            connect_timeout=settings.connect_timeout,
            request_timeout=settings.request_timeout,
            default_headers={
                "User-Agent": f"cti-bridge/{__version__}",
                "Accept": "*/*",
                "Accept-Encoding": "identity",
            },
        )

    def session(self) -> aiohttp.ClientSession:
        """The aiohttp session for token refreshes (httpx over it), created on first use inside the
        running loop, as aiohttp needs."""
        if self._session is None or self._session.closed:
            self._session = self._factory()
        return self._session

    def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, *, max_bytes: int
    ) -> Coroutine[object, object, CrmAnswer]:
        """Send one request and read at most ``max_bytes`` of the answer's body (to be awaited).

        Raises what ``Http1Client.request`` raises (``retry.SEND_ERRORS``). Cancellation propagates
        as is; the connection is closed. ``Http1Client.request``'s own coroutine, not one around it:
        every resumption of a request passes through each frame of its chain.
        """
        return self.http.request(method, url, headers, body, max_bytes=max_bytes)

    async def aclose(self) -> None:
        await self.http.aclose()
        if self._session is not None:
            await self._session.close()
