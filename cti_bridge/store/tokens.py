"""The token manager's persistence for ``user_credentials`` (delivery/oauth.py ``TokenStore``).

Secrets are encrypted with ``SecretBox`` before they reach the database (reliability.md §14).
Writes are compare-and-set on ``version`` (reliability.md §11, §13): a refresh that started before
an operator set a new refresh token or device code neither overwrites those secrets nor marks them
``reauth_required``; the manager reloads and decides again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from cti_bridge.clock import utcnow
from cti_bridge.errors import CredentialNotFound
from cti_bridge.ports import STATE_ACTIVE, STATE_REAUTH_REQUIRED, CredentialSnapshot
from cti_bridge.store.crypto import SecretBox
from cti_bridge.store.db import LOCK_REFRESH_USER, Database
from cti_bridge.store.integrations import token_parameters_of
from cti_bridge.store.models import AppContext, CrmContext, UserCredentials

_MAX_REASON = 1000  # the width of user_credentials.state_reason
#: Credentials whose owner a store remembers at most (``describe``); all are forgotten when full.
MAX_OWNERS = 65536


class Owners:
    """Whose each credential a token store loaded is, for its ``describe``: noted by ``load``,
    which reads the row anyway; at most ``MAX_OWNERS`` (all forgotten when full)."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._owners: dict[int, str] = {}

    def note(self, key: int, owner: str) -> None:
        if len(self._owners) >= MAX_OWNERS and key not in self._owners:
            self._owners.clear()
        self._owners[key] = owner

    def describe(self, key: int) -> str:
        """``<label> 3 (<owner>)``; the id alone until loaded."""
        owner = self._owners.get(key)
        return f"{self._label} {key}" if owner is None else f"{self._label} {key} ({owner})"


def snapshot_of(
    row: UserCredentials | AppContext,
    box: SecretBox,
    *,
    device_code: str | None,
    token_endpoint: str,
    auth_method: str,
    token_parameters: Mapping[str, str] | None = None,
) -> CredentialSnapshot:
    """A stored credential as the token manager sees it, secrets decrypted. Shared by both kinds
    of credential (user credentials and app contexts), whose token columns have the same names."""
    extra_text = box.decrypt_opt(row.token_extra_enc)
    extra: dict[str, Any] = json.loads(extra_text) if extra_text else {}
    return CredentialSnapshot(
        client_id=row.client_id,
        client_secret=box.decrypt_opt(row.client_secret_enc),
        refresh_token=box.decrypt_opt(row.refresh_token_enc),
        device_code=device_code,
        access_token=box.decrypt_opt(row.access_token_enc),
        expires_at=row.access_token_expires_at,
        extra=extra,
        state=row.state,
        version=row.version,
        token_endpoint=token_endpoint,
        auth_method=auth_method,
        state_reason=row.state_reason,
        token_parameters=dict(token_parameters or {}),
    )


class UserCredentialTokenStore:
    """``TokenStore[int]`` over ``user_credentials``: the key is the credential id, the token
    endpoint and its client-authentication method come from the credential's CRM context."""

    def __init__(self, db: Database, box: SecretBox) -> None:
        self._db = db
        self._box = box
        # The Xelion user and the integration, which the operator needs for the repair
        # (``api/users/{id}``) and thinks in; the token manager loads a credential before anything
        # it logs of it.
        self._owners = Owners("user credential")

    def describe(self, key: int) -> str:
        """``user credential 3 (Xelion user anne, integration 1)``; the id alone until loaded."""
        return self._owners.describe(key)

    async def load(self, key: int) -> CredentialSnapshot:
        """The credential, secrets decrypted. Cancellation: as ``Database.run`` (the read finishes
        in its thread; the caller stops waiting)."""
        box = self._box

        def read(session: Session) -> tuple[CredentialSnapshot, str]:
            row = session.get(UserCredentials, key)
            if row is None:
                raise CredentialNotFound(key)
            context = session.get(CrmContext, row.crm_context_id)
            if context is None:
                raise CredentialNotFound(key)
            snapshot = snapshot_of(
                row,
                box,
                device_code=box.decrypt_opt(row.device_code_enc),
                token_endpoint=context.authorization_server_uri,
                auth_method=context.token_auth_method,
                token_parameters=token_parameters_of(context),
            )
            return snapshot, f"Xelion user {row.xelion_username}, integration {context.xelion_context_id}"

        snapshot, owner = await self._db.run(read)
        self._owners.note(key, owner)
        return snapshot

    async def save_tokens(
        self,
        key: int,
        snapshot_version: int,
        *,
        access_token: str,
        expires_at: datetime | None,
        refresh_token: str | None,
        extra: Mapping[str, Any],
        device_code_used: bool,
    ) -> int | None:
        """Commit the new tokens if still at ``snapshot_version`` (then bump it); None otherwise.

        Cancellation: the transaction handed to the database thread commits or rolls back whole;
        the caller (the manager's shielded refresh task) is not cancelled by its callers anyway.
        """
        values: dict[str, Any] = {
            "access_token_enc": self._box.encrypt(access_token),
            "access_token_expires_at": expires_at,
            "refresh_token_enc": self._box.encrypt_opt(refresh_token),
            "token_extra_enc": self._box.encrypt(json.dumps(dict(extra))) if extra else None,
            "state": STATE_ACTIVE,
            "state_reason": None,
            "version": snapshot_version + 1,
            "updated_at": utcnow(),
        }
        if device_code_used:
            values["device_code_enc"] = None  # single-use (RFC 8628): no reason to keep it
        statement = (
            update(UserCredentials)
            .where(col(UserCredentials.id) == key, col(UserCredentials.version) == snapshot_version)
            .values(**values)
        )

        def write(session: Session) -> int:
            return int(session.exec(statement).rowcount)

        changed = await self._db.run(write)
        return snapshot_version + 1 if changed == 1 else None

    async def mark_reauth_required(self, key: int, snapshot_version: int, reason: str) -> bool:
        """Set ``reauth_required`` with ``reason`` if still at ``snapshot_version``. The version is
        not bumped: no secret changed. Cancellation: as ``save_tokens``."""
        statement = (
            update(UserCredentials)
            .where(col(UserCredentials.id) == key, col(UserCredentials.version) == snapshot_version)
            .values(state=STATE_REAUTH_REQUIRED, state_reason=reason[:_MAX_REASON], updated_at=utcnow())
        )

        def write(session: Session) -> int:
            return int(session.exec(statement).rowcount)

        return await self._db.run(write) == 1

    def exclusive(self, key: int) -> AbstractAsyncContextManager[None]:
        """The refresh lock of the credential across replicas (delivery/oauth.py §10)."""
        return self._db.exclusive(LOCK_REFRESH_USER, key)

    async def versions(self) -> dict[int, int]:
        """Every credential's ``version`` (``TokenManager.drop_changed``)."""
        return await self._db.run(lambda s: versions_of(s, UserCredentials))


def versions_of(session: Session, model: type[UserCredentials] | type[AppContext]) -> dict[int, int]:
    """Every row's ``version`` by id, of either kind of credential (two columns of each row)."""
    rows = session.exec(select(col(model.id), col(model.version))).all()
    return {int(i): int(v) for i, v in rows if i is not None}
