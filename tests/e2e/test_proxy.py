"""The daemon reaches Xelion through the proxy of its environment (``HTTPS_PROXY``, ``HTTP_PROXY``,
``NO_PROXY``), for the websocket as for the REST calls. The REST client (httpx) honoured them; the
websocket connected directly, so where only the proxy reaches Xelion the logins went through and
every websocket attempt failed, the integration in backoff for ever (a protocol review's finding)."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from tests.e2e.stack import running_stack


class ConnectProxy:
    """An HTTP proxy on 127.0.0.1 that tunnels CONNECT requests and forwards plain ones, noting
    which reached it (as a corporate network's proxy would see the daemon)."""

    def __init__(self) -> None:
        self.connects: list[str] = []
        self.forwarded: list[str] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            head = await client_r.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            if method == "CONNECT":
                self.connects.append(target)
                host, port = target.rsplit(":", 1)
                server_r, server_w = await asyncio.open_connection(host, int(port))
                client_w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:  # a plain-HTTP client's absolute-form request: passed on as it is
                self.forwarded.append(f"{method} {target}")
                url = httpx.URL(target)
                server_r, server_w = await asyncio.open_connection(url.host, url.port)
                server_w.write(head)
            await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))

    async def stop(self) -> None:
        self.server.close()


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    with contextlib.suppress(Exception):
        w.close()


async def test_the_websocket_goes_through_the_environments_proxy_as_the_rest_calls_do(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = ConnectProxy()
    address = await proxy.start()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, address)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    try:
        async with running_stack(db_url) as st:
            await st.configure(users=("anne",), mappings=[st.mapping("callHungUpEvent")])
            await st.xelion.place_call("incoming", callee="anne")
            [item] = await st.wait_settled(1)
            assert item["state"] == "delivered"
            xelion_port = st.xelion.port
    finally:
        await proxy.stop()
    assert any(line.startswith("POST ") and "/me/login" in line for line in proxy.forwarded), proxy.forwarded
    assert f"127.0.0.1:{xelion_port}" in proxy.connects, proxy.connects  # the websocket, tunnelled
