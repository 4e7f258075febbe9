"""Shared pieces of the token tests: a steppable clock, credential rows, and a manager over them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlmodel import Session

from cti_bridge.store.crypto import SecretBox
from cti_bridge.store.db import Database
from cti_bridge.store.models import CrmContext, UserCredentials, XelionContext

CLIENT_ID = "client-one"
CLIENT_SECRET = "client-secret-s3cr3t-value"


class FakeClock:
    """A clock that moves only when told (wall time and monotonic together)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC)
        self._mono = time.monotonic()

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._mono += seconds


class SteppedClock:
    """The system's clocks, with the wall clock moved by ``step`` (the monotonic one is not, as a
    wall-clock step leaves CLOCK_MONOTONIC alone)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def monotonic(self) -> float:
        return time.monotonic()

    def step(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@dataclass
class CredentialRow:
    id: int
    crm_context_id: int


async def add_credential(
    db: Database,
    box: SecretBox,
    token_endpoint: str,
    *,
    refresh_token: str | None = None,
    device_code: str | None = None,
    access_token: str | None = None,
    expires_at: datetime | None = None,
    client_id: str | None = CLIENT_ID,
    client_secret: str | None = CLIENT_SECRET,
    auth_method: str = "client_secret_post",
    username: str = "alice",
    token_parameters: str | None = None,
) -> CredentialRow:
    """A Xelion context, a CRM context with ``token_endpoint`` and one user credential."""

    def write(session: Session) -> CredentialRow:
        xc = XelionContext(
            host=f"xelion-{username}.example", tenant="t", admin_username="admin", admin_password_enc="x"
        )
        session.add(xc)
        session.flush()
        assert xc.id is not None
        crm = CrmContext(
            xelion_context_id=xc.id,
            authorization_server_uri=token_endpoint,
            token_auth_method=auth_method,
            token_parameters=token_parameters,
        )
        session.add(crm)
        session.flush()
        assert crm.id is not None
        cred = UserCredentials(
            crm_context_id=crm.id,
            xelion_username=username,
            client_id=client_id,
            client_secret_enc=box.encrypt_opt(client_secret),
            refresh_token_enc=box.encrypt_opt(refresh_token),
            device_code_enc=box.encrypt_opt(device_code),
            access_token_enc=box.encrypt_opt(access_token),
            access_token_expires_at=expires_at,
        )
        session.add(cred)
        session.flush()
        assert cred.id is not None
        return CredentialRow(cred.id, crm.id)

    return await db.run(write)


async def read_credential(db: Database, credential_id: int) -> UserCredentials:
    def read(session: Session) -> UserCredentials:
        row = session.get(UserCredentials, credential_id)
        assert row is not None
        return row

    return await db.run(read)


async def operator_sets_refresh_token(db: Database, box: SecretBox, credential_id: int, token: str) -> None:
    """What the admin API's ``refreshtoken/update`` does: new secret, version bumped, active."""

    def write(session: Session) -> None:
        row = session.get(UserCredentials, credential_id)
        assert row is not None
        row.refresh_token_enc = box.encrypt(token)
        row.version += 1
        row.state = "active"
        row.state_reason = None
        session.add(row)

    await db.run(write)


async def operator_sets_device_code(db: Database, box: SecretBox, credential_id: int, code: str) -> None:
    """What the admin API's ``devicecode/update`` does: the new code, no refresh token, version bumped."""

    def write(session: Session) -> None:
        row = session.get(UserCredentials, credential_id)
        assert row is not None
        row.device_code_enc = box.encrypt(code)
        row.refresh_token_enc = None
        row.version += 1
        row.state = "active"
        session.add(row)

    await db.run(write)
