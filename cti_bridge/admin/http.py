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
``MAX_REQUEST_HEAD`` is a 400 (h11's own bound while it arrives, ``_BoundedHead`` once it has);
and ``MAX_CONCURRENT`` connections and requests are served at once, the rest answered 503
(uvicorn's ``limit_concurrency``). Bodies are bounded in size by the API itself (``admin.body``,
1 MiB).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: Seconds for a request's line and headers to arrive (from the connection, or the last answer).
REQUEST_HEAD_TIMEOUT = 10.0
#: Bytes of a request's line and headers.
MAX_REQUEST_HEAD = 64 * 1024
#: Seconds for a request's body to have arrived, from the same start as the head.
REQUEST_BODY_TIMEOUT = 30.0
#: Connections and requests served at once; beyond, 503.
MAX_CONCURRENT = 256


def _head_size(request: h11.Request) -> int:
    """The bytes of a request's line and headers as h11 parsed them (the optional spaces around
    header values, which h11 strips, not counted)."""
    line = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers) + 2


class _BoundedHead(h11.Connection):
    """h11 with ``MAX_REQUEST_HEAD`` held for a head that arrives whole as well.

    h11's ``max_incomplete_event_size`` is checked only while a head is incomplete, so one that
    arrived in a single read (asyncio reads up to 256 KiB at a time) or completed in the next read
    was taken at up to four times the bound: an operator walkthrough measured 128 KiB accepted
    against the 64 KiB the README gives. A head found larger is a protocol error: uvicorn answers
    400 and closes the connection, as for one that grows past the bound while it arrives.
    """

    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, h11.Request) and _head_size(event) > MAX_REQUEST_HEAD:
            raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        return event


class AdminHttpProtocol(H11Protocol):
    """h11, closing a connection whose request head does not arrive in time or is too large (see
    the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _BoundedHead(h11.SERVER, MAX_REQUEST_HEAD)
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
