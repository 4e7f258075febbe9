"""Polls the token endpoint for users waiting on a device code, calls or no calls.

A user given a device code (``deviceCode`` in the manual's user credentials) approves it at the
provider; the first token request after that turns the code into a refresh token. That request
was made only when one of the user's deliveries needed a token, so a user who approved and made no
call within the code's lifetime (15 minutes at Microsoft Entra ID) found it expired at the first
call: ``expired_token``, the credential parked, the whole device flow to be done again. This loop
asks for every such credential every ``DEVICE_POLL_SECONDS``; the token manager keeps to the
interval the server asks for (RFC 8628 §3.5).

A credential whose request fails (the endpoint refuses a parameter, or is down) is asked again
after a growing pause, up to ``MAX_BACKOFF`` seconds, not every round; a new device code (a new
version of the credential) starts afresh. With PostgreSQL replicas, each polls only the users of
the integrations whose websocket it owns (``owned``), so a code is not polled once per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from sqlmodel import Session, col, select

from cti_bridge.delivery.oauth import ReauthRequired, TokenEndpointError, TokenManager, TokenNotReady
from cti_bridge.logs import FailureStreak
from cti_bridge.ports import STATE_ACTIVE
from cti_bridge.store.db import Database
from cti_bridge.store.models import CrmContext, UserCredentials

log = logging.getLogger(__name__)

#: How often the credentials waiting on a device code are asked for (RFC 8628's default interval).
DEVICE_POLL_SECONDS = 5.0
#: The longest pause after failed requests for one credential.
MAX_BACKOFF = 300.0


def waiting_on_device_codes(session: Session) -> list[tuple[int, int, int]]:
    """(credential id, its integration, its version) of the active credentials with a device code
    and no refresh token yet."""
    query = (
        select(UserCredentials.id, CrmContext.xelion_context_id, UserCredentials.version)
        .join(CrmContext, col(CrmContext.id) == col(UserCredentials.crm_context_id))
        .where(
            col(UserCredentials.device_code_enc).is_not(None),
            col(UserCredentials.refresh_token_enc).is_(None),
            UserCredentials.state == STATE_ACTIVE,
        )
    )
    return [(i, x, v) for i, x, v in session.exec(query).all() if i is not None]


class DeviceCodePoller:
    """Turns approved device codes into refresh tokens before they expire (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        tokens: TokenManager[int],
        every: float = DEVICE_POLL_SECONDS,
        *,
        owned: Callable[[int], bool] = lambda _xelion_context_id: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.tokens = tokens
        self.every = every
        self.owned = owned
        self.clock = clock
        # credential -> (its version, not before this time, the pause that set it)
        self._backoff: dict[int, tuple[int, float, float]] = {}
        self._failures = FailureStreak(log, "polling the device codes", level=logging.WARNING)

    async def poll_once(self) -> int:
        """Ask once for each credential waiting on its device code (and not pausing after a
        failure); returns how many got tokens."""
        granted = 0
        waiting = await self.db.run(waiting_on_device_codes)
        self._backoff = {k: b for k, b in self._backoff.items() if k in {c for c, _, _ in waiting}}
        for credential_id, xelion_context_id, version in waiting:
            if not self.owned(xelion_context_id):
                continue  # another replica owns this integration: it polls
            paused = self._backoff.get(credential_id)
            if paused is not None and paused[0] == version and self.clock() < paused[1]:
                continue
            try:
                await self.tokens.get(credential_id)
                granted += 1
                self._backoff.pop(credential_id, None)
            except TokenNotReady:
                self._backoff.pop(credential_id, None)  # not approved yet: the server's interval
            except ReauthRequired:
                self._backoff.pop(credential_id, None)  # parked (logged): no longer waiting
            except TokenEndpointError:
                # Logged by the token manager. Asked again after a pause that doubles each time.
                last = paused[2] if paused is not None and paused[0] == version else self.every / 2
                pause = min(MAX_BACKOFF, max(self.every, last * 2))
                self._backoff[credential_id] = (version, self.clock() + pause, pause)
        return granted

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every ``every`` seconds until ``stop`` is set. Cancellation: ends the loop; a token
        request under way runs on to its commit (the manager shields it)."""
        while not stop.is_set():
            try:
                await self.poll_once()
                self._failures.recovered()
            except Exception as exc:  # a database blip must not end the loop
                self._failures.failed(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every)
