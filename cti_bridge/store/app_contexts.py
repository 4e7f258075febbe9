"""The ``app_context`` table: a Xelion app user's OAuth2 credentials for an external API.

Written by ``POST api/cti-app-context`` (``save``), read by ``POST api/external-api-endpoint/call``
(``find``), and the token manager's persistence for that kind of credential (``TokenStore[int]`` of
delivery/oauth.py, keyed by the row id): one ``TokenManager`` implementation serves both
``user_credentials`` (store/tokens.py) and this table.

The approach is store/tokens.py's:

- Secrets (client secret, refresh and access tokens) are encrypted with ``SecretBox`` before they
  reach the database; the plain access token never leaves this module except to the token manager
  (``load``). Whether a caller's token is the one held is decided here (``find``), in constant time.
- Writes are compare-and-set on ``version`` (reliability.md §11, §13): a refresh that started before
  a second POST replaced the credentials neither overwrites them nor condemns them. Every change of
  the secrets bumps ``version`` in SQL (``version + 1``), so concurrent writers on PostgreSQL never
  lose an update.
- A refresh keeps the SHA-256 of the access token it replaced (``previous_access_token_hash``): a
  caller that still holds it (a request in flight during the refresh) is let through and learns the
  current token from the answer. A POST that replaces the credentials clears it: the user chose new
  tokens, and the old one opens nothing any more.

State, extras and client authentication are kept as for ``user_credentials``:

- ``state``/``state_reason``: a grant the authorization server refused (``invalid_grant``,
  ``invalid_client``, ...) is dead: ``mark_reauth_required`` sets ``reauth_required`` with the
  manager's reason (an OAuth2 error code, never a secret) and keeps every secret. ``load`` reports
  the state, so the manager raises ``ReauthRequired`` without calling the token endpoint (nor
  handing out the stored access token) until a new POST (``save``) makes the context ``active``
  again. A successful refresh (``save_tokens``) also makes it ``active``, as the protocol says.
- ``token_extra_enc``: the extra fields of the last token answer (``token_type``, ``scope``, ...),
  encrypted JSON like the secrets (they may carry instance URLs or ids); a POST clears them (they
  described the replaced token).
- ``token_auth_method``: how the client authenticates to the token endpoint
  (``client_secret_post`` or ``client_secret_basic``; a public client, without secret, sends only
  its id whatever the method), set by the POST.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from cti_bridge.clock import utcnow
from cti_bridge.errors import CredentialNotFound
from cti_bridge.ports import STATE_ACTIVE, STATE_REAUTH_REQUIRED, CredentialSnapshot
from cti_bridge.store.crypto import SecretBox, constant_time_equal, hash_token
from cti_bridge.store.db import LOCK_REFRESH_APP, Database
from cti_bridge.store.models import AppContext
from cti_bridge.store.tokens import Owners, snapshot_of, versions_of

# Compared against when a row has no access token, so that the answer takes as long either way.
_NO_TOKEN = "\x01" * 32
_MAX_REASON = 1000  # the width of app_context.state_reason


#: An app context's key in UTF-8 at most (``AppContextKey.too_large``): under PostgreSQL's 2,704
#: bytes for one entry of ``uq_app_context_key``.
KEY_MAX_BYTES = 2400


@dataclass(frozen=True, slots=True)
class AppContextKey:
    """What identifies an app context: the manual's lookup is an exact match on all four.

    ``host`` is compared in lower case (a DNS name is case-insensitive); the others exactly.
    """

    host: str
    tenant: str
    xelion_username: str
    authorization_server_uri: str

    def normalized(self) -> AppContextKey:
        return AppContextKey(
            self.host.strip().lower(), self.tenant, self.xelion_username, self.authorization_server_uri
        )

    def too_large(self) -> bool:
        """Whether the four together exceed ``KEY_MAX_BYTES`` in UTF-8: one entry of the unique
        index on them, which PostgreSQL refuses over 2,704 bytes."""
        parts = (self.host, self.tenant, self.xelion_username, self.authorization_server_uri)
        return sum(len(part.encode()) for part in parts) > KEY_MAX_BYTES


@dataclass(frozen=True, slots=True)
class AppContextInput:
    """The credentials of a ``POST api/cti-app-context``. ``repr`` leaves the secrets out."""

    key: AppContextKey
    authorization_header_prefix: str
    client_id: str
    client_secret: str | None = field(repr=False)
    refresh_token: str = field(repr=False)
    access_token: str = field(repr=False)
    # client_secret_post | client_secret_basic (delivery/oauth.py AUTH_METHODS); the route checks it.
    token_auth_method: str = "client_secret_post"  # noqa: S105 - a method name, not a secret


@dataclass(frozen=True, slots=True)
class AppContextMatch:
    """A stored context found for a call, and whether the caller's token is the one held for it
    (the current access token, or the one the last refresh replaced). Carries no secret."""

    id: int
    authorization_header_prefix: str
    token_ok: bool


def _key_clauses(key: AppContextKey) -> tuple[Any, ...]:
    return (
        col(AppContext.host) == key.host,
        col(AppContext.tenant) == key.tenant,
        col(AppContext.xelion_username) == key.xelion_username,
        col(AppContext.authorization_server_uri) == key.authorization_server_uri,
    )


class AppContextTokenStore:
    """``TokenStore[int]`` over ``app_context`` (the key is the row id), plus the two routes' reads
    and writes. Stateless beyond the database, the secret box and whose each context loaded is
    (``describe``): build it wherever needed."""

    def __init__(self, db: Database, box: SecretBox) -> None:
        self._db = db
        self._box = box
        # The Xelion user, host and tenant of each context loaded, for ``describe``.
        self._owners = Owners("app context")

    # --- the routes ----------------------------------------------------------------------------------

    async def save(self, data: AppContextInput, now: datetime) -> tuple[int, bool]:
        """Insert the credentials, or replace those stored under the same key. Returns the row id
        and whether it was created. A replacement bumps ``version`` (a refresh in flight then
        finds the version moved and keeps its hands off), forgets the expiry (the new access token's
        is unknown: it is used until a 401), the previous token's hash and the extra fields of the
        last token answer, and makes the context ``active`` again (a dead grant is revived by the
        user's new credentials).

        Cancellation: as ``Database.run`` (the transaction commits or rolls back whole).
        """
        key = data.key.normalized()
        box = self._box
        values: dict[str, Any] = {
            "authorization_header_prefix": data.authorization_header_prefix,
            "client_id": data.client_id,
            "client_secret_enc": box.encrypt_opt(data.client_secret),
            "refresh_token_enc": box.encrypt(data.refresh_token),
            "access_token_enc": box.encrypt(data.access_token),
            "previous_access_token_hash": None,
            "access_token_expires_at": None,
            "token_extra_enc": None,
            "token_auth_method": data.token_auth_method,
            "state": STATE_ACTIVE,
            "state_reason": None,
            "updated_at": now,
        }

        def write(session: Session) -> tuple[int, bool]:
            existing = session.exec(select(AppContext.id).where(*_key_clauses(key))).first()
            if existing is not None:
                session.exec(
                    update(AppContext)
                    .where(col(AppContext.id) == existing)
                    .values(**values, version=col(AppContext.version) + 1)
                )
                return int(existing), False
            row = AppContext(
                host=key.host,
                tenant=key.tenant,
                xelion_username=key.xelion_username,
                authorization_server_uri=key.authorization_server_uri,
                created_at=now,
                **values,
            )
            session.add(row)
            session.flush()
            assert row.id is not None
            return row.id, True

        try:
            return await self._db.run(write)
        except IntegrityError:
            # Two first POSTs for one key at once: the other one inserted; this one replaces it.
            return await self._db.run(write)

    async def delete(self, key: AppContextKey) -> int | None:
        """Delete the context stored under ``key`` with its secrets; its id, or None if there was
        none. Cancellation: as ``Database.run``."""
        wanted = key.normalized()

        def write(session: Session) -> int | None:
            found = session.exec(select(AppContext.id).where(*_key_clauses(wanted))).first()
            if found is None:
                return None
            session.exec(delete(AppContext).where(col(AppContext.id) == found))
            return int(found)

        return await self._db.run(write)

    async def find(self, key: AppContextKey, presented: str) -> AppContextMatch | None:
        """The context stored under ``key`` (None if there is none), and whether ``presented`` is
        its current access token or the one the last refresh replaced (both compared in constant
        time). Cancellation: as ``Database.run``."""
        wanted = key.normalized()
        box = self._box

        def read(session: Session) -> AppContextMatch | None:
            row = session.exec(select(AppContext).where(*_key_clauses(wanted))).first()
            if row is None or row.id is None:
                return None
            current = box.decrypt_opt(row.access_token_enc)
            is_current = constant_time_equal(presented, current or _NO_TOKEN) and current is not None
            previous = row.previous_access_token_hash
            is_previous = previous is not None and constant_time_equal(hash_token(presented), previous)
            return AppContextMatch(row.id, row.authorization_header_prefix, is_current or is_previous)

        return await self._db.run(read)

    # --- TokenStore[int] -------------------------------------------------------------------------------

    def describe(self, key: int) -> str:
        """``app context 5 (Xelion user anne, xelion.example.com tenant master)``; the id alone
        until loaded by this store."""
        return self._owners.describe(key)

    async def load(self, key: int) -> CredentialSnapshot:
        """The context as the token manager sees it, secrets decrypted. Cancellation: as
        ``Database.run`` (the read finishes in its thread; the caller stops waiting)."""
        box = self._box

        def read(session: Session) -> tuple[CredentialSnapshot, str]:
            row = session.get(AppContext, key)
            if row is None:
                raise CredentialNotFound(key)
            snapshot = snapshot_of(
                row,
                box,
                device_code=None,  # the manual's app contexts have no device grant
                token_endpoint=row.authorization_server_uri,
                auth_method=row.token_auth_method,
            )
            return snapshot, f"Xelion user {row.xelion_username}, {row.host} tenant {row.tenant}"

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
        The access token replaced is remembered by its hash; ``extra`` is stored encrypted (None
        when empty); the context becomes ``active``.

        Cancellation: the transaction handed to the database thread commits or rolls back whole;
        the caller (the manager's shielded refresh task) is not cancelled by its callers anyway.
        """
        box = self._box
        new_access_enc = box.encrypt(access_token)
        new_refresh_enc = box.encrypt_opt(refresh_token)
        new_extra_enc = box.encrypt(json.dumps(dict(extra))) if extra else None

        def write(session: Session) -> int:
            current = session.exec(
                select(AppContext.access_token_enc, AppContext.previous_access_token_hash).where(
                    col(AppContext.id) == key, col(AppContext.version) == snapshot_version
                )
            ).first()
            if current is None:
                return 0
            old_enc, previous_hash = current
            # Every change of the tokens bumps the version, so the token read at this version is
            # the one being replaced (the UPDATE below re-checks the version).
            old = box.decrypt_opt(old_enc)
            if old is not None and old != access_token:
                previous_hash = hash_token(old)
            statement = (
                update(AppContext)
                .where(col(AppContext.id) == key, col(AppContext.version) == snapshot_version)
                .values(
                    access_token_enc=new_access_enc,
                    access_token_expires_at=expires_at,
                    refresh_token_enc=new_refresh_enc,
                    token_extra_enc=new_extra_enc,
                    state=STATE_ACTIVE,
                    state_reason=None,
                    previous_access_token_hash=previous_hash,
                    version=snapshot_version + 1,
                    updated_at=utcnow(),
                )
            )
            return int(session.exec(statement).rowcount)

        changed = await self._db.run(write)
        return snapshot_version + 1 if changed == 1 else None

    async def mark_reauth_required(self, key: int, snapshot_version: int, reason: str) -> bool:
        """Set ``reauth_required`` with ``reason`` if still at ``snapshot_version``; the secrets
        are kept. The version is not bumped, as for ``user_credentials``: no secret changed, and a
        POST meanwhile has bumped it, so its new secrets are left alone (False: the manager
        reloads). Cancellation: as ``save_tokens``."""
        statement = (
            update(AppContext)
            .where(col(AppContext.id) == key, col(AppContext.version) == snapshot_version)
            .values(state=STATE_REAUTH_REQUIRED, state_reason=reason[:_MAX_REASON], updated_at=utcnow())
        )

        def write(session: Session) -> int:
            return int(session.exec(statement).rowcount)

        return await self._db.run(write) == 1

    def exclusive(self, key: int) -> AbstractAsyncContextManager[None]:
        """The refresh lock of the credential across replicas (delivery/oauth.py §10)."""
        return self._db.exclusive(LOCK_REFRESH_APP, key)

    async def versions(self) -> dict[int, int]:
        """Every credential's ``version`` (``TokenManager.drop_changed``)."""
        return await self._db.run(lambda s: versions_of(s, AppContext))
