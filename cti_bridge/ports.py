"""Small interfaces between layers, so that ``admin`` and ``store`` never import the running parts.

``app.py`` builds the real implementations and injects them: the admin API asks a
``XelionDirectory`` to check credentials with Xelion and tells a ``Supervisor`` that configuration
changed; the Xelion source reports through ``SourceHooks``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol


@dataclass(frozen=True)
class XelionTarget:
    """Where a tenant's Xelion REST API lives: ``{protocol}://{host}/api/v1/{tenant}/``."""

    protocol: str
    host: str
    tenant: str

    @property
    def base_url(self) -> str:
        return f"{self.protocol}://{self.host}/api/v1/{self.tenant}/"


@dataclass(frozen=True)
class XelionUser:
    """A user as Xelion's ``GET users`` lists it."""

    oid: str
    user_name: str
    common_name: str | None = None
    active: bool = True


class XelionCheckError(Exception):
    """Xelion refused or could not answer a check.

    ``kind`` is ``credentials`` (401/10004, wrong user name, password or tenant), ``disabled``
    (10006), ``not_admin`` (403/10101 on an admin-only request: the user logs in but is no admin),
    ``unreachable`` (connection failed or timed out), ``protocol`` (an answer we could not read) or
    ``not_found``. The message never carries a secret.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class XelionDirectory(Protocol):
    """The checks the admin API makes with Xelion (xelion-protocol.md §2)."""

    async def check_admin(self, target: XelionTarget, username: str, password: str) -> None:
        """Log in with a short-lived userSpace, check the user is an admin (an admin-only request),
        and log out again; raise XelionCheckError if refused."""
        ...

    async def find_user(
        self, target: XelionTarget, admin_username: str, admin_password: str, user_name: str
    ) -> XelionUser | None:
        """Look a user up by ``userName`` (``GET users?where=userName=...``); None when unknown."""
        ...

    async def whoami(self, target: XelionTarget, user_token: str) -> str:
        """The ``userName`` a Xelion user token belongs to (``GET me/info``); XelionCheckError if invalid."""
        ...


class Supervisor(Protocol):
    """What the admin API tells the running daemon after it commits a configuration change."""

    def integration_changed(self, xelion_context_id: int, *, retry_failed: bool = False) -> None:
        """Created, or its environment/admin credentials/mappings changed: (re)start or re-subscribe.
        ``retry_failed``: the change was to where or how the source logs in (the environment, the
        admin's user name or password), so a source that gave up on refused credentials tries again;
        other changes (mappings, users) leave it failed, or a provisioning script's PUTs would each
        cost a refused login at Xelion, which may lock the account."""
        ...

    def integration_deleted(self, xelion_context_id: int) -> None:
        """Stop its source and log out of Xelion."""
        ...

    def credentials_changed(self, credential_id: int) -> None:
        """A user's OAuth2 credentials changed: drop its cached token, un-park its deliveries and
        wake the worker."""
        ...

    def credentials_deleted(self, credential_id: int) -> None:
        """A user's credentials were deleted: nothing of its tokens may reach another credential
        (ids are not given twice, ``store.models._next_id``; a token request in flight for it must
        still not be saved or served)."""
        ...


class NullSupervisor:
    """A supervisor that ignores every change; for tests of the admin API alone."""

    def integration_changed(self, xelion_context_id: int, *, retry_failed: bool = False) -> None:
        return None

    def integration_deleted(self, xelion_context_id: int) -> None:
        return None

    def credentials_changed(self, credential_id: int) -> None:
        return None

    def credentials_deleted(self, credential_id: int) -> None:
        return None


class SourceState(StrEnum):
    """The life of one integration's websocket source, as health and the API show it."""

    STOPPED = "stopped"
    CONNECTING = "connecting"
    SUBSCRIBED = "subscribed"
    BACKOFF = "backoff"
    FAILED = "failed"
    #: Another replica owns the websocket (PostgreSQL replicas, xelion/ownership.py): this one waits.
    STANDBY = "standby"


@dataclass(frozen=True)
class SourceConfig:
    """Everything one source needs to run; rebuilt from the store when configuration changes."""

    xelion_context_id: int
    target: XelionTarget
    admin_username: str
    admin_password: str
    event_types: frozenset[str] = field(
        default_factory=lambda: frozenset(
            {"newCallEvent", "callConnectedEvent", "callHungUpEvent", "missedCallEvent"}
        )
    )


class EventsNotRecorded(Exception):
    """Events handed to ``SourceHooks.on_event`` earlier were not recorded (their commit failed).

    ``since`` is when the first of them was handed over: the gap the source opens starts there,
    not when it heard of the failure, so that those events fall in it (reliability.md §18).
    """

    def __init__(self, cause: Exception, since: datetime) -> None:
        super().__init__(type(cause).__name__)
        self.cause = cause
        self.since = since

    @property
    def gap_reason(self) -> str:
        """The reason of the gap its lost events fall in (the source's, or the stop's)."""
        return f"an event could not be recorded: {self}"


class SourceHooks(Protocol):
    """How a Xelion source reports to the rest of the daemon (implemented over the store)."""

    async def on_event(
        self, xelion_context_id: int, notification_type: str, fields: dict[str, object]
    ) -> None:
        """Hand one call event over to be recorded durably (with its deliveries). May return before
        the commit; a commit that failed is raised from a later call as ``EventsNotRecorded``."""
        ...

    async def on_state(self, xelion_context_id: int, state: SourceState, error: str | None) -> None:
        """The source's state changed (``error`` is a human-readable reason, never a secret)."""
        ...

    async def gap_opened(self, xelion_context_id: int, started_at: datetime, reason: str) -> None:
        """A period without a live, subscribed socket began."""
        ...

    async def gap_closed(self, xelion_context_id: int, ended_at: datetime) -> None:
        """The open gap of this integration ended (the socket is subscribed again)."""
        ...

    async def gap_extended(self, xelion_context_id: int, started_at: datetime, reason: str) -> None:
        """Events lost before the open gap began (a failed commit, told later): move its start back
        to ``started_at`` if earlier; with no gap open, nothing."""
        ...

    async def heartbeat(self, xelion_context_id: int, at: datetime) -> None:
        """The socket is still subscribed at ``at`` (written every ``heartbeat_interval``): after a
        crash the downtime gap starts no earlier than the last one."""
        ...

    async def load_session_token(self, xelion_context_id: int) -> str | None:
        """The token of the source's last live Xelion session, to end it on the next login."""
        ...

    async def load_state(self, xelion_context_id: int) -> tuple[str | None, datetime | None]:
        """The stored state of the integration's source (its owner's, with replicas) and the last
        moment its owner is known to have listened: its last stored event (less the second it may
        have been written late), the subscription that ended its last gap, or its last heartbeat,
        whichever is latest."""
        ...

    async def save_session_token(self, xelion_context_id: int, token: str | None) -> None:
        """Remember (or forget, with None) the token of the live session, encrypted at rest."""
        ...


# --- a stored OAuth2 credential (delivery/oauth.py's TokenStore, implemented in store/) ------------

STATE_ACTIVE = "active"
STATE_REAUTH_REQUIRED = "reauth_required"


#: Form parameters of a token request that a CRM context's ``tokenRequestParameters`` may not set.
RESERVED_TOKEN_PARAMETERS = frozenset(
    {
        "grant_type",
        "refresh_token",
        "device_code",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
        "code",
        "code_verifier",
        "redirect_uri",
        "username",
        "password",
        "assertion",
        "body",
    }
)


@dataclass(frozen=True, slots=True)
class CredentialSnapshot:
    """One credential as stored, secrets decrypted. ``repr`` leaves the secrets out."""

    client_id: str | None
    client_secret: str | None = field(repr=False)
    refresh_token: str | None = field(repr=False)
    device_code: str | None = field(repr=False)
    access_token: str | None = field(repr=False)
    expires_at: datetime | None
    extra: Mapping[str, Any] = field(repr=False)
    state: str
    version: int
    token_endpoint: str
    auth_method: str = "client_secret_post"
    state_reason: str | None = None
    #: More form parameters of its token requests (``scope``, ``resource``); not secret.
    token_parameters: Mapping[str, str] = field(default_factory=dict)
