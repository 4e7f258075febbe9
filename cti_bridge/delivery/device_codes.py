"""Polls the token endpoint for users waiting on a device code, calls or no calls.

A user given a device code (``deviceCode`` in the manual's user credentials) approves it at the
provider; the first token request after that turns the code into a refresh token. That request
was made only when one of the user's deliveries needed a token, so a user who approved and made no
call within the code's lifetime (15 minutes at Microsoft Entra ID) found it expired at the first
call: ``expired_token``, the credential parked, the whole device flow to be done again. This loop
asks for every such credential every ``DEVICE_POLL_SECONDS``; the token manager keeps to the
interval the server asks for (RFC 8628 §3.5) and, across PostgreSQL replicas, to one request at a
time per credential (``TokenManager``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlmodel import Session, col, select

from cti_bridge.delivery.oauth import ReauthRequired, TokenEndpointError, TokenManager, TokenNotReady
from cti_bridge.logs import FailureStreak
from cti_bridge.ports import STATE_ACTIVE
from cti_bridge.store.db import Database
from cti_bridge.store.models import UserCredentials

log = logging.getLogger(__name__)

#: How often the credentials waiting on a device code are asked for (RFC 8628's default interval).
DEVICE_POLL_SECONDS = 5.0


def waiting_on_device_codes(session: Session) -> list[int]:
    """The active credentials with a device code and no refresh token yet."""
    query = select(UserCredentials.id).where(
        col(UserCredentials.device_code_enc).is_not(None),
        col(UserCredentials.refresh_token_enc).is_(None),
        UserCredentials.state == STATE_ACTIVE,
    )
    return [i for i in session.exec(query).all() if i is not None]


class DeviceCodePoller:
    """Turns approved device codes into refresh tokens before they expire (see the module docstring)."""

    def __init__(self, db: Database, tokens: TokenManager[int], every: float = DEVICE_POLL_SECONDS) -> None:
        self.db = db
        self.tokens = tokens
        self.every = every
        self._failures = FailureStreak(log, "polling the device codes", level=logging.WARNING)

    async def poll_once(self) -> int:
        """Ask once for each credential waiting on its device code; returns how many got tokens."""
        granted = 0
        for credential_id in await self.db.run(waiting_on_device_codes):
            try:
                await self.tokens.get(credential_id)
                granted += 1
            except TokenNotReady:
                pass  # not approved yet, or asked too soon: the next round
            except (ReauthRequired, TokenEndpointError):
                pass  # logged by the token manager; the credential says why (or is parked)
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
