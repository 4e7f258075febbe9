"""The admin API's HTTP server protocol: uvicorn's h11 protocol with bounds a public port needs.

uvicorn's defaults (and its httptools protocol) left three ways to take the port down without a
credential (a security review's findings, each reproduced against the real daemon):

- a connection that sends nothing, or a header line every few seconds, was never closed: enough
  of them used up the process's file descriptors, and then the CRM connections failed too
  ("Too many open files") and asyncio logged every refused accept (160 MB of log in a minute);
- a header that never ends was buffered without limit (500 MB for five connections);
- requests were served without a bound on how many run at once.

Here the head of every request (its request line and headers) must arrive within
``REQUEST_HEAD_TIMEOUT`` of the connection being opened or of the previous answer, and its body
within ``REQUEST_BODY_TIMEOUT``, or the connection is closed; a head larger than
``MAX_REQUEST_HEAD`` is a 400 (h11's own bound); and ``MAX_CONCURRENT`` connections and
requests are served at once, the rest answered 503 (uvicorn's ``limit_concurrency``). Bodies are
bounded in size by the API itself (``admin.body``, 1 MiB).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

#: Seconds for a request's line and headers to arrive (from the connection, or the last answer).
REQUEST_HEAD_TIMEOUT = 10.0
#: Bytes of a request's line and headers.
MAX_REQUEST_HEAD = 64 * 1024
#: Seconds for a request's body to have arrived, from the same start as the head.
REQUEST_BODY_TIMEOUT = 30.0
#: Connections and requests served at once; beyond, 503.
MAX_CONCURRENT = 256


class AdminHttpProtocol(H11Protocol):
    """h11, closing a connection whose request head does not arrive in time (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request's head has its own time

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._head_deadline = self.loop.call_later(REQUEST_HEAD_TIMEOUT, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A request's head arrived: it is being answered; its body, if still coming, has until
            # REQUEST_BODY_TIMEOUT (a body sent a byte at a time held a place for ever, and the
            # login limiter's count with it).
            if cycle.more_body:
                self._head_deadline = self.loop.call_later(
                    max(0.0, REQUEST_BODY_TIMEOUT - REQUEST_HEAD_TIMEOUT), self._body_timed_out
                )
            return
        if not self.transport.is_closing():
            self.transport.close()

    def _body_timed_out(self) -> None:
        self._head_deadline = None
        cycle = self.cycle
        still_sending = cycle is not None and not cycle.response_complete and cycle.more_body
        if still_sending and not self.transport.is_closing():
            self.transport.close()  # the handler's receive() reports the disconnect
