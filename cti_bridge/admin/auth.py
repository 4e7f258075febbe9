"""Who is calling the admin API, and the brake on guessing admin passwords.

Requests carry ``Authorization: xelion <token>`` (the manual: "the API token needs to be prefixed with
'xelion '"). Two kinds of token exist (DESIGN.md §4):

- the operator token (``CTI_BRIDGE_ADMIN_TOKEN``), compared in constant time, reaches every
  integration;
- a token issued by ``api/session/login`` for one integration's admin credentials, stored only as
  its SHA-256 hash, valid until its ``validUntil``, reaches that integration only.

A scoped principal asking for another integration's resource gets 404, exactly as for an id that does
not exist, so a token of tenant A cannot even learn which ids tenant B has.

``LoginLimiter`` slows down password guessing through ``api/session/login``: after
``login_failures_before_delay`` failures from one client address within ``window_seconds`` that
address gets 429/10400 with ``Retry-After`` for ``login_lockout_seconds``; a success resets it;
attempts still in flight count as failures until answered (``attempt``), so a burst sent at once
cannot try more than the limit. It
lives in memory (one per app, built by ``create_admin_app``), which is enough for one process and is
lost on restart, a deliberate trade-off against a table every failed login would write to.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from cti_bridge.admin.deps import AdminDeps, get_deps
from cti_bridge.clock import Clock
from cti_bridge.errors import ApiError, ErrorCode, not_authenticated, not_found
from cti_bridge.store import integrations as store
from cti_bridge.store.crypto import constant_time_equal, hash_token

TOKEN_SCHEME = "xelion"  # noqa: S105 - the header scheme of the manual, not a secret

# Documents the header in OpenAPI; the value is checked by hand below (auto_error=False) so that a
# missing header is our 401/10000, not FastAPI's 403.
authorization_header = APIKeyHeader(
    name="Authorization",
    auto_error=False,
    description='"xelion <token>": the operator token, or a token from api/session/login',
)


@dataclass(frozen=True)
class Principal:
    """The caller: the operator (reaches all) or an ``api/session/login`` session of one integration."""

    operator: bool
    xelion_context_id: int | None = None
    #: The session's token hash (a session only): the one session a change of the admin
    #: credentials keeps.
    session_hash: str | None = None

    @classmethod
    def as_operator(cls) -> Principal:
        return cls(operator=True)

    @classmethod
    def scoped(cls, xelion_context_id: int, session_hash: str | None = None) -> Principal:
        return cls(operator=False, xelion_context_id=xelion_context_id, session_hash=session_hash)

    def describe(self) -> str:
        """Who made a change, for the log line that records it (never a token)."""
        return "the operator" if self.operator else f"a session of integration {self.xelion_context_id}"

    def can_reach(self, xelion_context_id: int) -> bool:
        return self.operator or self.xelion_context_id == xelion_context_id

    def ensure_context(self, xelion_context_id: int, what: str = "xelionContext") -> None:
        """Raise 404 (never 403) unless this principal may touch that integration."""
        if not self.can_reach(xelion_context_id):
            raise not_found(what, xelion_context_id)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: xelion <token>`` header (scheme case-insensitive)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != TOKEN_SCHEME or not token:
        return None
    return token


def is_operator_token(deps: AdminDeps, token: str | None) -> bool:
    expected = deps.settings.admin_token
    if token is None or expected is None:
        return False
    return constant_time_equal(token, expected.get_secret_value())


async def require_principal(
    deps: Annotated[AdminDeps, Depends(get_deps)],
    authorization: Annotated[str | None, Security(authorization_header)] = None,
) -> Principal:
    """FastAPI dependency: the authenticated caller, or 401/10000."""
    token = bearer_token(authorization)
    if token is None:
        raise not_authenticated('an "Authorization: xelion <token>" header is required')
    if is_operator_token(deps, token):
        return Principal.as_operator()
    digest = hash_token(token)
    now = deps.clock.now()
    xid = await deps.database.run(lambda s: store.session_context(s, digest, now))
    if xid is None:
        raise not_authenticated("the token is unknown or has expired")
    return Principal.scoped(xid, digest)


async def optional_operator(
    deps: Annotated[AdminDeps, Depends(get_deps)],
    authorization: Annotated[str | None, Security(authorization_header)] = None,
) -> bool:
    """For ``POST api/crm-integrations``: whether the operator token was sent. Any other token is
    ignored, as the manual says ("if one is used it will be silently ignored")."""
    return is_operator_token(deps, bearer_token(authorization))


class RateLimited(ApiError):
    """429/10400 with the ``Retry-After`` header the exception handler sends."""

    def __init__(self, retry_after: float) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(
            429,
            ErrorCode.TOO_MANY_REQUESTS,
            "Too many failed logins",
            f"try again in {seconds} seconds",
        )
        self.headers = {"Retry-After": str(seconds)}


class LoginLimiter:
    """Failed-login counter per client address (see the module docstring)."""

    def __init__(
        self,
        clock: Clock,
        *,
        max_failures: int,
        lockout_seconds: float,
        window_seconds: float = 300.0,
        max_addresses: int = 10000,
    ) -> None:
        self._clock = clock
        self._max_failures = max_failures
        self._lockout = lockout_seconds
        self._window = max(window_seconds, lockout_seconds)
        self._max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._locked_until: dict[str, float] = {}
        self._running: dict[str, int] = {}  # attempts in flight per address (``attempt``)

    def check(self, address: str) -> None:
        """Raise RateLimited while ``address`` is locked out."""
        until = self._locked_until.get(address)
        if until is None:
            return
        remaining = until - self._clock.monotonic()
        if remaining > 0:
            raise RateLimited(remaining)
        del self._locked_until[address]

    @contextlib.contextmanager
    def attempt(self, address: str) -> Iterator[None]:
        """One login attempt of ``address``, from before its first await until it is answered.

        ``check`` alone let every attempt already in flight through: its failure counted only once
        Xelion or the database had answered, so 200 guesses sent at once were all tried against a
        limit of 5 (a security review's finding). Attempts in flight count as failures until they
        are answered: at most ``max_failures`` less the recent failures run at once per address.
        """
        self.check(address)
        running = self._running.get(address, 0)
        since = self._clock.monotonic() - self._window
        recent = sum(1 for t in self._failures.get(address, ()) if t > since)  # not the expired ones
        if running + recent >= self._max_failures:
            raise RateLimited(1.0)
        self._running[address] = running + 1
        try:
            yield
        finally:
            left = self._running.pop(address, 1) - 1
            if left > 0:
                self._running[address] = left

    def failure(self, address: str) -> None:
        now = self._clock.monotonic()
        times = self._failures.pop(address, None) or deque()
        times.append(now)
        while times and times[0] <= now - self._window:
            times.popleft()
        if len(times) >= self._max_failures:
            if self._lockout > 0:
                self._locked_until[address] = now + self._lockout
            times.clear()
        else:
            self._failures[address] = times
        # Bounded memory: forget the addresses that failed longest ago.
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)
        if len(self._locked_until) > self._max_addresses:
            for addr in [a for a, t in self._locked_until.items() if t <= now]:
                del self._locked_until[addr]

    def success(self, address: str) -> None:
        self._failures.pop(address, None)
        self._locked_until.pop(address, None)


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def get_limiter(request: Request) -> LoginLimiter:
    limiter: LoginLimiter = request.app.state.login_limiter
    return limiter
