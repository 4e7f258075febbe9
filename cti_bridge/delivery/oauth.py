"""The per-credential OAuth2 token manager: access tokens for deliveries, refreshed once at a time.

reliability.md §10-§14 are the contract:

- §10 single flight: one token-endpoint call per credential at a time. Concurrent callers join the
  one refresh in flight for that key (a task per key), so 100 deliveries meeting an expired token
  make exactly one call. Across PostgreSQL replicas the refresh runs under the credential's lock
  (``TokenStore.exclusive``) and re-reads the credential inside it, so a replica that waited uses
  the other's new token: two replicas refreshing one rotating refresh token at once had one of
  them answered invalid_grant, and when its "reauth required" committed first, a healthy grant
  was parked and the freshly rotated refresh token thrown away.
- §11 persist before use: the new tokens (a rotated refresh token included) are committed through
  ``TokenStore.save_tokens`` before the access token is handed to anyone. The refresh runs as its
  own task, shielded from the callers' cancellation, so a delivery cancelled mid-refresh (shutdown,
  lease loss) cannot drop a rotated refresh token between the answer and the commit.
- §12 proactive and reactive: a token with less than ``margin_seconds`` (60 s) left is refreshed
  before use; a token without expiry (Salesforce gives none) is used until a CRM answers 401 and
  the caller asks ``refresh_after_401``.
- §13 dead grants park: ``invalid_grant``, ``invalid_client``, Zoho's ``invalid_code``, HubSpot's
  ``BAD_REFRESH_TOKEN`` and OpenID Connect's ``interaction_required``/``consent_required``/
  ``login_required`` (Microsoft Entra ID asks for multi-factor sign-in so), and, for the device
  grant, ``access_denied``/``expired_token`` and Entra's ``authorization_declined``/
  ``bad_verification_code``, mark the credential ``reauth_required`` after that one attempt and
  raise ``ReauthRequired``; the worker parks the user's deliveries.
- Throttling is waited out: a ``Retry-After`` on the token endpoint's answer, or Zoho's "Access
  Denied" (its answer once a refresh token made ten access tokens in ten minutes), holds that
  credential's token requests and its deliveries for that long; ``temporarily_unavailable`` is
  retried like a 5xx.
- A token whose lifetime is shorter than twice the margin is refreshed after half of it, not at
  once on every use.
- §14 secrets stay secret: log lines and exception texts name the credential and the token
  endpoint's host, never a token, secret or device code; the token classes hide them from repr.

The OAuth2 protocol work (client authentication ``client_secret_post``/``client_secret_basic``,
the token request bodies) is authlib's (``ClientAuth``, ``prepare_token_request``); the request
goes through the one shared, guarded HTTP client (delivery/egress.py, §15).

Persistence is a small protocol, ``TokenStore``, so that another kind of credential (the
``app_context`` table) can use the same manager; ``store/tokens.py`` implements it for
``user_credentials``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Hashable, Mapping
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import urlsplit

import httpx
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_token_request

from cti_bridge.clock import Clock
from cti_bridge.delivery.egress import EgressRefused, check_url, read_limited
from cti_bridge.delivery.retry import parse_retry_after

# The errors, the stored credential and its states live where the store can reach them without
# importing the delivery package (DESIGN.md §2); re-exported here for the manager's callers.
from cti_bridge.errors import CredentialNotFound as CredentialNotFound
from cti_bridge.errors import ReauthRequired as ReauthRequired
from cti_bridge.errors import TokenEndpointError as TokenEndpointError
from cti_bridge.errors import TokenError as TokenError
from cti_bridge.errors import TokenNotReady as TokenNotReady
from cti_bridge.ports import RESERVED_TOKEN_PARAMETERS
from cti_bridge.ports import STATE_ACTIVE as STATE_ACTIVE
from cti_bridge.ports import STATE_REAUTH_REQUIRED as STATE_REAUTH_REQUIRED
from cti_bridge.ports import CredentialSnapshot as CredentialSnapshot
from cti_bridge.render import MASK

log = logging.getLogger(__name__)

#: The ``forget`` generation a token request began at (set in its own task, ``_obtain``).
_REQUEST_GENERATION: ContextVar[int | None] = ContextVar("token_request_generation", default=None)

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
AUTH_METHODS = frozenset({"client_secret_post", "client_secret_basic"})
# Answers that mean the grant or the client is dead: only an operator can fix it (reliability.md
# §13): a new refresh token or device code, or for the client's own (invalid_client,
# unauthorized_client) a new client id or secret (store.integrations.update_secret).
# invalid_code is Zoho's invalid_grant (answered with 200).
REAUTH_ERRORS = frozenset(
    {
        "invalid_grant",
        "invalid_client",
        "invalid_code",
        "unauthorized_client",
        # OpenID Connect Core §3.1.2.6: the user must sign in again, or consent (Entra ID's answer
        # to a refresh that now needs multi-factor sign-in or meets a conditional access policy).
        "interaction_required",
        "consent_required",
        "login_required",
        # HubSpot answers a revoked refresh token (the app uninstalled) without an ``error`` field:
        # {"status": "BAD_REFRESH_TOKEN", "message": "missing or unknown refresh token"}.
        "BAD_REFRESH_TOKEN",
    }
)
DEVICE_REAUTH_ERRORS = frozenset(
    # RFC 8628 §3.5, and Entra ID's two that end the polling as well.
    {"access_denied", "expired_token", "authorization_declined", "bad_verification_code"}
)
#: Vendor status codes read where an answer has no ``error`` field (HubSpot's ``status``).
VENDOR_ERROR_STATUSES = frozenset({"BAD_REFRESH_TOKEN"})
#: Answers that say "not now": retried, not a dead delivery. ``AccessDenied`` is Zoho's throttle
#: (``{"error": "Access Denied", "error_description": "You have made too many requests ..."}``).
THROTTLE_ERRORS = frozenset({"AccessDenied", "temporarily_unavailable"})
#: How long a throttled credential waits when the answer says nothing (Zoho's window is 10 min).
THROTTLE_PAUSE = 60.0
DEVICE_WAIT_ERRORS = frozenset({"authorization_pending", "slow_down"})
DEFAULT_DEVICE_INTERVAL = 5.0  # RFC 8628 §3.2: 5 s when the server does not say
MAX_TOKEN_RESPONSE_BYTES = 64 * 1024
#: How long a failed token request answers for the credential's next ones in the delivery worker
#: (seconds): a failing endpoint is asked about once per pause and credential, not once per delivery
#: that needs a token. Deliveries retry after 5 s at the earliest anyway (reliability.md §7).
REFRESH_FAILURE_PAUSE = 5.0
# Not kept with the extras: the secrets, and expires_at (made ours). ``expires_in`` is kept: a
# stored token's lifetime decides when it is refreshed (``_refresh_at``), in every replica.
_TOKEN_FIELDS = frozenset({"access_token", "refresh_token", "expires_at"})
_SAFE_CODE = re.compile(r"[^A-Za-z0-9_.\-]")

KeyT = TypeVar("KeyT", bound=Hashable)
KeyT_contra = TypeVar("KeyT_contra", bound=Hashable, contravariant=True)


# --- errors ------------------------------------------------------------------------------------------


# --- the persistence protocol ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessToken:
    """An access token in force: what a delivery presents, and every extra field of the token
    answer (``instance_url``, ``api_domain``, ``token_type``, ...) for templates (el-templates.md
    §4). ``version`` is the credential version it was stored with."""

    access_token: str = field(repr=False)
    expires_at: datetime | None
    extra: Mapping[str, Any] = field(repr=False)
    version: int
    #: From when it is refreshed before use (``TokenManager._refresh_at``); None: used until a 401.
    refresh_at: datetime | None = None


class TokenStore(Protocol[KeyT_contra]):
    """Where a kind of credential lives. Implementations encrypt the secrets at rest (§14)."""

    def describe(self, key: KeyT_contra) -> str:
        """How log lines and token errors name the credential: its id and, once ``load`` read it,
        whose it is (the Xelion user, the integration), which the operator needs for the repair
        and thinks in; never a secret."""
        ...

    async def load(self, key: KeyT_contra) -> CredentialSnapshot:
        """The credential as stored now; ``CredentialNotFound`` if it does not exist."""
        ...

    async def save_tokens(
        self,
        key: KeyT_contra,
        snapshot_version: int,
        *,
        access_token: str,
        expires_at: datetime | None,
        refresh_token: str | None,
        extra: Mapping[str, Any],
        device_code_used: bool,
    ) -> int | None:
        """Commit new tokens if the credential is still at ``snapshot_version``; returns the new
        version, or None when the version moved (an operator changed the credential meanwhile:
        nothing is overwritten). A successful save also makes the credential ``active``.
        ``device_code_used``: the device code was exchanged (it is single-use) and is cleared."""
        ...

    async def mark_reauth_required(self, key: KeyT_contra, snapshot_version: int, reason: str) -> bool:
        """Set the state ``reauth_required`` with ``reason`` if still at ``snapshot_version``
        (False when the version moved: the operator's new secrets are not condemned)."""
        ...

    def exclusive(self, key: KeyT_contra) -> AbstractAsyncContextManager[None]:
        """Hold the credential's refresh lock, shared by every replica of the database (§10)."""
        ...

    async def versions(self) -> Mapping[Any, int]:
        """The stored ``version`` of every credential of this kind (``drop_changed``)."""
        ...


# --- the manager -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Granted:
    access_token: str
    expires_at: datetime | None
    refresh_token: str | None
    extra: dict[str, Any]
    device_code_used: bool
    refresh_at: datetime | None = None


class TokenManager(Generic[KeyT]):
    """Access tokens per credential key, refreshed single-flight and persisted before use.

    One instance per kind of credential, built by ``app.py`` with the shared HTTP client. The
    in-memory cache is only a shortcut: every refresh decision re-reads the store, so several
    replicas (or an operator's change) are seen.
    """

    def __init__(
        self,
        store: TokenStore[KeyT],
        http: httpx.AsyncClient,
        clock: Clock,
        margin_seconds: float = 60.0,
        *,
        allow_private: bool = False,
        max_response_bytes: int = MAX_TOKEN_RESPONSE_BYTES,
        on_refresh: Callable[[str], None] | None = None,
        failure_pause: float = 0.0,
    ) -> None:
        self._store = store
        self._failure_pause = failure_pause
        self._http = http
        self._clock = clock
        self._margin = timedelta(seconds=margin_seconds)
        self._allow_private = allow_private
        self._max_response_bytes = max_response_bytes
        self._cache: dict[KeyT, AccessToken] = {}
        self._inflight: dict[KeyT, asyncio.Task[AccessToken]] = {}
        # Bumped by ``forget`` (a credential deleted): a token request that began before neither
        # caches, saves nor hands out what it got (``_obtain``).
        self._generation: dict[KeyT, int] = {}
        # Token requests of each key that have not ended, those ``forget`` took out of ``_inflight``
        # included: the generation count goes only when none is left.
        self._running: dict[KeyT, int] = {}
        # Device-code polling: not before this monotonic time, and the current interval (§3.5).
        self._device_not_before: dict[KeyT, float] = {}
        self._device_interval: dict[KeyT, float] = {}
        # The last failed token request per key, until when it stands in for a new one.
        self._last_failure: dict[KeyT, tuple[float, TokenEndpointError]] = {}
        self.refreshes = 0  # token-endpoint calls made (metrics, reliability.md §21)
        # Called once per token-endpoint call with its result: "ok", "reauth_required",
        # "pending" (device grant waiting) or "error" (metrics, reliability.md §21).
        self._on_refresh = on_refresh

    # --- public API -------------------------------------------------------------------------------

    def peek(self, key: KeyT) -> AccessToken | None:
        """The cached token of ``key`` if ``get`` would return it without waiting; else None."""
        cached = self._cache.get(key)
        if cached is not None and self._due(cached):
            return cached
        return None

    async def get(self, key: KeyT) -> AccessToken:
        """An access token for ``key`` with more than the margin left (or without expiry).

        Refreshes when needed, joining a refresh already in flight for ``key``. Raises
        ``ReauthRequired``, ``TokenNotReady`` or ``TokenEndpointError``.

        Cancellation: the caller stops waiting; a refresh it started runs on to its commit (it is
        shielded), and other callers still get its result.
        """
        return self.peek(key) or await self._join(key, None)

    async def refresh_after_401(self, key: KeyT, rejected: str) -> AccessToken:
        """A token other than ``rejected`` (the one a CRM just answered 401 to).

        If the current token already differs (another delivery refreshed meanwhile), that one;
        otherwise one forced refresh, single-flight like ``get``. Cancellation: as for ``get``.
        """
        cached = self._cache.get(key)
        if cached is not None and cached.access_token != rejected and self._due(cached):
            return cached
        token = await self._join(key, rejected)
        if token.access_token == rejected:
            # We joined a refresh that had not seen this 401 and handed back the same token.
            token = await self._join(key, rejected)
        return token

    def invalidate(self, key: KeyT) -> None:
        """Forget the cached token of ``key`` (an operator changed the credential). A token request
        in flight goes on: its save fails on the changed version, and it reloads and asks again
        with the new secrets, for its callers too."""
        self._cache.pop(key, None)
        self._device_not_before.pop(key, None)
        self._device_interval.pop(key, None)
        self._last_failure.pop(key, None)

    def forget(self, key: KeyT) -> None:
        """The credential ``key`` was deleted: forget its token, and let a token request in flight
        for it neither cache, save nor hand out anything more (it raises to its callers), and no
        new caller join it. SQLite gives a deleted credential's id to the next one, whose first
        ``get`` joined the old request and was handed, and cached, the deleted credential's token,
        and whose row the old request could save into at the same version (a review's finding).
        Only a request still running can hold an older generation (each reads it when it
        starts), so with none the count is left alone, and it goes once the last request of the
        key has ended (``_finished``, by ``_running``: not by ``_inflight``, which this empties
        while the request goes on): kept for every credential ever deleted, it grew for the
        process's life."""
        if self._running.get(key):
            self._generation[key] = self._generation.get(key, 0) + 1
        self._inflight.pop(key, None)
        self.invalidate(key)

    def forget_all(self) -> None:
        """Every credential may have been deleted (an integration was): ``forget`` each."""
        for key in {*self._cache, *self._inflight}:
            self.forget(key)

    async def drop_changed(self) -> list[KeyT]:
        """Forget the cached tokens whose credential was changed or deleted in the store since they
        were cached, and return their keys.

        This replica's own admin API calls ``invalidate``; a change made through another replica's
        API reaches this one only through the database, where every change of the secrets bumps the
        credential's ``version``. Without this, a replica kept handing out the old grant's access
        token (a user moved to a new connected app, a grant the operator replaced) until it
        expired: up to an hour, or for good with a CRM that gives no expiry. A token cached at the
        stored version or later (this replica's own refresh, saved after the read) stays.
        Dropping costs the next delivery of that user one read of the credential, and a token
        request only when the store holds no usable access token (a new refresh token clears it).
        """
        if not self._cache:
            return []
        stored = await self._store.versions()
        # A key no longer stored counts as a newer version: the credential was deleted.
        dropped = [k for k, token in self._cache.items() if token.version < stored.get(k, token.version + 1)]
        for key in dropped:
            self.invalidate(key)
        return dropped

    async def aclose(self) -> None:
        """Wait for refreshes in flight to commit (each is bounded by the request timeout).

        Cancellation: stops waiting; the refresh tasks keep running until the loop ends.
        """
        tasks = list(self._inflight.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- single flight -------------------------------------------------------------------------------

    async def _join(self, key: KeyT, rejected: str | None) -> AccessToken:
        task = self._inflight.get(key)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._obtain(key, rejected))
            self._inflight[key] = task
            self._running[key] = self._running.get(key, 0) + 1
            task.add_done_callback(lambda t: self._finished(key, t))
        return await asyncio.shield(task)

    def _finished(self, key: KeyT, task: asyncio.Task[AccessToken]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        left = self._running.get(key, 1) - 1
        if left > 0:
            self._running[key] = left
        else:
            # No request of the key left running: none compares the count any more.
            self._running.pop(key, None)
            self._generation.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when every caller left

    def _report(self, result: str) -> None:
        if self._on_refresh is not None:
            try:
                self._on_refresh(result)
            except Exception:  # metrics must never break a refresh
                log.exception("token refresh metrics callback failed")

    def _due(self, token: AccessToken) -> bool:
        """A cached token is used as it is until its ``refresh_at`` (§12: none when the provider
        gave no expiry: used until a 401)."""
        return token.refresh_at is None or token.refresh_at > self._clock.now()

    def _ensure_not_forgotten(self, key: KeyT, generation: int) -> None:
        """Raise if ``forget(key)`` came after ``generation`` was read: what this request holds
        belongs to a deleted credential, whose id may already be another's."""
        if self._generation.get(key, 0) != generation:
            raise TokenEndpointError(
                f"{self._store.describe(key)} was deleted during the token request", retryable=True
            )

    async def _obtain(self, key: KeyT, rejected: str | None) -> AccessToken:
        # A version conflict means someone else changed the credential during our refresh: reload
        # and decide again (a few times at most; it is an operator's or another replica's change).
        generation = self._generation.get(key, 0)
        _REQUEST_GENERATION.set(generation)  # this task's own: for _reauth, deeper down
        for _ in range(3):
            snapshot = await self._store.load(key)
            self._ensure_not_forgotten(key, generation)
            stored = self._stored_token(key, snapshot, rejected)
            if stored is not None:
                return stored
            self._recently_failed(key)
            async with self._store.exclusive(key):
                # Another replica may have refreshed while this one waited for the lock: read again.
                snap = await self._store.load(key)
                self._ensure_not_forgotten(key, generation)
                stored = self._stored_token(key, snap, rejected)
                if stored is not None:
                    return stored
                try:
                    granted = await self._grant(key, snap)
                except TokenEndpointError as exc:
                    if self._failure_pause > 0:
                        # A throttled endpoint's own pause, when longer: asking sooner prolongs it.
                        pause = max(self._failure_pause, exc.retry_after or 0.0)
                        self._last_failure[key] = (self._clock.monotonic() + pause, exc)
                    raise
                self._last_failure.pop(key, None)
                if granted is None:
                    continue  # marking reauth_required lost against a newer version: reload
                # Checked right before the save is handed to the database: a deleted credential's
                # id may be another's by now, at the same version (1).
                self._ensure_not_forgotten(key, generation)
                version = await self._store.save_tokens(
                    key,
                    snap.version,
                    access_token=granted.access_token,
                    expires_at=granted.expires_at,
                    refresh_token=granted.refresh_token,
                    extra=granted.extra,
                    device_code_used=granted.device_code_used,
                )
            if version is None:
                log.warning(
                    "token refresh for %s: the credential changed during the refresh; reloading",
                    self._store.describe(key),
                )
                continue
            token = AccessToken(
                granted.access_token, granted.expires_at, granted.extra, version, granted.refresh_at
            )
            self._ensure_not_forgotten(key, generation)
            self._cache[key] = token
            return token
        raise TokenEndpointError(
            f"{self._store.describe(key)} kept changing during the token refresh", retryable=True
        )

    def _recently_failed(self, key: KeyT) -> None:
        """Raise the last token request's failure again if it is less than ``failure_pause`` old
        (the delivery worker's manager: ``REFRESH_FAILURE_PAUSE``). Single flight joins the callers
        of one moment; without this, each delivery that came after a failure sent a request of its
        own: about 200 in a 15 s outage of one endpoint. The admin API's manager has none: a
        person trying again wants a new request."""
        failed = self._last_failure.get(key)
        if failed is None:
            return
        until, exc = failed
        now = self._clock.monotonic()
        if now >= until:
            del self._last_failure[key]
            return
        retry_after = round(until - now, 3) if exc.retry_after else None
        raise TokenEndpointError(
            str(exc), retryable=exc.retryable, status=exc.status, retry_after=retry_after
        )

    def _stored_token(self, key: KeyT, snap: CredentialSnapshot, rejected: str | None) -> AccessToken | None:
        """The stored access token if it can be used as it is (cached); raises ``ReauthRequired``
        for a credential marked so; None when a token request is needed."""
        if snap.state == STATE_REAUTH_REQUIRED:
            self._cache.pop(key, None)
            raise ReauthRequired(key, snap.state_reason or "re-authorisation required")
        refresh_at = self._refresh_at(snap.expires_at, _lifetime(snap.extra.get("expires_in")))
        if (
            snap.access_token
            and snap.access_token != rejected
            and (refresh_at is None or refresh_at > self._clock.now())
        ):
            token = AccessToken(
                snap.access_token, snap.expires_at, dict(snap.extra), snap.version, refresh_at
            )
            self._cache[key] = token
            return token
        return None

    # --- one token request -------------------------------------------------------------------------

    async def _grant(self, key: KeyT, snap: CredentialSnapshot) -> _Granted | None:
        """One call to the token endpoint. None when the credential changed before it could be
        marked ``reauth_required``."""
        who = self._store.describe(key)
        try:
            check_url(snap.token_endpoint, self._allow_private)
        except EgressRefused as exc:
            raise TokenEndpointError(f"{who}: token endpoint {exc}", retryable=False) from None
        host = urlsplit(snap.token_endpoint).hostname or "?"
        if not snap.client_id:
            await self._reauth(key, snap, "no client id is set")
            return None
        device = False
        # The CRM context's own parameters (``scope``, ``resource``): never one the grant or the
        # client authentication sets (the admin API refuses those names too).
        more = {k: v for k, v in snap.token_parameters.items() if k not in RESERVED_TOKEN_PARAMETERS}
        if snap.refresh_token:
            body = prepare_token_request("refresh_token", refresh_token=snap.refresh_token, **more)
        elif snap.device_code:
            now = self._clock.monotonic()
            not_before = self._device_not_before.get(key)
            if not_before is not None and now < not_before:
                # RFC 8628 §3.5: do not poll faster than the interval.
                raise TokenNotReady(key, round(not_before - now, 3))
            device = True
            body = prepare_token_request(DEVICE_CODE_GRANT, device_code=snap.device_code, **more)
        else:
            await self._reauth(key, snap, "no refresh token or device code is set")
            return None

        method = snap.auth_method if snap.auth_method in AUTH_METHODS else "client_secret_post"
        if snap.client_secret is None:
            method = "none"  # a public client: client_id in the body only
        auth = ClientAuth(snap.client_id, snap.client_secret, method)
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        uri, headers, body = auth.prepare("POST", snap.token_endpoint, headers, body)
        grant = "device_code" if device else "refresh_token"
        self.refreshes += 1
        try:
            request = self._http.build_request("POST", uri, headers=headers, content=body.encode())
            response = await self._http.send(request, stream=True)
            status = response.status_code
            retry_after = parse_retry_after(response.headers.get("retry-after"), self._clock.now())
            raw, _truncated = await read_limited(response, self._max_response_bytes)
        except EgressRefused as exc:
            self._report("error")
            raise TokenEndpointError(f"{who}: token endpoint {exc}", retryable=False) from None
        except (httpx.InvalidURL, ValueError) as exc:
            # A token endpoint no client can send to (a port beyond 65535, an empty DNS label),
            # stored before the admin API refused such URIs: a retry cannot help. It was an
            # "internal error" with a traceback on every attempt, until the last retry.
            self._report("error")
            raise TokenEndpointError(
                f"{who}: token endpoint URI cannot be used ({type(exc).__name__})", retryable=False
            ) from None
        except (httpx.HTTPError, OSError) as exc:
            self._report("error")
            log.warning("token %s grant for %s at %s failed: %s", grant, who, host, type(exc).__name__)
            raise TokenEndpointError(
                f"{who}: token endpoint {host} unreachable ({type(exc).__name__})", retryable=True
            ) from None

        doc = _json_object(raw)
        error = _error_code(doc)
        if error is not None or not 200 <= status < 300:
            return await self._failed(key, snap, who, host, grant, status, error, retry_after)
        if doc is None:
            # A 2xx that is not a JSON object: a maintenance page, a proxy's answer. Not the token
            # endpoint speaking OAuth; the next attempt may reach it.
            self._report("error")
            log.warning("token %s grant for %s at %s: HTTP %d, not a JSON object", grant, who, host, status)
            raise TokenEndpointError(
                f"{who}: token endpoint {host} answered HTTP {status} without a JSON object",
                retryable=True,
                status=status,
            )
        access_token = doc.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            self._report("error")
            log.warning("token %s grant for %s at %s: answer without access_token", grant, who, host)
            raise TokenEndpointError(
                f"{who}: token endpoint {host} answered without an access token",
                retryable=False,
                status=status,
            )
        refresh_token = doc.get("refresh_token")
        if not isinstance(refresh_token, str) or not refresh_token:
            refresh_token = snap.refresh_token  # not rotated: keep the one we have
        expires_at = self._expiry(doc)
        refresh_at = self._refresh_at(expires_at, lifetime=_lifetime(doc.get("expires_in")))
        extra = {k: v for k, v in doc.items() if k not in _TOKEN_FIELDS}
        self._report("ok")
        if device:
            self._device_not_before.pop(key, None)
            self._device_interval.pop(key, None)
        log.info(
            "token %s grant for %s at %s: ok%s%s",
            grant,
            who,
            host,
            "" if expires_at is None else f", expires {expires_at.isoformat(timespec='seconds')}",
            ", refresh token issued"
            if device
            else (", refresh token rotated" if refresh_token != snap.refresh_token else ""),
        )
        return _Granted(access_token, expires_at, refresh_token, extra, device, refresh_at)

    async def _failed(
        self,
        key: KeyT,
        snap: CredentialSnapshot,
        who: str,
        host: str,
        grant: str,
        status: int,
        error: str | None,
        retry_after: float | None = None,
    ) -> _Granted | None:
        device = grant == "device_code"
        shown = _shown_code(error, snap)  # what logs and messages say; ``error`` decides
        # Waiting for the user is the normal course of a device grant, not a warning.
        level = logging.INFO if device and error in DEVICE_WAIT_ERRORS else logging.WARNING
        log.log(
            level, "token %s grant for %s at %s: HTTP %d, error %s", grant, who, host, status, shown or "-"
        )
        if error in REAUTH_ERRORS or (device and error in DEVICE_REAUTH_ERRORS):
            self._report("reauth_required")
            await self._reauth(key, snap, f"the token endpoint answered {shown}")
            return None
        if device and error in DEVICE_WAIT_ERRORS:
            self._report("pending")
            interval = self._device_interval.get(key, DEFAULT_DEVICE_INTERVAL)
            if error == "slow_down":
                interval += 5.0  # RFC 8628 §3.5
            self._device_interval[key] = interval
            self._device_not_before[key] = self._clock.monotonic() + interval
            raise TokenNotReady(key, interval)
        self._report("error")
        # An error without an OAuth error code is not the authorization server refusing this grant:
        # a firewall's or a proxy's page, a maintenance answer, a moved URL. Killing every delivery
        # that needs a token meanwhile would lose them over a passing fault (a 403 page for ten
        # seconds killed a third of a run's deliveries); they retry on the schedule instead, and the
        # error shows in their lastError. An OAuth error (invalid_request, invalid_scope, ...) stays
        # permanent: the request itself is wrong.
        throttled = status == 429 or error in THROTTLE_ERRORS
        retryable = throttled or status >= 500 or status in (408, 425) or error is None
        if throttled and retry_after is None and error == "AccessDenied":
            retry_after = THROTTLE_PAUSE
        raise TokenEndpointError(
            f"{who}: token endpoint {host} answered HTTP {status}" + (f" ({shown})" if shown else ""),
            retryable=retryable,
            status=status,
            retry_after=retry_after if retryable else None,
        )

    async def _reauth(self, key: KeyT, snap: CredentialSnapshot, reason: str) -> None:
        """Mark the credential and raise ReauthRequired; returns when the credential changed first
        (the operator's newer secrets are not condemned; the caller reloads)."""
        generation = _REQUEST_GENERATION.get()
        if generation is not None:
            self._ensure_not_forgotten(key, generation)  # not another credential's, of the same id
        marked = await self._store.mark_reauth_required(key, snap.version, reason)
        if not marked:
            log.info(
                "%s changed before it could be marked reauth_required; reloading", self._store.describe(key)
            )
            return None
        self._cache.pop(key, None)
        log.warning("%s needs re-authorisation: %s", self._store.describe(key), reason)
        raise ReauthRequired(key, reason)

    def _refresh_at(self, expires_at: datetime | None, lifetime: float | None = None) -> datetime | None:
        """When a token is refreshed before use: the margin before it expires, or half its
        ``lifetime`` before when that is shorter (a 60 s token met the 60 s margin at once, and
        every delivery asked for a new one)."""
        if expires_at is None:
            return None
        margin = self._margin
        if lifetime is not None and lifetime > 0:
            margin = min(margin, timedelta(seconds=lifetime / 2))
        return expires_at - margin

    def _expiry(self, doc: Mapping[str, Any]) -> datetime | None:
        now = self._clock.now()
        expires_in = _lifetime(doc.get("expires_in"))
        if expires_in is not None:
            return now + timedelta(seconds=expires_in)
        expires_at = _number(doc.get("expires_at"))
        if expires_at is not None and expires_at > 0:
            try:
                return datetime.fromtimestamp(expires_at, tz=now.tzinfo)
            except (OverflowError, OSError, ValueError):
                return None  # beyond any calendar: as good as none
        return None  # no expiry given (Salesforce): used until a 401 (§12)


#: The longest token lifetime taken as given (ten years): a larger ``expires_in`` (or ``inf``)
#: overflowed the date arithmetic after the endpoint had answered, losing a rotated refresh token.
MAX_LIFETIME = 10 * 365 * 86400.0


def _lifetime(value: object) -> float | None:
    """A token answer's ``expires_in`` in seconds: positive, finite, at most ``MAX_LIFETIME``."""
    seconds = _number(value)
    if seconds is None or not seconds > 0:  # also NaN
        return None
    return min(seconds, MAX_LIFETIME)


def _number(value: object) -> float | None:
    # Some providers send numbers as strings ("3600").
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _error_code(doc: Mapping[str, Any] | None) -> str | None:
    """The OAuth2 ``error`` of a token answer, or a vendor's status code that means one."""
    if doc is None:
        return None
    error = _safe_code(doc.get("error"))
    status = doc.get("status")  # HubSpot's is a string; others send an object there
    if error is None and isinstance(status, str) and status in VENDOR_ERROR_STATUSES:
        error = _safe_code(status)
    return error


#: The shortest run of a secret's characters that ``_shown_code`` masks in an error code.
_SECRET_RUN = 8


def _shown_code(error: str | None, snap: CredentialSnapshot) -> str | None:
    """``error`` as logs, stored errors and answers show it: every run of ``_SECRET_RUN`` or more of
    its characters that one of the credential's secrets holds (as ``_safe_code`` leaves a secret)
    is masked. A provider may quote what it was sent in ``error`` itself (seen:
    ``invalid_refresh_token:<the token>``); the code still decides what happens, unmasked."""
    if error is None:
        return None
    secrets = [
        kept
        for secret in (snap.refresh_token, snap.client_secret, snap.device_code, snap.access_token)
        if secret and len(kept := _SAFE_CODE.sub("", secret)) >= _SECRET_RUN
    ]
    shown: list[str] = []
    at = 0
    while at < len(error):
        run = 0
        for secret in secrets:
            end = at + _SECRET_RUN
            if end <= len(error) and error[at:end] in secret:
                while end < len(error) and error[at : end + 1] in secret:
                    end += 1
                run = max(run, end - at)
        if run:
            shown.append(MASK)
            at += run
        else:
            shown.append(error[at])
            at += 1
    return "".join(shown)


def _safe_code(value: object) -> str | None:
    """An OAuth2 error code fit for a log line: short and of safe characters only (a provider's
    error text is never echoed, in case it carries what we sent)."""
    if value is None:
        return None
    text = _SAFE_CODE.sub("", str(value))[:64]
    return text or "unknown_error"
