"""The Xelion REST session: login, renew, logout, and the few calls cti-bridge makes with it.

Everything here follows xelion-protocol.md §1-§2. One :class:`XelionSession` is one logged-in Xelion
session in one ``userSpace``; it is built around an injected ``httpx.AsyncClient`` so that the
application and the tests share one connection pool and one set of timeouts.

Errors from Xelion (``{"errorCode", "message", "info"}``) and from the network become one small
exception tree rooted at :class:`XelionError`, whose ``kind`` says what went wrong without carrying a
secret. Passwords, tokens and websocket URLs (their path is a credential, §3.1) are never logged: log
lines name the host and tenant only.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx

from cti_bridge.clock import Clock, SystemClock
from cti_bridge.events import parse_xelion_time
from cti_bridge.ports import XelionTarget, XelionUser
from cti_bridge.render import echo_forms, mask_message

logger = logging.getLogger(__name__)

#: Xelion error codes that matter (xelion-protocol.md §1).
NOT_AUTHENTICATED = 10000
WRONG_CREDENTIALS = 10004
ALREADY_LOGGED_IN = 10005
ACCOUNT_DISABLED = 10006
NOT_FOUND = 10100
NO_PERMISSION = 10101
TOO_MANY_REQUESTS = 10400
SERVER_ERROR = 11000

#: How many suffixed userSpaces (``-1`` .. ``-5``) a login tries after 401/10005 (§2, chosen).
USER_SPACE_SUFFIXES = 5

#: Renew when this share of the time to ``validUntil`` has passed (§2, chosen).
RENEW_AT = 0.8
#: When Xelion's validUntil tells nothing usable: renew this often (seconds) rather than every few.
UNKNOWN_EXPIRY_RENEW = 600.0
PAST_EXPIRY_RENEW = 60.0
#: A difference between Xelion's clock and this host's that is worth a warning (seconds).
CLOCK_SKEW_WARNING = 60.0


def _server_time(response: httpx.Response) -> datetime | None:
    """When the server answered, by its ``Date`` header; None without one that reads."""
    text = response.headers.get("date")
    if not text:
        return None
    try:
        at = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


_KIND_BY_CODE = {
    NOT_AUTHENTICATED: "not_authenticated",
    WRONG_CREDENTIALS: "credentials",
    ALREADY_LOGGED_IN: "already_logged_in",
    ACCOUNT_DISABLED: "disabled",
    NO_PERMISSION: "forbidden",
    NOT_FOUND: "not_found",
    TOO_MANY_REQUESTS: "busy",
    SERVER_ERROR: "server",
}
_KIND_BY_STATUS = {401: "not_authenticated", 403: "forbidden", 404: "not_found", 429: "busy"}


class XelionError(Exception):
    """Anything that went wrong talking to Xelion. The message never carries a secret.

    ``kind`` is one of ``not_authenticated`` (401/10000), ``credentials`` (401/10004),
    ``already_logged_in`` (401/10005, also when every userSpace suffix was taken), ``disabled``
    (10006), ``forbidden`` (403/10101), ``not_found`` (404/10100), ``busy`` (429/10400), ``server``
    (5xx/11000), ``http`` (another status), ``unreachable`` (connection failed or timed out) or
    ``protocol`` (an answer we could not read).
    """

    def __init__(
        self, kind: str, message: str, *, status: int | None = None, error_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.error_code = error_code

    @property
    def permanent(self) -> bool:
        """True when retrying with the same credentials cannot help (§3.6: stop the loop)."""
        return self.kind in ("credentials", "disabled")


class XelionApiError(XelionError):
    """Xelion answered with an error status (and usually its error body)."""


class XelionUnreachable(XelionError):
    """The request did not get an answer: connection refused, DNS, timeout."""

    def __init__(self, message: str) -> None:
        super().__init__("unreachable", message)


class XelionProtocolError(XelionError):
    """Xelion answered something we could not read."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__("protocol", message, status=status)


def error_from_response(response: httpx.Response, what: str, secrets: Iterable[str] = ()) -> XelionApiError:
    """Turn an error response into a :class:`XelionApiError`, reading the Xelion error shape (§1).
    ``secrets`` (what the request carried: a password, tokens) are masked out of Xelion's message,
    which the error's text, its log lines and the admin API's answers quote."""
    code: int | None = None
    server_message = ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        raw_code = body.get("errorCode")
        if isinstance(raw_code, int) and not isinstance(raw_code, bool):
            code = raw_code
        elif isinstance(raw_code, str) and raw_code.isdigit():
            code = int(raw_code)
        if isinstance(body.get("message"), str):
            # Xelion's own messages are fixed texts ("Wrong user name, password or tenant"), but a
            # server or a proxy in front of it may quote the request it could not process: masked
            # whole before it is cut, so that no piece of a secret stays, and a secret it quoted
            # cut short as well (``mask_message``).
            # The forms a server quotes a value in (a JSON string's among them): render's, one list.
            forms = [form for secret in secrets for form in echo_forms(secret)]
            server_message = mask_message(body["message"], forms)[:200]
    status = response.status_code
    kind = _KIND_BY_CODE.get(code or 0) or _KIND_BY_STATUS.get(status)
    if kind is None:
        kind = "server" if status >= 500 else "http"
    text = f"{what}: Xelion answered {status}"
    if code is not None:
        text += f"/{code}"
    if server_message:
        text += f" ({server_message})"
    return XelionApiError(kind, text, status=status, error_code=code)


def _auth_header(token: str | None) -> dict[str, str]:
    return {"Authorization": f"xelion {token}"} if token else {}


class XelionSession:
    """One Xelion session of one user in one ``userSpace`` (xelion-protocol.md §2).

    ``stored_token`` is the token of this user's previous live session in ``user_space`` (for the
    source: kept encrypted by the store); :meth:`login` presents it so that Xelion ends that session
    instead of answering 10005. ``on_token`` is awaited with every new token (login, renew) and with
    ``None`` after logout, so the caller can persist it.

    Cancellation: every coroutine here may be cancelled at an await; the session then keeps the last
    tokens it fully received, which is what a retry needs.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        target: XelionTarget,
        username: str,
        password: str,
        user_space: str,
        *,
        app_key: str | None = None,
        stored_token: str | None = None,
        on_token: Callable[[str | None], Awaitable[None]] | None = None,
        clock: Clock | None = None,
        timeout: float = 15.0,
    ) -> None:
        self._client = client
        self.target = target
        self._username = username
        self._password = password
        self.user_space = user_space
        self._app_key = app_key
        self._stored_token = stored_token
        self._on_token = on_token
        self._clock: Clock = clock or SystemClock()
        self._timeout = timeout
        self._token: str | None = None
        self._renewal_token: str | None = None
        self._valid_until: datetime | None = None
        self._renew_due: float | None = None  # monotonic time at which to renew
        self._warned: set[str] = set()  # what was said about validUntil (once each kind)
        self._lock = asyncio.Lock()
        self.active_user_space: str | None = None

    @classmethod
    def borrowed(
        cls, client: httpx.AsyncClient, target: XelionTarget, token: str, *, timeout: float = 15.0
    ) -> XelionSession:
        """A session around a token someone else owns (a user's): for ``request(..., relogin=False)``
        only; never log in, renew or log out with it."""
        session = cls(client, target, "", "", "", timeout=timeout)
        session._token = token
        return session

    # -- state ------------------------------------------------------------------------------------

    @property
    def where(self) -> str:
        """Host and tenant, the only things log lines may name."""
        return f"{self.target.host}/{self.target.tenant}"

    @property
    def logged_in(self) -> bool:
        return self._token is not None

    @property
    def token(self) -> str | None:
        """The current authentication token (a secret: never log it)."""
        return self._token

    @property
    def valid_until(self) -> datetime | None:
        return self._valid_until

    def _warn_once(self, kind: str, what: str) -> None:
        # Keyed by the kind, not the text: a server whose unreadable value changes with every
        # answer would otherwise add an entry and a warning per renewal.
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning("Xelion at %s %s", self.where, what)

    def renew_delay(self) -> float | None:
        """Seconds until the session should be renewed (80 % of its life, §2), None if logged out."""
        if self._renew_due is None:
            return None
        return max(0.0, self._renew_due - self._clock.monotonic())

    # -- HTTP -------------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self.target.base_url + path

    async def _send(
        self,
        method: str,
        path: str,
        *,
        token: str | None,
        json_body: object = None,
        has_body: bool = False,
        params: Mapping[str, str | int] | None = None,
    ) -> httpx.Response:
        headers = {"Accept": "application/json", **_auth_header(token)}
        content: bytes | None = None
        if has_body:
            content = json.dumps(json_body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        url = self._url(path)
        try:
            port = httpx.URL(url).port
            if port is not None and not 0 < port <= 65535:
                # httpx passes it on, and the socket layer's OverflowError comes out of its
                # connection attempts as an exception group.
                raise XelionUnreachable(f"{method} {path} on {self.where}: port {port} is out of range")
            return await self._client.request(
                method,
                url,
                headers=headers,
                content=content,
                params=dict(params) if params else None,
                timeout=self._timeout,
            )
        except httpx.TimeoutException as exc:
            raise XelionUnreachable(f"{method} {path} on {self.where}: timed out") from exc
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            # The exception text of httpx names the URL, which carries no secret; keep only the class.
            # InvalidURL and ValueError (UnicodeError from IDNA): a host stored before the admin API
            # checked it as it does now; not a bug of this process, so no traceback.
            raise XelionUnreachable(f"{method} {path} on {self.where}: {type(exc).__name__}") from exc

    @staticmethod
    def _json(response: httpx.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise XelionProtocolError(f"{what}: answer is not JSON", status=response.status_code) from exc

    # -- login / renew / logout -------------------------------------------------------------------

    async def _apply_login(self, response: httpx.Response, what: str) -> None:
        body = self._json(response, what)
        if not isinstance(body, dict):
            raise XelionProtocolError(f"{what}: answer is not an object", status=response.status_code)
        token = body.get("authentication")
        renewal = body.get("renewalToken")
        if not isinstance(token, str) or not token:
            raise XelionProtocolError(f"{what}: answer has no authentication token")
        self._token = token
        self._renewal_token = renewal if isinstance(renewal, str) and renewal else None
        self._valid_until = None
        self._renew_due = None
        valid_until = body.get("validUntil")
        if isinstance(valid_until, str):
            with contextlib.suppress(ValueError):
                self._valid_until = parse_xelion_time(valid_until)
        # Renewing every few seconds for as long as the daemon runs (a renew, a token write and a
        # warning each time) was what a missing, unreadable or past validUntil gave: keep_alive
        # renews when nothing is due. Each of those renews at a fixed, unhurried interval instead,
        # said once per session; a session that did end meanwhile is logged in again on its 401.
        renew_in = UNKNOWN_EXPIRY_RENEW
        if self._valid_until is None:
            what = f"sent no readable validUntil ({str(valid_until)[:40]!r})"
            self._warn_once("unreadable", f"{what}; renewing the session every {renew_in:.0f} s")
        else:
            local = self._clock.now()
            if local.tzinfo is None:  # a clock that keeps naive UTC
                local = local.replace(tzinfo=UTC)
            # validUntil is on Xelion's clock: measured against this host's alone, a host an hour
            # behind renewed a session of minutes an hour late, long after Xelion had ended it,
            # and every session ended in a gap (a clock-step review's finding). The answer's Date
            # header (RFC 9110 §6.6.1) tells the server's time; but a proxy in front of Xelion may
            # write its own, so neither is trusted to postpone: the renewal comes by the sooner.
            remaining = (self._valid_until - local).total_seconds()
            server = _server_time(response)
            if server is not None:
                skew = (server - local).total_seconds()
                if abs(skew) > CLOCK_SKEW_WARNING:
                    side = "ahead of" if skew > 0 else "behind"
                    self._warn_once(
                        "skew",
                        f"answers with a Date {abs(skew):.0f} s {side} this host's clock; "
                        "the session is renewed by whichever clock says it ends sooner",
                    )
                by_server = (self._valid_until - server).total_seconds()
                if by_server > 0 and (remaining <= 0 or by_server < remaining):
                    remaining = by_server
            if remaining > 0:
                renew_in = max(1.0, RENEW_AT * remaining)
            else:
                renew_in = PAST_EXPIRY_RENEW
                self._warn_once(
                    "past",
                    f"sent a validUntil in the past (do the clocks differ?); renewing the session every "
                    f"{renew_in:.0f} s",
                )
        self._renew_due = self._clock.monotonic() + renew_in
        if self._on_token is not None:
            await self._on_token(token)

    async def _login_once(self, user_space: str, present: str | None) -> httpx.Response:
        body: dict[str, str] = {
            "userName": self._username,
            "password": self._password,
            "userSpace": user_space,
        }
        if self._app_key:
            body["appKey"] = self._app_key
        return await self._send("POST", "me/login", token=present, json_body=body, has_body=True)

    async def login(self) -> None:
        """Log in (§2), applying the 10005 rule; raises :class:`XelionError` when refused.

        First try: the fixed ``user_space`` with the stored (or current) token in ``Authorization``,
        which ends our previous session there. If Xelion still answers 10005, another session we hold
        no token for lives in that userSpace: try ``-1`` .. ``-5`` in turn, each with the same token
        (our previous session may be in one of them), then give up clearly.
        """
        async with self._lock:
            await self._login_locked()

    async def _login_locked(self) -> None:
        present = self._token or self._stored_token
        every = [self.user_space] + [f"{self.user_space}-{i}" for i in range(1, USER_SPACE_SUFFIXES + 1)]
        # A re-login starts where the live session is, so our own token ends our own session.
        first = self.active_user_space or self.user_space
        spaces = [first] + [space for space in every if space != first]
        for space in spaces:
            # Our token goes with every try: the session it ends may live in a suffixed userSpace
            # (a crash after a login there; the userSpace is not stored with the token), and given
            # to only the first try it let each such crash take one more suffix until none was left.
            # Elsewhere it ends nothing: only a userSpace's own session's token ends that session.
            response = await self._login_once(space, present)
            if response.status_code == 200:
                await self._apply_login(response, "login")
                self._stored_token = None
                self.active_user_space = space
                if space != self.user_space:
                    logger.warning(
                        "Xelion at %s: userSpace in use by a session we hold no token for; "
                        "logged in with a suffixed userSpace",
                        self.where,
                    )
                logger.info("logged in to Xelion at %s", self.where)
                return
            error = error_from_response(response, "login", self._secrets())
            if error.error_code != ALREADY_LOGGED_IN:
                logger.info("login to Xelion at %s refused: %s", self.where, error.kind)
                raise error
            logger.info("Xelion at %s: userSpace taken (10005), trying the next one", self.where)
        raise XelionApiError(
            "already_logged_in",
            f"login: every userSpace from {self.user_space} to -{USER_SPACE_SUFFIXES} "
            f"is taken on {self.where} (401/10005); log those sessions out or wait for them to expire",
            status=401,
            error_code=ALREADY_LOGGED_IN,
        )

    async def renew(self) -> None:
        """Renew the session with the rotating renewal token (§2); logs in again after a 401."""
        async with self._lock:
            if self._token is None or self._renewal_token is None:
                await self._login_locked()
                return
            # The body is a bare JSON string: the current renewal token (§2).
            response = await self._send(
                "POST", "me/renew", token=self._token, json_body=self._renewal_token, has_body=True
            )
            if response.status_code == 200:
                await self._apply_login(response, "renew")
                logger.debug("renewed the Xelion session on %s", self.where)
                return
            error = error_from_response(response, "renew", self._secrets())
            if error.status != 401:
                raise error
            logger.info("Xelion at %s refused the renewal (%s); logging in again", self.where, error.kind)
            await self._login_locked()

    def _secrets(self) -> list[str]:
        """What this session's requests carry and an error answer may quote: the password, the
        session's token, its renewal token and the stored one it presents."""
        return [s for s in (self._password, self._token, self._renewal_token, self._stored_token) if s]

    async def logout(self) -> None:
        """Log out (§2) and forget the tokens. Errors are logged, not raised: the session ends anyway."""
        async with self._lock:
            token = self._token
            self._token = None
            self._renewal_token = None
            self._renew_due = None
            if token is None:
                return
            try:
                response = await self._send("POST", "me/logout", token=token)
                if response.status_code != 200:
                    logger.info("logout from Xelion at %s answered %s", self.where, response.status_code)
                else:
                    logger.info("logged out of Xelion at %s", self.where)
            except XelionError as exc:
                logger.info("logout from Xelion at %s failed: %s", self.where, exc.message)
            finally:
                if self._on_token is not None:
                    await self._on_token(None)

    async def keep_alive(self, retry_delay: float = 5.0) -> None:
        """Renew the session whenever it is due, forever (§2). Run it as a background task.

        A failed renewal is retried after ``retry_delay`` seconds (a 401 already logs in again inside
        :meth:`renew`). Cancellation stops the loop; the session stays as it is.
        """
        while True:
            delay = self.renew_delay()
            await asyncio.sleep(delay if delay is not None else retry_delay)
            if delay is None and not self.logged_in:
                continue
            try:
                await self.renew()
            except XelionError as exc:
                logger.warning("renewing the Xelion session on %s failed: %s", self.where, exc.message)
                await asyncio.sleep(retry_delay)

    # -- authenticated calls ----------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        relogin: bool = True,
    ) -> httpx.Response:
        """An authenticated call; after a 401 logs in again once and retries (§2, §3.6)."""
        if self._token is None:
            await self.login()
        response = await self._send(method, path, token=self._token, params=params)
        if response.status_code == 401 and relogin:
            logger.info("Xelion at %s answered 401 to %s %s; logging in again", self.where, method, path)
            await self.login()
            response = await self._send(method, path, token=self._token, params=params)
        if response.status_code != 200:
            raise error_from_response(response, f"{method} {path}", self._secrets())
        return response

    async def me_info(self) -> dict[str, Any]:
        """``GET me/info`` (§2): the ``object`` of the answer."""
        body = self._json(await self.request("GET", "me/info"), "me/info")
        obj = body.get("object") if isinstance(body, dict) else None
        if not isinstance(obj, dict):
            raise XelionProtocolError("me/info: answer has no object")
        return obj

    async def websocket_url(self) -> str:
        """``POST me/websocket`` (§3.1): a fresh one-time websocket URL (a secret: never log it)."""
        body = self._json(await self.request("POST", "me/websocket"), "me/websocket")
        url = body.get("object") if isinstance(body, dict) else None
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise XelionProtocolError("me/websocket: answer is not a ws:// or wss:// URL")
        return url

    async def find_users(
        self, user_name: str, *, page_size: int = 100, max_pages: int = 50
    ) -> list[XelionUser]:
        """``GET users?where=userName=<name>`` with paging (``limit``, ``after=nextId``; §1, §2)."""
        found: list[XelionUser] = []
        after: str | None = None
        for _ in range(max_pages):
            params: dict[str, str | int] = {"where": f"userName={user_name}", "limit": page_size}
            if after is not None:
                params["after"] = after
            body = self._json(await self.request("GET", "users", params=params), "users")
            if not isinstance(body, dict) or not isinstance(body.get("data"), list):
                raise XelionProtocolError("users: answer has no data list")
            items = body["data"]
            for item in items:
                user = _user_from_item(item)
                if user is not None and user.user_name == user_name:
                    found.append(user)
            paging = (body.get("meta") or {}).get("paging") if isinstance(body.get("meta"), dict) else None
            next_id = paging.get("nextId") if isinstance(paging, dict) else None
            if not items or not isinstance(next_id, str | int) or str(next_id) == after:
                break
            after = str(next_id)
        return found


def _user_from_item(item: object) -> XelionUser | None:
    obj = item.get("object") if isinstance(item, dict) else None
    if not isinstance(obj, dict):
        return None
    oid = obj.get("oid")
    user_name = obj.get("userName")
    if not isinstance(oid, str | int) or not isinstance(user_name, str):
        return None
    common_name = obj.get("commonName")
    active = obj.get("active", True)
    return XelionUser(
        oid=str(oid),
        user_name=user_name,
        common_name=common_name if isinstance(common_name, str) else None,
        active=bool(active) if isinstance(active, bool) else True,
    )
