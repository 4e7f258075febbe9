"""A raw HTTP test server's listener, shared by the transport tests (test_http1.py) and the worker's
(test_worker_send.py): each has its own way of reading and answering requests (``serve``), and
both need the same start on a free port and the same cleanup of the connections left open."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar


class Serves(Protocol):
    """A server object: answers one connection (``serve``), tracks the tasks doing so, and learns
    its port."""

    port: int
    _tasks: set[asyncio.Task[None]]

    @property
    def serve(self) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]: ...


S = TypeVar("S", bound=Serves)


@contextlib.asynccontextmanager
async def serving(srv: S, host: str = "127.0.0.1", **kwargs: Any) -> AsyncIterator[S]:
    """``srv`` listening on ``host`` (a free port) for the block; its connections closed after."""
    listener = await asyncio.start_server(srv.serve, host, 0, **kwargs)
    srv.port = listener.sockets[0].getsockname()[1]
    try:
        yield srv
    finally:
        listener.close()
        for task in list(srv._tasks):
            task.cancel()
        await asyncio.gather(*srv._tasks, return_exceptions=True)
        await listener.wait_closed()
