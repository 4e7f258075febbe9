"""A CRM simulator with an OAuth2 token server, for the tests, the demo and the benchmarks.

What it does:

- ``POST /oauth2/token``: the refresh-token grant (client authentication by ``client_secret_post``
  or ``client_secret_basic``, both validated), the device-code grant of RFC 8628 with a scriptable
  number of ``authorization_pending`` answers, short-lived access tokens (``expires_in``
  configurable, or omitted as Salesforce does), optional refresh-token rotation (the old refresh
  token is then invalid), ``invalid_grant`` on demand (per refresh token or for all), Zoho's
  ``200 {"error": "invalid_code"}`` style, extra fields in the answer (``instance_url``,
  ``api_domain``), scripted failures, and counters per grant type.
- Any other method and path: a CRM endpoint. It records what it received (method, path, raw
  query, headers, body, arrival time, the status it answered), checks that ``Authorization`` carries a
  currently valid access token (401 otherwise; can be disabled), and answers scripted failures from
  a queue or per-path rules: any status, 429 with ``Retry-After``, 401, slow answers, or a dropped
  connection (the request is recorded, then the connection is closed without an answer).
- ``/_sim/...``: a small control API for a standalone simulator (``python -m cti_bridge.sim.crm``):
  ``POST /_sim/clients`` registers a client and returns a refresh token; ``GET /_sim/stats``;
  ``POST /_sim/device-codes`` makes a device code; ``POST``/``DELETE /_sim/failures`` scripts failures.

The CRM hot path is kept minimal (a low-level ``aiohttp.web.Server`` without a router or access
log; one list append per request) because the throughput benchmarks drive it at ~10,000 requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import contextlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web
from multidict import CIMultiDictProxy

TOKEN_PATH = "/oauth2/token"  # noqa: S105 - a path, not a secret
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_OK_BODY = b'{"ok":true}'
_JSON = "application/json"
#: Form fields of a token request that ``TokenRequest.params`` leaves out (they are secrets or kept apart).
_SECRET_FORM_FIELDS = frozenset(
    {"grant_type", "client_id", "client_secret", "refresh_token", "device_code", "code"}
)


@dataclass(slots=True)
class Received:
    """One request to a CRM endpoint, as it arrived."""

    method: str
    path: str
    query: str  # raw, percent-encoding kept
    headers: CIMultiDictProxy[str]
    body: bytes
    at: float  # time.time() on arrival
    status: int = 0  # what the simulator answered; 0 for a dropped connection

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class Failure:
    """A scripted answer. ``status=None`` answers normally (after ``delay``); ``drop`` closes the
    connection without answering, after the request was recorded."""

    status: int | None = 500
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b'{"error":"scripted failure"}'
    delay: float = 0.0
    drop: bool = False

    @classmethod
    def http(cls, status: int, body: bytes = b'{"error":"scripted failure"}') -> Failure:
        return cls(status=status, body=body)

    @classmethod
    def retry_after(cls, value: str | float, status: int = 429) -> Failure:
        text = value if isinstance(value, str) else str(int(value))
        return cls(status=status, headers={"Retry-After": text})

    @classmethod
    def unauthorized(cls) -> Failure:
        return cls(status=401, body=b'{"error":"invalid_token"}')

    @classmethod
    def slow(cls, seconds: float, status: int | None = None) -> Failure:
        return cls(status=status, delay=seconds)

    @classmethod
    def dropped(cls, delay: float = 0.0) -> Failure:
        return cls(status=None, drop=True, delay=delay)


@dataclass(slots=True)
class _Rule:
    path_prefix: str
    failure: Failure
    times: int | None  # None: for ever


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """One request to the token endpoint (secrets left out)."""

    grant_type: str
    client_id: str | None
    auth_method: str  # client_secret_basic | client_secret_post | none
    at: float
    status: int
    #: The request's other form parameters (``scope``, ``resource``, ...), secrets left out.
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _DeviceCode:
    client_id: str
    pending: int
    slow_down: int
    interval: int


TokenHook = Callable[[str], Awaitable[None]]


class CrmSimulator:
    """The simulator. ``async with CrmSimulator() as sim:`` or ``await sim.start()`` /
    ``await sim.stop()``; ``port=0`` picks a free port, ``sim.url`` tells which."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, auth_required: bool = True) -> None:
        self.host = host
        self.port = port
        self.auth_required = auth_required
        # --- token endpoint behaviour -------------------------------------------------------
        self.expires_in: int | None = 3600  # None: omit expires_in (Salesforce)
        self.rotate_refresh_tokens = False
        self.extra_fields: dict[str, Any] = {}
        self.invalid_grant_all = False
        self.error_style = "standard"  # or "zoho": 200 {"error": "invalid_code"}
        self.token_failures: collections.deque[Failure] = collections.deque()
        # Awaited with the grant type before a token request is answered: lets a test act
        # "during a refresh" deterministically.
        self.token_hook: TokenHook | None = None
        self.token_requests: list[TokenRequest] = []
        self.token_counts: collections.Counter[str] = collections.Counter()
        # Accept the access token in this query parameter too (CRM.COM's ``token``).
        self.token_query_param: str | None = None
        # --- state ------------------------------------------------------------------------------
        self.received: list[Received] = []
        self._clients: dict[str, str] = {}
        self._refresh_tokens: dict[str, str] = {}  # refresh token -> client id
        self._access_tokens: dict[str, float | None] = {}  # access token -> monotonic expiry
        self._device_codes: dict[str, _DeviceCode] = {}
        self._queue: collections.deque[Failure] = collections.deque()
        self._rules: list[_Rule] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._runner: web.ServerRunner | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on ``host:port`` (port 0: a free one)."""
        server = web.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        address = self._runner.addresses[0]
        self.port = int(address[1])

    async def stop(self) -> None:
        """Close the listener and every connection. Slow handlers still sleeping are cancelled."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for _, fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()

    async def __aenter__(self) -> CrmSimulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def token_url(self) -> str:
        return self.url + TOKEN_PATH

    # --- registry for tests --------------------------------------------------------------------

    def add_client(self, client_id: str, client_secret: str) -> None:
        self._clients[client_id] = client_secret

    def issue_refresh_token(self, client_id: str) -> str:
        """A new valid refresh token of a registered client."""
        if client_id not in self._clients:
            raise KeyError(f"unknown client {client_id}")
        token = "rt-" + secrets.token_urlsafe(24)
        self._refresh_tokens[token] = client_id
        return token

    def refresh_token_valid(self, token: str) -> bool:
        return token in self._refresh_tokens

    def current_refresh_tokens(self, client_id: str) -> list[str]:
        return [t for t, c in self._refresh_tokens.items() if c == client_id]

    def revoke_refresh_token(self, token: str) -> None:
        """The next refresh with ``token`` gets ``invalid_grant``."""
        self._refresh_tokens.pop(token, None)

    def issue_access_token(self, client_id: str = "", expires_in: float | None = None) -> str:
        """A valid access token without a token request (for CRM-endpoint tests)."""
        token = "at-" + secrets.token_urlsafe(24)
        self._access_tokens[token] = None if expires_in is None else time.monotonic() + expires_in
        return token

    def access_token_valid(self, token: str) -> bool:
        if token not in self._access_tokens:
            return False
        expiry = self._access_tokens[token]
        return expiry is None or time.monotonic() < expiry

    def revoke_access_tokens(self) -> None:
        """Every access token issued so far becomes invalid (a CRM answering 401)."""
        self._access_tokens.clear()

    def add_device_code(
        self, client_id: str, pending: int = 0, *, slow_down: int = 0, interval: int = 5
    ) -> str:
        """A device code that answers ``slow_down`` ``slow_down``s, then ``pending``
        ``authorization_pending``s, then tokens (once; it is consumed)."""
        if client_id not in self._clients:
            raise KeyError(f"unknown client {client_id}")
        code = "dc-" + secrets.token_urlsafe(18)
        self._device_codes[code] = _DeviceCode(client_id, pending, slow_down, interval)
        return code

    # --- scripting the CRM endpoints --------------------------------------------------------

    def script(self, *failures: Failure) -> None:
        """The next requests (any path) get these answers, in order."""
        self._queue.extend(failures)

    def add_rule(self, path_prefix: str, failure: Failure, times: int | None = None) -> None:
        """Requests whose path starts with ``path_prefix`` get ``failure`` (``times`` times)."""
        self._rules.append(_Rule(path_prefix, failure, times))

    def clear_rules(self) -> None:
        self._rules.clear()
        self._queue.clear()

    def reset(self) -> None:
        """Forget what was received and the counters (not the clients and tokens)."""
        self.received.clear()
        self.token_requests.clear()
        self.token_counts.clear()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:  # noqa: ASYNC109
        """Wait until at least ``count`` CRM requests were received; raises TimeoutError.

        Cancellation: the wait ends; nothing else changes.
        """
        if len(self.received) < count:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (count, fut)
            self._waiters.append(entry)
            try:
                await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise TimeoutError(
                    f"the CRM simulator received {len(self.received)} requests, not {count}, in {timeout} s"
                ) from None
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
        return self.received

    def _notify(self) -> None:
        n = len(self.received)
        for count, fut in self._waiters:
            if n >= count and not fut.done():
                fut.set_result(None)

    # --- request handling -------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path == TOKEN_PATH:
            return await self._token(request)
        if path.startswith("/_sim/"):
            return await self._control(request, path)
        body = await request.read()
        # The raw query (percent-encoding kept), as a CRM would log it.
        query = request.raw_path.partition("?")[2]
        rec = Received(request.method, path, query, request.headers, body, time.time())
        self.received.append(rec)
        if self._waiters:
            self._notify()
        if self._queue or self._rules:
            failure = self._next_failure(path)
            if failure is not None:
                answer = await self._fail(request, rec, failure)
                if answer is not None:
                    return answer
        if self.auth_required and not self._authorized(request):
            rec.status = 401
            return web.Response(status=401, body=b'{"error":"invalid_token"}', content_type=_JSON)
        rec.status = 201 if request.method == "POST" else 200
        return web.Response(status=rec.status, body=_OK_BODY, content_type=_JSON)

    def _next_failure(self, path: str) -> Failure | None:
        if self._queue:
            return self._queue.popleft()
        for rule in self._rules:
            if path.startswith(rule.path_prefix):
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self._rules.remove(rule)
                return rule.failure
        return None

    async def _fail(
        self, request: web.BaseRequest, rec: Received, failure: Failure
    ) -> web.StreamResponse | None:
        if failure.delay:
            await asyncio.sleep(failure.delay)
        if failure.drop:
            rec.status = 0
            if request.transport is not None:
                request.transport.abort()
            # Raising makes aiohttp give up on this connection without writing an answer.
            raise asyncio.CancelledError
        if failure.status is None:
            return None
        rec.status = failure.status
        return web.Response(
            status=failure.status, body=failure.body, headers=dict(failure.headers), content_type=_JSON
        )

    def _authorized(self, request: web.BaseRequest) -> bool:
        header = request.headers.get("Authorization")
        token: str | None = None
        if header:
            token = header.rsplit(" ", 1)[-1]
        elif self.token_query_param is not None:
            token = request.query.get(self.token_query_param)
        return token is not None and self.access_token_valid(token)

    # --- the token endpoint -------------------------------------------------------------------------

    async def _token(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method != "POST":
            return _json(405, {"error": "invalid_request"})
        form = await request.post()
        params = {k: str(v) for k, v in form.items()}
        grant_type = params.get("grant_type", "")
        client_id, secret, auth_method = _client_auth(request, params)
        self.token_counts[grant_type] += 1
        if self.token_hook is not None:
            await self.token_hook(grant_type)
        response = await self._token_answer(request, grant_type, client_id, secret, params)
        self.token_requests.append(
            TokenRequest(
                grant_type,
                client_id,
                auth_method,
                time.time(),
                response.status,
                {k: v for k, v in params.items() if k not in _SECRET_FORM_FIELDS},
            )
        )
        return response

    async def _token_answer(
        self,
        request: web.BaseRequest,
        grant_type: str,
        client_id: str | None,
        secret: str | None,
        params: dict[str, str],
    ) -> web.Response:
        if self.token_failures:
            failure = self.token_failures.popleft()
            if failure.delay:
                await asyncio.sleep(failure.delay)
            if failure.drop:
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
            if failure.status is not None:
                return web.Response(
                    status=failure.status,
                    body=failure.body,
                    headers=dict(failure.headers),
                    content_type=_JSON,
                )
        if client_id is None or self._clients.get(client_id) != secret:
            return self._error(401, "invalid_client")
        if grant_type == "refresh_token":
            refresh_token = params.get("refresh_token", "")
            owner = self._refresh_tokens.get(refresh_token)
            if self.invalid_grant_all or owner != client_id:
                return self._error(400, "invalid_grant")
            new_refresh: str | None = None
            if self.rotate_refresh_tokens:
                del self._refresh_tokens[refresh_token]
                new_refresh = self.issue_refresh_token(client_id)
            return self._tokens(client_id, new_refresh)
        if grant_type == DEVICE_CODE_GRANT:
            device = self._device_codes.get(params.get("device_code", ""))
            if self.invalid_grant_all or device is None or device.client_id != client_id:
                return self._error(400, "invalid_grant")
            if device.slow_down > 0:
                device.slow_down -= 1
                device.interval += 5  # RFC 8628 §3.5
                return self._error(400, "slow_down")
            if device.pending > 0:
                device.pending -= 1
                return self._error(400, "authorization_pending")
            del self._device_codes[params["device_code"]]
            return self._tokens(client_id, self.issue_refresh_token(client_id))
        return self._error(400, "unsupported_grant_type")

    def _tokens(self, client_id: str, refresh_token: str | None) -> web.Response:
        access = self.issue_access_token(client_id, self.expires_in)
        doc: dict[str, Any] = {"access_token": access, "token_type": "Bearer"}
        if self.expires_in is not None:
            doc["expires_in"] = self.expires_in
        if refresh_token is not None:
            doc["refresh_token"] = refresh_token
        doc.update(self.extra_fields)
        return _json(200, doc)

    def _error(self, status: int, error: str) -> web.Response:
        if self.error_style == "zoho" and error == "invalid_grant":
            # Zoho answers a dead refresh token with 200 and {"error": "invalid_code"}.
            return _json(200, {"error": "invalid_code"})
        return _json(status, {"error": error, "error_description": f"simulated {error}"})

    # --- control API for a standalone simulator --------------------------------------------------

    async def _control(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        if path == "/_sim/clients" and request.method == "POST":
            doc = await request.json()
            client_id, client_secret = str(doc["client_id"]), str(doc["client_secret"])
            self.add_client(client_id, client_secret)
            return _json(201, {"client_id": client_id, "refresh_token": self.issue_refresh_token(client_id)})
        if path == "/_sim/stats" and request.method == "GET":
            return _json(
                200,
                {"received": len(self.received), "token_requests": dict(self.token_counts)},
            )
        if path == "/_sim/reset" and request.method == "POST":
            self.reset()
            return _json(200, {"ok": True})
        if path == "/_sim/device-codes" and request.method == "POST":
            # A device code its user approves after ``pending`` polls (answered authorization_pending).
            doc = await request.json()
            code = self.add_device_code(str(doc["client_id"]), int(doc.get("pending", 0)))
            return _json(201, {"device_code": code})
        if path == "/_sim/failures" and request.method == "POST":
            # The next ``times`` requests under ``path`` get ``status`` (with ``retry_after``), or,
            # with ``drop``, a connection closed without an answer.
            doc = await request.json()
            retry_after = doc.get("retry_after")
            failure = (
                Failure.dropped()
                if doc.get("drop")
                else Failure(
                    status=int(doc.get("status", 503)),
                    headers={"Retry-After": str(retry_after)} if retry_after is not None else {},
                )
            )
            times = doc.get("times", 1)
            self.add_rule(str(doc.get("path", "/")), failure, None if times is None else int(times))
            return _json(201, {"ok": True})
        if path == "/_sim/failures" and request.method == "DELETE":
            self.clear_rules()
            return _json(200, {"ok": True})
        return _json(404, {"error": "unknown control path"})


def _client_auth(request: web.BaseRequest, params: dict[str, str]) -> tuple[str | None, str | None, str]:
    header = request.headers.get("Authorization", "")
    if header[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("latin1")
        except (binascii.Error, ValueError):
            return None, None, "client_secret_basic"
        user, _, password = decoded.partition(":")
        # RFC 6749 §2.3.1: the id and secret are form-urlencoded before Basic encoding.
        return unquote_plus(user), unquote_plus(password), "client_secret_basic"
    if "client_secret" in params:
        return params.get("client_id"), params["client_secret"], "client_secret_post"
    return params.get("client_id"), None, "none"


def _json(status: int, doc: object) -> web.Response:
    return web.Response(status=status, body=json.dumps(doc).encode(), content_type=_JSON)


async def _serve(args: argparse.Namespace) -> None:
    sim = CrmSimulator(args.host, args.port, auth_required=not args.no_auth)
    sim.expires_in = args.expires_in if args.expires_in > 0 else None
    sim.rotate_refresh_tokens = args.rotate
    await sim.start()
    print(f"CRM simulator listening on {sim.url} (token endpoint {sim.token_url})", flush=True)
    for entry in args.client:
        client_id, _, client_secret = entry.partition(":")
        sim.add_client(client_id, client_secret)
        # A standalone simulator's refresh token is for a local demo, printed deliberately.
        print(f"client {client_id}: refresh token {sim.issue_refresh_token(client_id)}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="CRM simulator with an OAuth2 token endpoint")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--no-auth", action="store_true", help="accept CRM requests without a token")
    parser.add_argument("--expires-in", type=int, default=3600, help="0 omits expires_in (Salesforce)")
    parser.add_argument("--rotate", action="store_true", help="rotate refresh tokens")
    parser.add_argument("--client", action="append", default=[], metavar="ID:SECRET")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
