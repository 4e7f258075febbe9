"""Queries behind the admin API: integrations, their CRM contexts, user credentials, mappings, sessions.

Every function takes an open ``Session`` and runs inside the caller's unit of work
(``Database.run``), so that a route's whole change commits or rolls back as one transaction: an
integration is created with its contexts, credentials and mappings together, and a mapping PUT retires
the old rows and inserts the new ones together.

Secrets go through ``SecretBox`` on the way in (``*_enc`` columns); nothing here returns one except
``admin_credentials``, which the admin API needs to compare and to call Xelion with.

The functions return plain frozen dataclasses, not ORM rows, so nothing lazy escapes the session.
Ids come from URLs: an id outside PostgreSQL's ``integer`` range is simply not found (asking the
database for it would be an error, not an empty answer).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, select

from cti_bridge.store.crypto import SecretBox
from cti_bridge.store.deliveries import bury_parked, unpark_credential
from cti_bridge.store.models import (
    AdminSession,
    CrmContext,
    EventUriMapping,
    SourceGap,
    UserCredentials,
    XelionContext,
)

INT_MAX = 2**31 - 1
MAX_GAPS = 20


class StoreConflict(Exception):
    """The change would duplicate an integration (host + tenant) or a user in a CRM context."""


def valid_id(ident: int) -> bool:
    """Whether ``ident`` can be a row id (a positive 32-bit integer)."""
    return 0 < ident <= INT_MAX


@dataclass(frozen=True)
class CredentialInput:
    xelion_username: str
    xelion_oid: str | None
    client_id: str | None
    client_secret: str | None
    device_code: str | None
    refresh_token: str | None


@dataclass(frozen=True)
class MappingInput:
    xelion_event: str
    crm_resource_uri: str
    crm_resource_payload: object
    method: str | None = None
    headers: dict[str, str] | None = None
    content_type: str | None = None
    condition: str | None = None


@dataclass(frozen=True)
class XelionView:
    id: int
    host: str
    protocol: str
    tenant: str
    source_state: str
    source_error: str | None
    last_event_at: datetime | None


@dataclass(frozen=True)
class CrmView:
    id: int
    xelion_context_id: int
    authorization_server_uri: str
    authorization_header_prefix: str
    token_auth_method: str
    token_parameters: Mapping[str, str] | None = None


@dataclass(frozen=True)
class IntegrationView:
    xelion: XelionView
    crm: CrmView | None


@dataclass(frozen=True)
class GapView:
    started_at: datetime
    ended_at: datetime | None
    reason: str | None


@dataclass(frozen=True)
class CredentialView:
    id: int
    crm_context_id: int
    xelion_context_id: int
    xelion_username: str
    xelion_oid: str | None
    state: str


@dataclass(frozen=True)
class MappingView:
    id: int
    xelion_event: str
    crm_resource_uri: str
    crm_resource_payload: object
    method: str
    headers: dict[str, str] | None
    content_type: str | None
    condition: str | None
    created_at: datetime


def _xview(row: XelionContext) -> XelionView:
    assert row.id is not None
    return XelionView(
        id=row.id,
        host=row.host,
        protocol=row.protocol,
        tenant=row.tenant,
        source_state=row.source_state,
        source_error=row.source_error,
        last_event_at=row.last_event_at,
    )


def _cview(row: CrmContext) -> CrmView:
    assert row.id is not None
    return CrmView(
        id=row.id,
        xelion_context_id=row.xelion_context_id,
        authorization_server_uri=row.authorization_server_uri,
        authorization_header_prefix=row.authorization_header_prefix,
        token_auth_method=row.token_auth_method,
        token_parameters=token_parameters_of(row),
    )


def token_parameters_of(row: CrmContext) -> dict[str, str] | None:
    """A CRM context's extra token request parameters (``crmContext.tokenRequestParameters``)."""
    return json.loads(row.token_parameters) if row.token_parameters else None


def _credview(row: UserCredentials, xelion_context_id: int) -> CredentialView:
    assert row.id is not None
    return CredentialView(
        id=row.id,
        crm_context_id=row.crm_context_id,
        xelion_context_id=xelion_context_id,
        xelion_username=row.xelion_username,
        xelion_oid=row.xelion_oid,
        state=row.state,
    )


def _mview(row: EventUriMapping) -> MappingView:
    assert row.id is not None
    payload: object = None if row.crm_resource_payload is None else json.loads(row.crm_resource_payload)
    headers: dict[str, str] | None = None if row.headers is None else json.loads(row.headers)
    return MappingView(
        id=row.id,
        xelion_event=row.xelion_event,
        crm_resource_uri=row.crm_resource_uri,
        crm_resource_payload=payload,
        method=row.method,
        headers=headers,
        content_type=row.content_type,
        condition=row.condition,
        created_at=row.created_at,
    )


# --- integrations --------------------------------------------------------------------------------


def _find_row(
    session: Session, host: str, tenant: str, *, exclude_id: int | None = None
) -> XelionContext | None:
    # Host names are case-insensitive (RFC 4343); tenants are URL path segments, compared exactly.
    stmt = select(XelionContext).where(
        func.lower(XelionContext.host) == host.lower(), XelionContext.tenant == tenant
    )
    if exclude_id is not None:
        stmt = stmt.where(XelionContext.id != exclude_id)
    return session.exec(stmt).first()


def _first_crm(session: Session, xelion_context_id: int) -> CrmContext | None:
    # The manual's model has exactly one CRM context per Xelion context; "first" keeps it that way
    # even if a later extension adds more.
    stmt = (
        select(CrmContext)
        .where(CrmContext.xelion_context_id == xelion_context_id)
        .order_by(col(CrmContext.id))
    )
    return session.exec(stmt).first()


def integration_exists(session: Session, host: str, tenant: str) -> bool:
    return _find_row(session, host, tenant) is not None


def create_integration(
    session: Session,
    box: SecretBox,
    *,
    host: str,
    protocol: str,
    tenant: str,
    admin_username: str,
    admin_password: str,
    authorization_server_uri: str,
    authorization_header_prefix: str,
    token_auth_method: str,
    credentials: Sequence[CredentialInput],
    mappings: Sequence[MappingInput],
    now: datetime,
    token_parameters: Mapping[str, str] | None = None,
) -> IntegrationView:
    """Insert an integration with its CRM context, credentials and mappings; StoreConflict if its
    host + tenant exists (checked here and, against a concurrent insert, by the unique constraint)."""
    if _find_row(session, host, tenant) is not None:
        raise StoreConflict(f"an integration for host {host} and tenant {tenant} exists")
    xrow = XelionContext(
        host=host,
        protocol=protocol,
        tenant=tenant,
        admin_username=admin_username,
        admin_password_enc=box.encrypt(admin_password),
        created_at=now,
        updated_at=now,
    )
    session.add(xrow)
    try:
        session.flush()
    except IntegrityError:
        raise StoreConflict(f"an integration for host {host} and tenant {tenant} exists") from None
    assert xrow.id is not None
    crow = CrmContext(
        xelion_context_id=xrow.id,
        authorization_server_uri=authorization_server_uri,
        authorization_header_prefix=authorization_header_prefix,
        token_auth_method=token_auth_method,
        token_parameters=json.dumps(dict(token_parameters)) if token_parameters else None,
        created_at=now,
    )
    session.add(crow)
    session.flush()
    assert crow.id is not None
    add_credentials(session, box, crow.id, credentials, now=now)
    _insert_mappings(session, crow.id, mappings, now)
    return IntegrationView(_xview(xrow), _cview(crow))


def find_integration(session: Session, host: str, tenant: str) -> IntegrationView | None:
    row = _find_row(session, host, tenant)
    if row is None:
        return None
    crm = _first_crm(session, row.id or 0)
    return IntegrationView(_xview(row), None if crm is None else _cview(crm))


def get_integration(session: Session, xelion_context_id: int) -> IntegrationView | None:
    if not valid_id(xelion_context_id):
        return None
    row = session.get(XelionContext, xelion_context_id)
    if row is None:
        return None
    crm = _first_crm(session, xelion_context_id)
    return IntegrationView(_xview(row), None if crm is None else _cview(crm))


def list_integrations(
    session: Session, *, offset: int, limit: int | None
) -> tuple[list[IntegrationView], int]:
    total = session.exec(select(func.count()).select_from(XelionContext)).one()
    rows = session.exec(
        select(XelionContext).order_by(col(XelionContext.id)).offset(offset).limit(limit)
    ).all()
    out = []
    for row in rows:
        crm = _first_crm(session, row.id or 0)
        out.append(IntegrationView(_xview(row), None if crm is None else _cview(crm)))
    return out, int(total)


def recent_gaps(session: Session, xelion_context_id: int, limit: int = MAX_GAPS) -> list[GapView]:
    """The newest source gaps of an integration (reliability.md §18), newest first."""
    stmt = (
        select(SourceGap)
        .where(SourceGap.xelion_context_id == xelion_context_id)
        .order_by(col(SourceGap.started_at).desc(), col(SourceGap.id).desc())
        .limit(limit)
    )
    return [GapView(g.started_at, g.ended_at, g.reason) for g in session.exec(stmt).all()]


def delete_integration(session: Session, xelion_context_id: int) -> bool:
    """Delete an integration and, by ``ON DELETE CASCADE``, everything that belongs to it."""
    if not valid_id(xelion_context_id):
        return False
    result = session.execute(delete(XelionContext).where(col(XelionContext.id) == xelion_context_id))
    return bool(getattr(result, "rowcount", 0))


def crm_context_of(session: Session, xelion_context_id: int, crm_context_id: int) -> CrmView | None:
    """The CRM context ``crm_context_id`` if it belongs to ``xelion_context_id``."""
    if not (valid_id(xelion_context_id) and valid_id(crm_context_id)):
        return None
    row = session.get(CrmContext, crm_context_id)
    if row is None or row.xelion_context_id != xelion_context_id:
        return None
    return _cview(row)


# --- xelion environment and admin credentials ----------------------------------------------------


def update_environment(
    session: Session, xelion_context_id: int, *, host: str, tenant: str, protocol: str | None, now: datetime
) -> XelionView | None:
    """Change host, tenant and protocol; None if unknown; StoreConflict if another integration has them."""
    row = session.get(XelionContext, xelion_context_id) if valid_id(xelion_context_id) else None
    if row is None:
        return None
    if _find_row(session, host, tenant, exclude_id=xelion_context_id) is not None:
        raise StoreConflict(f"another integration uses host {host} and tenant {tenant}")
    row.host = host
    row.tenant = tenant
    if protocol is not None:
        row.protocol = protocol
    row.updated_at = now
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        raise StoreConflict(f"another integration uses host {host} and tenant {tenant}") from None
    return _xview(row)


def admin_credentials(session: Session, box: SecretBox, xelion_context_id: int) -> tuple[str, str] | None:
    """The stored admin user name and (decrypted) password of an integration."""
    row = session.get(XelionContext, xelion_context_id) if valid_id(xelion_context_id) else None
    if row is None:
        return None
    return row.admin_username, box.decrypt(row.admin_password_enc)


def set_admin_credentials(
    session: Session,
    box: SecretBox,
    xelion_context_id: int,
    *,
    username: str | None = None,
    password: str | None = None,
    now: datetime,
    keep_session: str | None = None,
) -> bool:
    """Set new admin credentials; every admin API session of the integration ends, but the one
    whose token hash is ``keep_session`` (the caller's)."""
    row = session.get(XelionContext, xelion_context_id) if valid_id(xelion_context_id) else None
    if row is None:
        return False
    if username is not None:
        row.admin_username = username
    if password is not None:
        row.admin_password_enc = box.encrypt(password)
    # The source's stored Xelion session belongs to the old credentials; it ends it on next login.
    row.updated_at = now
    session.add(row)
    # The admin API sessions were opened with the old credentials: whoever else held one (perhaps
    # the reason for the change) logs in again with the new ones.
    ended = delete(AdminSession).where(col(AdminSession.xelion_context_id) == xelion_context_id)
    if keep_session is not None:
        ended = ended.where(col(AdminSession.token_hash) != keep_session)
    session.execute(ended)
    return True


# --- user credentials ----------------------------------------------------------------------------


def add_credentials(
    session: Session,
    box: SecretBox,
    crm_context_id: int,
    credentials: Sequence[CredentialInput],
    *,
    now: datetime,
) -> list[CredentialView]:
    """Insert users' credentials; StoreConflict if a user is already in this CRM context."""
    crm = session.get(CrmContext, crm_context_id)
    assert crm is not None
    seen: set[str] = set()
    for cred in credentials:
        if cred.xelion_username in seen:
            raise StoreConflict(f"user {cred.xelion_username} is given twice")
        seen.add(cred.xelion_username)
    if seen:
        existing = session.exec(
            select(UserCredentials.xelion_username).where(
                UserCredentials.crm_context_id == crm_context_id,
                col(UserCredentials.xelion_username).in_(sorted(seen)),
            )
        ).first()
        if existing is not None:
            raise StoreConflict(f"user {existing} already has credentials in this CRM context")
    rows = []
    for cred in credentials:
        row = UserCredentials(
            crm_context_id=crm_context_id,
            xelion_username=cred.xelion_username,
            xelion_oid=cred.xelion_oid,
            client_id=cred.client_id,
            client_secret_enc=box.encrypt_opt(cred.client_secret),
            device_code_enc=box.encrypt_opt(cred.device_code),
            refresh_token_enc=box.encrypt_opt(cred.refresh_token),
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        rows.append(row)
    try:
        session.flush()
    except IntegrityError:
        raise StoreConflict("a user already has credentials in this CRM context") from None
    return [_credview(r, crm.xelion_context_id) for r in rows]


def list_credentials(
    session: Session,
    crm_context_id: int,
    *,
    username: str | None,
    oid: str | None,
    offset: int,
    limit: int | None,
) -> tuple[list[CredentialView], int]:
    crm = session.get(CrmContext, crm_context_id)
    assert crm is not None
    conds = [UserCredentials.crm_context_id == crm_context_id]
    if username is not None:
        conds.append(UserCredentials.xelion_username == username)
    if oid is not None:
        conds.append(UserCredentials.xelion_oid == oid)
    total = session.exec(select(func.count()).select_from(UserCredentials).where(*conds)).one()
    rows = session.exec(
        select(UserCredentials).where(*conds).order_by(col(UserCredentials.id)).offset(offset).limit(limit)
    ).all()
    return [_credview(r, crm.xelion_context_id) for r in rows], int(total)


def _credential_row(
    session: Session, credential_id: int, *, for_update: bool = False
) -> tuple[UserCredentials, int] | None:
    """The credential and its integration's id. ``for_update``: the row is read locked (PostgreSQL
    ``FOR NO KEY UPDATE``; SQLite's write lock already serialises), so a change computed from it
    (``version + 1``) cannot race a replica's token save between the read and the write."""
    if not valid_id(credential_id):
        return None
    row = session.get(
        UserCredentials, credential_id, with_for_update={"key_share": True} if for_update else None
    )
    if row is None:
        return None
    crm = session.get(CrmContext, row.crm_context_id)
    assert crm is not None
    return row, crm.xelion_context_id


def get_credential(session: Session, credential_id: int) -> CredentialView | None:
    found = _credential_row(session, credential_id)
    return None if found is None else _credview(*found)


def update_identity(
    session: Session,
    credential_id: int,
    *,
    xelion_username: str | None,
    xelion_oid: str | None,
    now: datetime,
) -> CredentialView | None:
    """Change a user's Xelion user name and/or oid; StoreConflict if the name is taken in its context."""
    found = _credential_row(session, credential_id)
    if found is None:
        return None
    row, xid = found
    if xelion_username is not None and xelion_username != row.xelion_username:
        taken = session.exec(
            select(UserCredentials.id).where(
                UserCredentials.crm_context_id == row.crm_context_id,
                UserCredentials.xelion_username == xelion_username,
            )
        ).first()
        if taken is not None:
            raise StoreConflict(f"user {xelion_username} already has credentials in this CRM context")
        row.xelion_username = xelion_username
    if xelion_oid is not None and xelion_oid != row.xelion_oid:
        # Events name their users by oid as well as by name, and routing keeps one user per oid:
        # a second one would silently take the first one's events.
        holder = session.exec(
            select(UserCredentials.xelion_username).where(
                UserCredentials.crm_context_id == row.crm_context_id,
                UserCredentials.xelion_oid == xelion_oid,
                col(UserCredentials.id) != credential_id,
            )
        ).first()
        if holder is not None:
            raise StoreConflict(f"oid {xelion_oid} is user {holder}'s in this CRM context")
        row.xelion_oid = xelion_oid
    row.updated_at = now
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        raise StoreConflict(f"user {xelion_username} already has credentials in this CRM context") from None
    return _credview(row, xid)


#: Why a deleted user's parked deliveries are dead (as the worker says of its pending ones).
CREDENTIALS_DELETED = "the user's credentials were deleted"


def delete_credential(session: Session, credential_id: int, *, now: datetime) -> bool:
    """Delete a user's credentials. Its parked deliveries become ``dead`` in the same transaction:
    left parked (their ``credential_id`` set to NULL by the foreign key) nothing could ever resume
    them, and retention never deletes unfinished work. Pending ones go dead when the worker meets
    them with no credentials; one in flight keeps its outcome."""
    if not valid_id(credential_id):
        return False
    # Locked first (PostgreSQL): a completion or an ingest parking this user's deliveries holds
    # the row (``reauth_required``) until it commits; buried before it committed, its parked rows
    # then lost their credential to the DELETE and stayed parked for ever (a review's finding).
    if session.get(UserCredentials, credential_id, with_for_update=True) is None:
        return False
    bury_parked(session, credential_id=credential_id, reason=CREDENTIALS_DELETED, now=now)
    result = session.execute(delete(UserCredentials).where(col(UserCredentials.id) == credential_id))
    return bool(getattr(result, "rowcount", 0))


SECRET_KINDS = ("clientid", "clientsecret", "refreshtoken", "devicecode")


def update_secret(
    session: Session, box: SecretBox, credential_id: int, kind: str, value: str, *, now: datetime
) -> CredentialView | None:
    """Set one of a user's OAuth2 credentials (the manual's ``{oauthCredentialsType}``).

    Every change bumps ``version``, so a token refresh that began before it cannot overwrite it.
    A new refresh token or device code is the operator's answer to ``reauth_required``: the user
    becomes ``active`` again. Every kind drops the stored access token (below). A new device code
    also drops the refresh token: the token manager uses a device code only when there is no
    refresh token (RFC 8628 then yields a new one), so keeping a dead refresh token would leave the
    new code unused.

    A new client id or secret is a repair too: ``reauth_required`` also comes from the client
    (``invalid_client``, ``unauthorized_client``, no client id set), which the grant cannot mend,
    and with a rotating grant the operator may hold no refresh token that still works: the user
    stayed parked for good, however the client was put right. So the user becomes ``active`` and
    its deliveries resume; if the grant itself is what the server refuses, the next token request
    says so once and parks them again.
    """
    if kind not in SECRET_KINDS:
        raise ValueError(f"unknown credential type {kind}")
    # Locked: a replica's token save between this read and the write below would otherwise end at
    # the same version (both v+1), and the other replicas would never see the change
    # (TokenManager.drop_changed), nor would the save's compare-and-set fail.
    found = _credential_row(session, credential_id, for_update=True)
    if found is None:
        return None
    row, xid = found
    if kind == "clientid":
        row.client_id = value
    elif kind == "clientsecret":
        row.client_secret_enc = box.encrypt(value)
    elif kind == "refreshtoken":
        row.refresh_token_enc = box.encrypt(value)
    else:
        row.device_code_enc = box.encrypt(value)
        row.refresh_token_enc = None
    # Every kind drops the stored access token (README, the admin API). A new client id or secret
    # kept the old client's, which the daemon went on sending until it expired (an hour, or for
    # good with a CRM that gives no expiry): a client rotated after a leak, or revoked, still
    # worked for the daemon, and whether the new one does was only found out then (an operator
    # walkthrough's finding). The next delivery now asks for a token with the new client.
    row.access_token_enc = None
    row.access_token_expires_at = None
    repaired = kind in ("refreshtoken", "devicecode") or row.state == "reauth_required"
    if repaired:
        row.state = "active"
        row.state_reason = None
    row.version += 1
    row.updated_at = now
    session.add(row)
    session.flush()
    if repaired:
        # The user's parked deliveries resume in the same transaction as the repair: done in a
        # task after the commit (as it was), a crash or a failing statement in between left them
        # parked behind an active credential, and nothing ever looked at them again (§13).
        unpark_credential(session, credential_id=credential_id, now=now)
    return _credview(row, xid)


# --- event uri mappings --------------------------------------------------------------------------


#: The stored columns of a mapping, in the order ``_stored`` gives them.
_MAPPING_COLUMNS = (
    "xelion_event",
    "crm_resource_uri",
    "crm_resource_payload",
    "method",
    "headers",
    "content_type",
    "condition",
)


def _stored(m: MappingInput) -> tuple[str, str, str | None, str, str | None, str | None, str | None]:
    """What a mapping's row holds, in ``_MAPPING_COLUMNS`` order."""
    return (
        m.xelion_event,
        m.crm_resource_uri,
        # null stays NULL: "no body" (the manual's zoho example), not the JSON text "null".
        None if m.crm_resource_payload is None else json.dumps(m.crm_resource_payload, ensure_ascii=False),
        m.method or "POST",
        None if m.headers is None else json.dumps(m.headers, ensure_ascii=False),
        m.content_type,
        m.condition,
    )


#: Where ``_stored`` puts the JSON texts (payload, headers).
_JSON_COLUMNS = frozenset(_MAPPING_COLUMNS.index(c) for c in ("crm_resource_payload", "headers"))


def _canonical(values: tuple[str | None, ...]) -> tuple[str | None, ...]:
    """A ``_stored`` tuple with its JSON texts (payload, headers) in one form: members sorted.
    JSON objects are unordered (RFC 8259 §4), and compared as texts a PUT whose tool reorders
    keys retired every mapping each time (a review's finding: 10 PUTs, 10 rows). As texts, not as
    Python objects, so that 1, 1.0 and true stay three values."""
    return tuple(
        json.dumps(json.loads(v), sort_keys=True, ensure_ascii=False)
        if i in _JSON_COLUMNS and v is not None
        else v
        for i, v in enumerate(values)
    )


def _insert_mappings(
    session: Session, crm_context_id: int, mappings: Sequence[MappingInput], now: datetime
) -> list[EventUriMapping]:
    rows = []
    for position, m in enumerate(mappings):
        event, uri, payload, method, headers, content_type, condition = _stored(m)
        row = EventUriMapping(
            crm_context_id=crm_context_id,
            xelion_event=event,
            crm_resource_uri=uri,
            crm_resource_payload=payload,
            method=method,
            headers=headers,
            content_type=content_type,
            condition=condition,
            position=position,
            created_at=now,
        )
        session.add(row)
        rows.append(row)
    session.flush()
    return rows


def list_mappings(
    session: Session, crm_context_id: int, *, offset: int, limit: int | None
) -> tuple[list[MappingView], int]:
    """The current (not retired) mappings of a CRM context, in the order they were given."""
    conds: list[ColumnElement[bool]] = [
        col(EventUriMapping.crm_context_id) == crm_context_id,
        col(EventUriMapping.retired).is_(False),
    ]
    total = session.exec(select(func.count()).select_from(EventUriMapping).where(*conds)).one()
    rows = session.exec(
        select(EventUriMapping)
        .where(*conds)
        .order_by(col(EventUriMapping.position), col(EventUriMapping.id))
        .offset(offset)
        .limit(limit)
    ).all()
    return [_mview(r) for r in rows], int(total)


def replace_mappings(
    session: Session, crm_context_id: int, mappings: Sequence[MappingInput], *, now: datetime
) -> list[MappingView]:
    """Retire the current mappings and insert ``mappings``, in the caller's one transaction.

    Rows are never rewritten in place: a delivery created before the change still renders the
    mapping it was made for (it references the mapping's id).

    The same set again (every mapping as stored, in the same order) changes nothing and answers
    the current rows: a provisioning script that PUTs its configuration every few minutes retired
    and re-inserted every mapping each time, rows that nothing ever deletes (a retention review's
    finding: 50 PUTs, 50 sets of retired rows for good). The payload's and headers' members may
    come in another order (a tool that does not keep JSON key order, `_canonical`): the same set,
    kept in its stored order. Locked, so a PUT meanwhile waits.
    """
    current = list(
        session.exec(
            select(EventUriMapping)
            .where(
                col(EventUriMapping.crm_context_id) == crm_context_id, col(EventUriMapping.retired).is_(False)
            )
            .order_by(col(EventUriMapping.position), col(EventUriMapping.id))
            .with_for_update()
        )
    )
    stored = [_canonical(tuple(getattr(row, c) for c in _MAPPING_COLUMNS)) for row in current]
    if current and stored == [_canonical(_stored(m)) for m in mappings]:
        return [_mview(r) for r in current]
    session.execute(
        update(EventUriMapping)
        .where(col(EventUriMapping.crm_context_id) == crm_context_id, col(EventUriMapping.retired).is_(False))
        .values(retired=True)
    )
    return [_mview(r) for r in _insert_mappings(session, crm_context_id, mappings, now)]


# --- admin sessions ------------------------------------------------------------------------------


def create_session(
    session: Session, *, token_hash: str, xelion_context_id: int, valid_until: datetime, now: datetime
) -> None:
    """Store an ``api/session/login`` token (its hash) and drop sessions that have expired."""
    session.execute(delete(AdminSession).where(col(AdminSession.valid_until) <= now))
    session.add(
        AdminSession(
            token_hash=token_hash,
            xelion_context_id=xelion_context_id,
            valid_until=valid_until,
            created_at=now,
        )
    )


def session_context(session: Session, token_hash: str, now: datetime) -> int | None:
    """The integration a live session token reaches; None when unknown or expired."""
    row = session.exec(select(AdminSession).where(AdminSession.token_hash == token_hash)).first()
    if row is None or row.valid_until <= now:
        return None
    return row.xelion_context_id
