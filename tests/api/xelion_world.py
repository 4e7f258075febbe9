"""The Xelion servers the admin API tests talk to: real simulators over real sockets on 127.0.0.1.

Each test host name (``pbx-a.example.com``, the manual's ``www.xelionHost.com``, ...) is its own
:class:`~cti_bridge.sim.xelion.XelionSimulator`, as each host is its own phone system in the field: a
tenant exists only on its own host. The production ``HttpXelionDirectory`` reaches them through an
httpx client whose transport plays the part of an ``/etc/hosts`` file (:class:`HostsTransport`): it
sends each request to the port of the simulator of its host name, over plain HTTP, and leaves the
request itself (the Host header, path, body) as the product built it. A host that is *down* points
to a port on 127.0.0.1 where nothing listens, so the connection is really refused.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import httpx

from cti_bridge.sim.xelion import SimTenant, SimUser, XelionSimulator
from cti_bridge.xelion.directory import HttpXelionDirectory


class HostsTransport(httpx.AsyncBaseTransport):
    """An ``/etc/hosts`` for httpx: requests for a known host name go to ``127.0.0.1:<port>``.

    The scheme becomes ``http`` (the simulators do not speak TLS); everything else is sent as built,
    by a real ``httpx.AsyncHTTPTransport``. A host name not in the table fails as an unresolvable
    name would: ``httpx.ConnectError``, before any socket is opened.
    """

    def __init__(self, ports: Mapping[str, int]) -> None:
        self._ports = ports  # host name (lower case) -> port; read at each request
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host.lower()
        port = self._ports.get(host)
        if port is None:
            raise httpx.ConnectError(f"{host}: not in the test's hosts table", request=request)
        request.url = request.url.copy_with(scheme="http", host="127.0.0.1", port=port)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class XelionWorld:
    """The Xelion hosts of one test: a simulator per host name, and the directory that reaches them.

    ``directory`` is the production ``HttpXelionDirectory``; ``sims`` maps each host name (lower
    case) to its simulator. Changes "on the phone system" (a new password, a renamed admin) are made
    on the simulator's users, which it reads at every login.
    """

    def __init__(self) -> None:
        self.sims: dict[str, XelionSimulator] = {}
        self._ports: dict[str, int] = {}
        self._closed: list[socket.socket] = []
        self.client = httpx.AsyncClient(transport=HostsTransport(self._ports))
        self.directory = HttpXelionDirectory(self.client)  # as the application builds it

    async def add_host(
        self, host: str, tenant: str, admin: str, password: str, users: Mapping[str, str]
    ) -> XelionSimulator:
        """Start a simulator for ``host`` with ``tenant``, its admin and its users (userName -> oid).

        The simulator makes up its own oids; the users' are set to the given ones before any request
        (it finds users by name in the tenant's dict, and reads ``oid`` only when answering).
        """
        sim = XelionSimulator()
        await sim.start()
        self.sims[host.lower()] = sim
        self._ports[host.lower()] = sim.port
        sim.add_tenant(tenant)
        sim.add_user(tenant, admin, password, admin=True, common_name="Administrator")
        for user_name, oid in users.items():
            sim.add_user(tenant, user_name, f"{user_name}-password").oid = oid
        return sim

    def add_down_host(self, host: str) -> int:
        """Point ``host`` to a port of 127.0.0.1 where nothing listens: connections are refused.

        The socket stays bound (never listening) until the end, so no other process can take the
        port meanwhile; a connection to it is refused exactly as to a closed one.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._closed.append(sock)
        port = int(sock.getsockname()[1])
        self._ports[host.lower()] = port
        return port

    def tenant(self, host: str, tenant: str) -> SimTenant:
        return self.sims[host.lower()].tenants[tenant]

    def user(self, host: str, tenant: str, user_name: str) -> SimUser:
        return self.tenant(host, tenant).users[user_name]

    def set_password(self, host: str, tenant: str, user_name: str, password: str) -> None:
        """The user's password is changed on the phone system."""
        self.user(host, tenant, user_name).password = password

    def rename_user(self, host: str, tenant: str, old: str, new: str) -> None:
        """The user is renamed on the phone system (same oid, same password)."""
        users = self.tenant(host, tenant).users
        user = users.pop(old)
        user.user_name = new
        users[new] = user

    def live_sessions(self) -> dict[str, int]:
        """Host -> Xelion sessions still logged in there, for the hosts that have any."""
        counts = {host: sim.active_sessions() for host, sim in self.sims.items()}
        return {host: n for host, n in counts.items() if n}

    @property
    def login_attempts(self) -> int:
        """Login requests every simulator received."""
        return sum(sim.stats.login_attempts for sim in self.sims.values())

    async def close(self) -> None:
        await self.client.aclose()
        for sim in self.sims.values():
            await sim.stop()
        for sock in self._closed:
            sock.close()


@asynccontextmanager
async def xelion_world() -> AsyncIterator[XelionWorld]:
    world = XelionWorld()
    try:
        yield world
    finally:
        await world.close()
