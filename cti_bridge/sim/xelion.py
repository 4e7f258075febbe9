"""A simulator of a Xelion tenant server: REST session API and notification websocket on one port.

It implements xelion-protocol.md exactly — no more forgiving, no stricter — so that the tests and
``cti-bridge demo`` exercise the real client code over real sockets:

- ``POST /api/v1/{tenant}/me/login`` with the 10005 rule (§2), ``me/renew`` (bare JSON string body,
  both tokens rotate), ``me/logout``, ``GET me/info``, ``GET users?where=userName=...&limit=&after=``
  (admin only), ``POST me/websocket`` answering a one-time URL
  ``ws://<host>:<port>/websocket/-1/<userOid>/<n>/<secret>`` (§3.1).
- The websocket: nothing until a ``multiNotificationRequest`` / ``notificationRequest`` subscribes
  (toggle ``true``/``false``/``"true"``/``"false"``), ``test`` frames echoed verbatim, only subscribed
  types pushed, call events only to admin sessions (§3.2-§3.5). Pings are answered by hand
  (``autoping=False``) so a test can make the socket half-open.
- A session's websockets close when the session ends (logout, expiry, or a login that ends it);
  **(chosen)**: the protocol is silent, and a websocket outliving its session would hide renewal bugs.
- Errors use the Xelion shape ``{"errorCode", "message", "info"}`` and the codes of §1. A malformed
  request body (not in §1) answers 400 with ``errorCode`` 10001 **(chosen)**.

In-process use (port 0 binds a free port)::

    async with XelionSimulator(token_lifetime=3600) as sim:
        sim.add_tenant("master")
        sim.add_user("master", "admin", "admin-password", admin=True)
        sim.add_user("master", "anne", "anne-password", common_name="Anne Hunter")
        target = sim.target("master")                # a ports.XelionTarget for this server
        await sim.place_call("incoming", caller="+31612345678", callee="anne", duration=42)
        sim.accept_then_close(5.0)                   # fault controls, see the methods below
        assert sim.stats.logins == 1

Standalone (a tenant ``master`` with admin ``admin``/``admin-password`` and users ``anne``, ``bob``,
``carol``, each with password ``<name>-password``)::

    python -m cti_bridge.sim.xelion --port 9100 [--host 127.0.0.1] [--calls-per-second 0.5]
                                    [--token-lifetime 3600]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import random
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

from aiohttp import WSMsgType, web

from cti_bridge.ports import XelionTarget

logger = logging.getLogger(__name__)

CALL_TYPES_NEEDING_ADMIN = frozenset(
    {"newCallEvent", "callConnectedEvent", "callHungUpEvent", "channelHungUpEvent"}
)
XELION_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

_ERRORS: dict[int, tuple[int, str]] = {
    10000: (401, "Not authenticated"),
    10001: (400, "Bad request"),
    10004: (401, "Wrong user name, password or tenant"),
    10005: (401, "Already logged in in this user space"),
    10006: (401, "Account disabled"),
    10100: (404, "Not found"),
    10101: (403, "No permission"),
    10400: (429, "Too many concurrent requests"),
    11000: (500, "Server error"),
}


def _error(code: int, info: str = "") -> web.Response:
    status, message = _ERRORS[code]
    return web.json_response({"errorCode": code, "message": message, "info": info}, status=status)


def _xelion_time(dt: datetime) -> str:
    return dt.strftime(XELION_TIME_FORMAT)


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass
class SimUser:
    """A user of a simulated tenant."""

    user_name: str
    password: str
    oid: str
    person_oid: str
    common_name: str
    phone: str
    admin: bool = False
    active: bool = True


@dataclass
class SimTenant:
    name: str
    users: dict[str, SimUser] = field(default_factory=dict)


@dataclass
class SimSession:
    tenant: SimTenant
    user: SimUser
    user_space: str
    token: str
    renewal_token: str
    expires_at: float  # time.monotonic()
    sockets: set[SimSocket] = field(default_factory=set)
    expiry: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class SimSocket:
    ws: web.WebSocketResponse
    session: SimSession
    subscriptions: set[str] = field(default_factory=set)


@dataclass
class SimStats:
    """Counters the tests read."""

    login_attempts: int = 0
    logins: int = 0
    renews: int = 0
    logouts: int = 0
    websocket_urls: int = 0
    #: Every websocket URL handed out (they carry secrets: for tests that check logs never show them).
    issued_urls: list[str] = field(default_factory=list)
    websocket_attempts: int = 0
    websocket_connects: int = 0
    subscription_frames: list[dict[str, Any]] = field(default_factory=list)
    pushed: int = 0
    #: The close code of every websocket that ended (None: it ended without a close frame).
    close_codes: list[int | None] = field(default_factory=list)


@dataclass(frozen=True)
class PlacedCall:
    """What :meth:`XelionSimulator.place_call` sent: the call id and every frame, in order."""

    call_id: str
    frames: list[tuple[str, dict[str, Any]]]


class XelionSimulator:
    """A Xelion tenant server on ``host``:``port`` (0: any free port); see the module docstring."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token_lifetime: float = 3600.0,
        user_refs: str = "string",
    ) -> None:
        self.host = host
        self.port = port
        self.token_lifetime = token_lifetime
        #: How call events name internal users: "string" (userName) or "object" (a reference, §4).
        self.user_refs = user_refs
        self.tenants: dict[str, SimTenant] = {}
        self.stats = SimStats()
        self._sessions: dict[str, SimSession] = {}  # token -> session
        self._secrets: dict[str, SimSession] = {}  # one-time websocket secret -> session
        self._sockets: set[SimSocket] = set()
        self._oids = itertools.count(1650938)
        self._ws_counter = itertools.count(2045869)
        self._call_counter = itertools.count(1021)
        self._refuse_until = 0.0
        self._accept_close_until = 0.0
        self._pongs_paused = False
        self._echoes_paused = False
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and serve; returns the bound port (also in ``self.port``)."""
        app = web.Application()
        app.router.add_post("/api/v1/{tenant}/me/login", self._login)
        app.router.add_post("/api/v1/{tenant}/me/renew", self._renew)
        app.router.add_post("/api/v1/{tenant}/me/logout", self._logout)
        app.router.add_get("/api/v1/{tenant}/me/info", self._me_info)
        app.router.add_post("/api/v1/{tenant}/me/websocket", self._websocket_url)
        app.router.add_get("/api/v1/{tenant}/users", self._users)
        app.router.add_get("/websocket/-1/{oid}/{n}/{secret}", self._websocket)
        # No access log: websocket paths carry one-time secrets (§3.1).
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        address = self._runner.addresses[0]
        self.port = int(address[1])
        logger.info("Xelion simulator listening on %s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        """Close every socket and stop serving."""
        for task in list(self._tasks):
            task.cancel()
        await self.drop_all_sockets()
        for session in list(self._sessions.values()):
            if session.expiry is not None:
                session.expiry.cancel()
        self._sessions.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> XelionSimulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- tenants and users ------------------------------------------------------------------------

    def add_tenant(self, name: str) -> SimTenant:
        tenant = self.tenants.setdefault(name, SimTenant(name))
        return tenant

    def add_user(
        self,
        tenant: str,
        user_name: str,
        password: str,
        *,
        admin: bool = False,
        common_name: str | None = None,
        phone: str | None = None,
        active: bool = True,
    ) -> SimUser:
        """Add (or replace) a user; oids are digit strings, phones default to ``+3115251141<n>``."""
        t = self.add_tenant(tenant)
        oid = str(next(self._oids))
        user = SimUser(
            user_name=user_name,
            password=password,
            oid=oid,
            person_oid=str(next(self._oids)),
            common_name=common_name or user_name.capitalize(),
            phone=phone or f"+3115251{len(t.users) + 1400:04d}",
            admin=admin,
            active=active,
        )
        t.users[user_name] = user
        return user

    def base_url(self, tenant: str) -> str:
        return f"http://{self.host}:{self.port}/api/v1/{tenant}/"

    def target(self, tenant: str) -> XelionTarget:
        return XelionTarget(protocol="http", host=f"{self.host}:{self.port}", tenant=tenant)

    # -- what tests read --------------------------------------------------------------------------

    def active_sessions(self, user_space: str | None = None) -> int:
        """Live sessions, all or in one userSpace."""
        self._reap()
        return sum(1 for s in self._sessions.values() if user_space is None or s.user_space == user_space)

    def session_is_live(self, token: str | None) -> bool:
        """Whether ``token`` is a live session token (a renewal replaces the old one at once)."""
        self._reap()
        return token is not None and token in self._sessions

    def sessions_by_user_space(self) -> dict[str, int]:
        self._reap()
        counts: dict[str, int] = {}
        for session in self._sessions.values():
            counts[session.user_space] = counts.get(session.user_space, 0) + 1
        return counts

    def subscriptions(self) -> list[frozenset[str]]:
        """The subscribed types of every open socket."""
        return [frozenset(s.subscriptions) for s in self._sockets]

    @property
    def open_sockets(self) -> int:
        return len(self._sockets)

    # -- fault controls ---------------------------------------------------------------------------

    async def drop_all_sockets(self, code: int = 1001) -> int:
        """Close every websocket (default 1001 going away); returns how many."""
        sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(Exception):
                await sock.ws.close(code=code, message=b"simulator drop")
        return len(sockets)

    def refuse_connections(self, seconds: float) -> None:
        """Refuse websocket upgrades (HTTP 503) for ``seconds``."""
        self._refuse_until = time.monotonic() + seconds

    def accept_then_close(self, seconds: float) -> None:
        """For ``seconds``, accept websocket upgrades and close them at once (1011)."""
        self._accept_close_until = time.monotonic() + seconds

    def pause_pongs(self, paused: bool = True) -> None:
        """Stop (or resume) answering pings: open sockets become half-open to the client."""
        self._pongs_paused = paused

    def pause_echoes(self, paused: bool = True) -> None:
        """Stop (or resume) echoing ``test`` frames (§3.3), so a client's probe goes unanswered."""
        self._echoes_paused = paused

    async def expire_all_sessions(self) -> int:
        """End every session as if its token expired (their sockets close); returns how many."""
        sessions = list(self._sessions.values())
        for session in sessions:
            await self._end_session(session)
        return len(sessions)

    # -- call generation --------------------------------------------------------------------------

    async def push(self, notification_type: str, notification: Mapping[str, Any]) -> int:
        """Send one raw notification to every socket subscribed to its type (and allowed to have it,
        §3.5); returns how many sockets it went to."""
        frame = json.dumps({"notificationType": notification_type, "notification": dict(notification)})
        sent = 0
        for sock in list(self._sockets):
            if notification_type not in sock.subscriptions:
                continue
            if notification_type in CALL_TYPES_NEEDING_ADMIN and not sock.session.user.admin:
                continue
            if notification_type == "missedCallEvent" and not sock.session.user.admin:
                # Not in the protocol; a user socket hears only of its own missed calls (chosen).
                names = {notification.get("callerUser"), notification.get("calleeUser")}
                if sock.session.user.user_name not in names:
                    continue
            with contextlib.suppress(Exception):
                await sock.ws.send_str(frame)
                sent += 1
        self.stats.pushed += sent
        return sent

    def _party(self, tenant: SimTenant | None, who: str) -> tuple[str, object]:
        """(phone number, user field) for a party named by user name or phone number."""
        user = tenant.users.get(who) if tenant is not None else None
        if user is None:
            return who, None
        if self.user_refs == "object":
            ref: object = {"commonName": user.common_name, "oid": user.oid, "objectType": "User"}
        else:
            ref = user.user_name
        return user.phone, ref

    async def place_call(
        self,
        kind: str = "incoming",
        *,
        caller: str | None = None,
        callee: str | None = None,
        transfer_to: str | None = None,
        duration: int = 30,
        tenant: str | None = None,
        fields: Mapping[str, Any] | None = None,
        call_id: str | None = None,
        pace: float = 0.0,
    ) -> PlacedCall:
        """Push the notifications of one call, in order (§4); ``pace`` seconds between them.

        ``caller``/``callee``/``transfer_to`` are user names of the tenant (internal parties) or phone
        numbers (outside parties). Kinds: ``incoming`` (outside → user), ``outgoing`` (user → outside),
        ``internal`` (user → user): newCallEvent, callConnectedEvent, callHungUpEvent. ``missed``:
        newCallEvent, missedCallEvent, then a callHungUpEvent with duration 0 (the call still ends,
        chosen). ``attended_transfer``: C (caller) calls A (callee), A consults B (``transfer_to``)
        and transfers: the A-B hang-up is sent twice with the same callId (§4), then C-B connects
        and hangs up. ``fields`` override every notification's fields.
        """
        tenant_obj = self.tenants.get(tenant) if tenant else next(iter(self.tenants.values()), None)
        users = list(tenant_obj.users.values()) if tenant_obj else []
        non_admin = [u.user_name for u in users if not u.admin] or ["anne"]
        outside = "+31612345678"
        if kind == "outgoing":
            caller = caller or non_admin[0]
            callee = callee or outside
        elif kind == "internal":
            caller = caller or non_admin[0]
            callee = callee or (non_admin[1] if len(non_admin) > 1 else non_admin[0])
        else:
            caller = caller or outside
            callee = callee or non_admin[0]
        cid = call_id or f"{int(time.time())}.{next(self._call_counter)}"
        initiation = "outgoing" if kind == "outgoing" else "incoming"
        extra = dict(fields or {})

        def leg(a: str, b: str, event: str, dur: int | None = None) -> tuple[str, dict[str, Any]]:
            a_phone, a_user = self._party(tenant_obj, a)
            b_phone, b_user = self._party(tenant_obj, b)
            body: dict[str, Any] = {
                "callId": cid,
                "initiation": initiation,
                "date": _xelion_time(_utcnow()),
                "callerPhoneNumber": a_phone,
                "calleePhoneNumber": b_phone,
                "callerUser": a_user,
                "calleeUser": b_user,
                "callerFlowId": f"f-{secrets.randbelow(10**5)}" if a_user else None,
                "calleeFlowId": f"f-{secrets.randbelow(10**5)}" if b_user else None,
            }
            if dur is not None:
                body["duration"] = dur
            body.update(extra)
            return event, body

        if kind in ("incoming", "outgoing", "internal"):
            plan = [
                leg(caller, callee, "newCallEvent"),
                leg(caller, callee, "callConnectedEvent"),
                leg(caller, callee, "callHungUpEvent", duration),
            ]
        elif kind == "missed":
            plan = [
                leg(caller, callee, "newCallEvent"),
                leg(caller, callee, "missedCallEvent"),
                leg(caller, callee, "callHungUpEvent", 0),
            ]
        elif kind == "attended_transfer":
            target = transfer_to or (non_admin[1] if len(non_admin) > 1 else non_admin[0])
            hangup = leg(callee, target, "callHungUpEvent", max(1, duration // 3))
            plan = [
                leg(caller, callee, "newCallEvent"),
                leg(caller, callee, "callConnectedEvent"),
                leg(callee, target, "newCallEvent"),
                leg(callee, target, "callConnectedEvent"),
                hangup,
                (hangup[0], dict(hangup[1])),  # Xelion sends the A-B hang-up twice (§4)
                leg(caller, target, "callConnectedEvent"),
                leg(caller, target, "callHungUpEvent", duration),
            ]
        else:
            raise ValueError(f"unknown call kind {kind!r}")
        for index, (event, body) in enumerate(plan):
            if index and pace > 0:
                await asyncio.sleep(pace)
            await self.push(event, body)
        return PlacedCall(call_id=cid, frames=plan)

    def start_traffic(self, calls_per_second: float, tenant: str | None = None) -> None:
        """Place random calls in the background (for the standalone server and the demo)."""
        task = asyncio.create_task(self._traffic(calls_per_second, tenant))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _traffic(self, calls_per_second: float, tenant: str | None) -> None:
        rng = random.Random()
        kinds = ["incoming", "incoming", "outgoing", "internal", "missed", "attended_transfer"]
        while True:
            await asyncio.sleep(rng.expovariate(calls_per_second))
            kind = rng.choice(kinds)
            call = self.place_call(kind, tenant=tenant, duration=rng.randint(5, 600), pace=0.2)
            task = asyncio.create_task(self._quiet(call))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _quiet(call: Any) -> None:
        try:
            await call
        except Exception:
            logger.exception("simulated call failed")

    # -- sessions ---------------------------------------------------------------------------------

    def _reap(self) -> None:
        now = time.monotonic()
        for session in list(self._sessions.values()):
            if session.expires_at <= now:
                self._forget(session)

    def _forget(self, session: SimSession) -> None:
        if self._sessions.get(session.token) is session:
            del self._sessions[session.token]
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        for secret, owner in list(self._secrets.items()):
            if owner is session:
                del self._secrets[secret]
        for sock in list(session.sockets):
            task = asyncio.get_running_loop().create_task(self._close_socket(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _close_socket(self, sock: SimSocket) -> None:
        with contextlib.suppress(Exception):
            await sock.ws.close(code=1008, message=b"session ended")

    async def _end_session(self, session: SimSession) -> None:
        self._forget(session)

    def _schedule_expiry(self, session: SimSession) -> None:
        if session.expiry is not None:
            session.expiry.cancel()
        delay = max(0.0, session.expires_at - time.monotonic())
        session.expiry = asyncio.get_running_loop().call_later(delay, self._forget, session)

    def _authenticated(self, request: web.Request) -> SimSession | None:
        self._reap()
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "xelion" or not token:
            return None
        session = self._sessions.get(token.strip())
        if session is None or session.tenant.name != request.match_info["tenant"]:
            return None
        return session

    def _login_body(self, session: SimSession) -> dict[str, Any]:
        # validUntil has whole seconds; truncating keeps it at or before the real expiry.
        valid_until = _utcnow() + timedelta(seconds=max(0.0, session.expires_at - time.monotonic()))
        return {
            "authentication": session.token,
            "renewalToken": session.renewal_token,
            "validUntil": _xelion_time(valid_until),
            "version": "1.1",
            "serverVersion": "6 update 20 (simulated)",
            "buildNumber": "20171004.1",
        }

    async def _login(self, request: web.Request) -> web.Response:
        self.stats.login_attempts += 1
        try:
            body = json.loads(await request.text())
        except ValueError:
            return _error(10001, "body is not JSON")
        if not isinstance(body, dict):
            return _error(10001, "body is not an object")
        user_name, password = body.get("userName"), body.get("password")
        user_space = body.get("userSpace", "")
        if not isinstance(user_name, str) or not isinstance(password, str) or not isinstance(user_space, str):
            return _error(10001, "userName and password are required")
        tenant = self.tenants.get(request.match_info["tenant"])
        user = tenant.users.get(user_name) if tenant else None
        if tenant is None or user is None or not secrets.compare_digest(user.password, password):
            return _error(10004)
        if not user.active:
            return _error(10006)
        self._reap()
        existing = next(
            (
                s
                for s in self._sessions.values()
                if s.tenant is tenant and s.user is user and s.user_space == user_space
            ),
            None,
        )
        if existing is not None:
            # §2: only the old session's own token in Authorization ends it.
            presented = self._authenticated(request)
            if presented is not existing:
                return _error(10005, f"userSpace {user_space!r} is in use")
            self._forget(existing)
        session = SimSession(
            tenant=tenant,
            user=user,
            user_space=user_space,
            token=secrets.token_hex(20),
            renewal_token=secrets.token_hex(20),
            expires_at=time.monotonic() + self.token_lifetime,
        )
        self._sessions[session.token] = session
        self._schedule_expiry(session)
        self.stats.logins += 1
        return web.json_response(self._login_body(session))

    async def _renew(self, request: web.Request) -> web.Response:
        session = self._authenticated(request)
        if session is None:
            return _error(10000)
        try:
            body = json.loads(await request.text())
        except ValueError:
            return _error(10001, "body is not JSON")
        if not isinstance(body, str):
            return _error(10001, "body must be the renewal token as a JSON string")
        if not secrets.compare_digest(body, session.renewal_token):
            return _error(10000, "wrong renewal token")
        del self._sessions[session.token]
        session.token = secrets.token_hex(20)
        session.renewal_token = secrets.token_hex(20)
        session.expires_at = time.monotonic() + self.token_lifetime
        self._sessions[session.token] = session
        self._schedule_expiry(session)
        self.stats.renews += 1
        return web.json_response(self._login_body(session))

    async def _logout(self, request: web.Request) -> web.Response:
        session = self._authenticated(request)
        if session is None:
            return _error(10000)
        self._forget(session)
        self.stats.logouts += 1
        return web.Response(status=200)

    async def _me_info(self, request: web.Request) -> web.Response:
        session = self._authenticated(request)
        if session is None:
            return _error(10000)
        user = session.user
        return web.json_response(
            {
                "object": {
                    "userId": user.oid,
                    "userName": user.user_name,
                    "person": {"oid": user.person_oid, "commonName": user.common_name},
                }
            }
        )

    async def _users(self, request: web.Request) -> web.Response:
        session = self._authenticated(request)
        if session is None:
            return _error(10000)
        if not session.user.admin:
            return _error(10101)
        users = sorted(session.tenant.users.values(), key=lambda u: int(u.oid))
        where = request.query.get("where")
        if where is not None:
            key, sep, value = where.partition("=")
            if not sep or key != "userName":
                return _error(10001, "where supports userName=<name>")
            users = [u for u in users if u.user_name == value]
        try:
            limit = int(request.query.get("limit", "100"))
            after = request.query.get("after")
            after_oid = int(after) if after is not None else None
        except ValueError:
            return _error(10001, "limit and after must be numbers")
        if limit < 1:
            return _error(10001, "limit must be positive")
        if after_oid is not None:
            users = [u for u in users if int(u.oid) > after_oid]
        page, rest = users[:limit], users[limit:]
        paging: dict[str, str] = {}
        if page:
            paging["previousId"] = page[0].oid
        if rest:
            paging["nextId"] = page[-1].oid
        data = [
            {
                "object": {
                    "oid": u.oid,
                    "objectType": "User",
                    "userName": u.user_name,
                    "commonName": u.common_name,
                    "active": u.active,
                }
            }
            for u in page
        ]
        return web.json_response({"data": data, "meta": {"paging": paging}})

    async def _websocket_url(self, request: web.Request) -> web.Response:
        session = self._authenticated(request)
        if session is None:
            return _error(10000)
        secret = secrets.token_urlsafe(12)
        self._secrets[secret] = session
        self.stats.websocket_urls += 1
        url = (
            f"ws://{self.host}:{self.port}/websocket/-1/{session.user.oid}/{next(self._ws_counter)}/{secret}"
        )
        self.stats.issued_urls.append(url)
        return web.json_response({"object": url})

    # -- the websocket ----------------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        self.stats.websocket_attempts += 1
        if time.monotonic() < self._refuse_until:
            return web.Response(status=503, text="refused by the simulator")
        secret = request.match_info["secret"]
        session = self._secrets.pop(secret, None)  # one-time (§3.1)
        self._reap()
        if (
            session is None
            or self._sessions.get(session.token) is not session
            or session.user.oid != request.match_info["oid"]
        ):
            return web.Response(status=403, text="unknown or used websocket secret")
        ws = web.WebSocketResponse(autoping=False, heartbeat=None)
        await ws.prepare(request)
        self.stats.websocket_connects += 1
        if time.monotonic() < self._accept_close_until:
            await ws.close(code=1011, message=b"simulator accept-then-close")
            return ws
        sock = SimSocket(ws=ws, session=session)
        self._sockets.add(sock)
        session.sockets.add(sock)
        try:
            async for msg in ws:
                if msg.type is WSMsgType.PING:
                    if not self._pongs_paused:
                        await ws.pong(msg.data)
                elif msg.type is WSMsgType.TEXT:
                    await self._on_text(sock, msg.data)
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                    break
        finally:
            self._sockets.discard(sock)
            session.sockets.discard(sock)
            self.stats.close_codes.append(ws.close_code)
        return ws

    async def _on_text(self, sock: SimSocket, text: str) -> None:
        try:
            data = json.loads(text)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        message_type = data.get("messageType")
        if message_type == "test":
            if not self._echoes_paused:
                await sock.ws.send_str(text)  # echoed verbatim (§3.3)
        elif message_type == "multiNotificationRequest":
            self.stats.subscription_frames.append(data)
            items = data.get("notifications")
            if isinstance(items, list):
                for item in items:
                    if isinstance(item, dict):
                        self._toggle(sock, item)
        elif message_type == "notificationRequest":
            self.stats.subscription_frames.append(data)
            self._toggle(sock, data)

    @staticmethod
    def _toggle(sock: SimSocket, item: Mapping[str, Any]) -> None:
        notification_type = item.get("notificationType")
        toggle = item.get("toggle")
        if not isinstance(notification_type, str):
            return
        if toggle is True or toggle == "true":
            sock.subscriptions.add(notification_type)
        elif toggle is False or toggle == "false":
            sock.subscriptions.discard(notification_type)


def add_demo_tenant(sim: XelionSimulator, tenant: str = "master") -> None:
    """The standalone default: admin ``admin``/``admin-password``; anne, bob, carol (``<name>-password``)."""
    sim.add_tenant(tenant)
    sim.add_user(tenant, "admin", "admin-password", admin=True, common_name="Administrator")
    sim.add_user(tenant, "anne", "anne-password", common_name="Anne Hunter")
    sim.add_user(tenant, "bob", "bob-password", common_name="Bob Jansen")
    sim.add_user(tenant, "carol", "carol-password", common_name="Carol de Vries")


async def _serve(args: argparse.Namespace) -> None:
    sim = XelionSimulator(host=args.host, port=args.port, token_lifetime=args.token_lifetime)
    add_demo_tenant(sim)
    async with sim:
        print(f"Xelion simulator: {sim.base_url('master')}  (admin / admin-password)", flush=True)
        if args.calls_per_second > 0:
            sim.start_traffic(args.calls_per_second)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A simulated Xelion tenant server (REST + websocket).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--calls-per-second", type=float, default=0.0)
    parser.add_argument("--token-lifetime", type=float, default=3600.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
