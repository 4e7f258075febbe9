"""The tables of DESIGN.md §3, as SQLModel classes.

Conventions:
- Datetimes are timezone-aware UTC (``cti_bridge.clock.utcnow``); SQLModel's UTCDateTime columns
  store them as UTC on SQLite and PostgreSQL alike.
- A column ending in ``_enc`` holds ciphertext from ``store.crypto.SecretBox``; the plain value
  never reaches the database.
- JSON documents (event payloads, mapping payloads and headers) are stored as text: the exact
  document is what matters (templates are compiled from it), not querying inside it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.orm import Mapper
from sqlmodel import Field, SQLModel

from cti_bridge.clock import utcnow

# 64-bit ids on PostgreSQL; on SQLite only INTEGER PRIMARY KEY is the rowid alias that autoincrements.
BIGINT_ID = BigInteger().with_variant(Integer, "sqlite")
#: The states of a delivery not finished yet: it holds its call's place in line (reliability.md §3).
UNDELIVERED = ("pending", "sending", "parked")
#: The same as SQL: the condition of the partial index over undelivered deliveries, which the queries
#: that use it must repeat word for word (SQLite matches a partial index's condition as text, not as
#: logic), and of the per-call order rule.
UNDELIVERED_SQL = f"state IN ({', '.join(repr(s) for s in UNDELIVERED)})"
#: The deliveries waiting to be sent (not in flight): the condition of the partial index parking
#: reads (``ix_delivery_credential_waiting``), which its queries repeat word for word.
WAITING = ("pending", "parked")
WAITING_SQL = f"state IN ({', '.join(repr(s) for s in WAITING)})"


class XelionContext(SQLModel, table=True):
    """An integration's phone system, and the state of its websocket source."""

    __tablename__ = "xelion_context"
    __table_args__ = (UniqueConstraint("host", "tenant", name="uq_xelion_context_host_tenant"),)

    id: int | None = Field(default=None, primary_key=True)
    host: str = Field(max_length=255)
    protocol: str = Field(default="https", max_length=8)
    tenant: str = Field(max_length=255)
    app_key: str | None = Field(default=None, max_length=255)
    admin_username: str = Field(max_length=255)
    admin_password_enc: str = Field(sa_column=Column(Text, nullable=False))
    # The token of the source's live Xelion session: presented on the next login so that Xelion
    # ends the old session instead of answering 10005 (xelion-protocol.md §2).
    session_token_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    source_state: str = Field(default="stopped", max_length=16)
    source_error: str | None = Field(default=None, max_length=1000)
    last_event_at: datetime | None = None
    # The last time its source was known subscribed (``source_heartbeat_seconds``): after a
    # ``kill -9`` the downtime gap starts no earlier, however quiet the integration (§18).
    listened_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class CrmContext(SQLModel, table=True):
    """A CRM of an integration: where its tokens come from and how they are presented."""

    __tablename__ = "crm_context"

    id: int | None = Field(default=None, primary_key=True)
    xelion_context_id: int = Field(
        sa_column=Column(
            Integer, ForeignKey("xelion_context.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    authorization_server_uri: str = Field(max_length=2048)
    # Carries its own trailing space when the CRM wants one ("Bearer "), as the manual says.
    authorization_header_prefix: str = Field(default="Bearer ", max_length=255)
    token_auth_method: str = Field(default="client_secret_post", max_length=32)
    # More form parameters of every token request, JSON {name: value} (``scope`` for Entra ID's
    # v2 endpoint, ``resource`` for v1): no secrets, shown by the admin API.
    token_parameters: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(default_factory=utcnow)


class UserCredentials(SQLModel, table=True):
    """One Xelion user's OAuth2 credentials in one CRM context."""

    __tablename__ = "user_credentials"
    __table_args__ = (
        UniqueConstraint("crm_context_id", "xelion_username", name="uq_user_credentials_context_user"),
    )

    id: int | None = Field(default=None, primary_key=True)
    crm_context_id: int = Field(
        sa_column=Column(
            Integer, ForeignKey("crm_context.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    xelion_username: str = Field(max_length=255)
    xelion_oid: str | None = Field(default=None, max_length=64, index=True)
    client_id: str | None = Field(default=None, max_length=1024)
    client_secret_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    device_code_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    refresh_token_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    access_token_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    access_token_expires_at: datetime | None = None
    # The rest of the token endpoint's answer (instance_url, api_domain, ...), encrypted JSON:
    # templates may use it and it may be sensitive.
    token_extra_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    state: str = Field(default="active", max_length=32)  # active | reauth_required
    state_reason: str | None = Field(default=None, max_length=1000)
    # Bumped on every change of the secrets: a refresh that started before a change does not
    # overwrite what an operator set meanwhile.
    version: int = Field(default=1)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class EventUriMapping(SQLModel, table=True):
    """Which CRM request an event type makes. Rows are never rewritten in place: a PUT retires the
    old rows and inserts new ones, so a delivery keeps rendering the mapping it was created for."""

    __tablename__ = "event_uri_mapping"

    id: int | None = Field(default=None, primary_key=True)
    crm_context_id: int = Field(
        sa_column=Column(
            Integer, ForeignKey("crm_context.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    xelion_event: str = Field(max_length=64)
    crm_resource_uri: str = Field(sa_column=Column(Text, nullable=False))
    crm_resource_payload: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # JSON text
    method: str = Field(default="POST", max_length=8)
    headers: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # JSON object text
    content_type: str | None = Field(default=None, max_length=64)
    condition: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    position: int = Field(default=0)
    retired: bool = Field(default=False)
    created_at: datetime = Field(default_factory=utcnow)


class AppContext(SQLModel, table=True):
    """``cti-app-context`` credentials of a Xelion app user for an external API."""

    __tablename__ = "app_context"
    __table_args__ = (
        UniqueConstraint(
            "host", "tenant", "xelion_username", "authorization_server_uri", name="uq_app_context_key"
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    host: str = Field(max_length=255)
    tenant: str = Field(max_length=255)
    xelion_username: str = Field(max_length=255)
    authorization_server_uri: str = Field(max_length=2048)
    authorization_header_prefix: str = Field(default="", max_length=255)
    client_id: str | None = Field(default=None, max_length=1024)
    client_secret_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    refresh_token_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    access_token_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # Hash of the access token replaced last: a caller still holding it is let through once more.
    previous_access_token_hash: str | None = Field(default=None, max_length=128)
    access_token_expires_at: datetime | None = None
    # The rest of the token endpoint's answer, encrypted JSON (as for user credentials).
    token_extra_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # The server defaults are migration 0002's, which gave the rows already there these values.
    token_auth_method: str = Field(
        default="client_secret_post", max_length=32, sa_column_kwargs={"server_default": "client_secret_post"}
    )
    state: str = Field(default="active", max_length=32, sa_column_kwargs={"server_default": "active"})
    state_reason: str | None = Field(default=None, max_length=1000)
    version: int = Field(default=1)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class CallEvent(SQLModel, table=True):
    """Every call event received, once per dedupe key (xelion-protocol.md §4)."""

    __tablename__ = "call_event"

    id: int | None = Field(default=None, sa_column=Column(BIGINT_ID, primary_key=True))
    xelion_context_id: int = Field(
        sa_column=Column(
            Integer, ForeignKey("xelion_context.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    notification_type: str = Field(max_length=64)
    call_id: str = Field(max_length=255, index=True)
    dedupe_key: str = Field(max_length=64, unique=True)
    payload: str = Field(sa_column=Column(Text, nullable=False))  # the notification object, JSON text
    duplicates: int = Field(default=0)
    received_at: datetime = Field(default_factory=utcnow, index=True)


class Delivery(SQLModel, table=True):
    """One CRM request to make: per (event, mapping, user). ``id`` is a UUID, sent as Idempotency-Key."""

    __tablename__ = "delivery"
    __table_args__ = (
        # In claim order (store/deliveries.py ``claim_due``), so a claim stops at its LIMIT.
        Index("ix_delivery_due", "state", "next_attempt_at", "event_id", "mapping_id"),
        Index("ix_delivery_order", "ordering_key", "event_id"),
        # Waiting only (migrations 0005, 0009): parking reads it, it stays as small as the backlog,
        # and a delivery's claim and completion do not move an entry of it.
        Index(
            "ix_delivery_credential_waiting",
            "credential_id",
            "state",
            sqlite_where=text(WAITING_SQL),
            postgresql_where=text(WAITING_SQL),
        ),
    )

    id: str = Field(primary_key=True, max_length=36)
    event_id: int = Field(
        sa_column=Column(
            BIGINT_ID,
            ForeignKey("call_event.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        )
    )
    xelion_context_id: int = Field(
        sa_column=Column(
            Integer, ForeignKey("xelion_context.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    crm_context_id: int = Field(
        sa_column=Column(Integer, ForeignKey("crm_context.id", ondelete="CASCADE"), nullable=False)
    )
    mapping_id: int = Field(
        sa_column=Column(Integer, ForeignKey("event_uri_mapping.id", ondelete="CASCADE"), nullable=False)
    )
    credential_id: int | None = Field(
        default=None,
        sa_column=Column(Integer, ForeignKey("user_credentials.id", ondelete="SET NULL"), nullable=True),
    )
    xelion_username: str = Field(max_length=255)
    user_role: str = Field(max_length=8)  # caller | callee
    call_id: str = Field(max_length=255, index=True)
    # callId + credential: deliveries with the same key go in event order (reliability.md §3).
    ordering_key: str = Field(max_length=300)
    state: str = Field(default="pending", max_length=16)
    attempts: int = Field(default=0)
    next_attempt_at: datetime = Field(default_factory=utcnow)
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_expires_at: datetime | None = None
    last_status: int | None = None
    last_error: str | None = Field(default=None, max_length=2000)
    created_at: datetime = Field(default_factory=utcnow, index=True)
    updated_at: datetime = Field(default_factory=utcnow)
    delivered_at: datetime | None = None


class DeliveryAttempt(SQLModel, table=True):
    """One try of a delivery: what was sent (secrets masked) and what came back."""

    __tablename__ = "delivery_attempt"

    id: int | None = Field(default=None, sa_column=Column(BIGINT_ID, primary_key=True))
    delivery_id: str = Field(
        sa_column=Column(
            String(36), ForeignKey("delivery.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    attempt_no: int
    started_at: datetime = Field(default_factory=utcnow)
    duration_ms: int | None = None
    outcome: str = Field(max_length=16)  # delivered | retry | dead | parked | refresh
    http_status: int | None = None
    error: str | None = Field(default=None, max_length=2000)
    request_method: str = Field(max_length=8)
    request_url: str = Field(sa_column=Column(Text, nullable=False))
    request_excerpt: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    response_excerpt: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class AdminSession(SQLModel, table=True):
    """A token issued by ``api/session/login``: stored as a SHA-256 hash, reaches one integration."""

    __tablename__ = "admin_session"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(max_length=64, unique=True)
    xelion_context_id: int = Field(
        sa_column=Column(
            Integer, ForeignKey("xelion_context.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    valid_until: datetime
    created_at: datetime = Field(default_factory=utcnow)


class SourceGap(SQLModel, table=True):
    """A period without a live, subscribed websocket for an integration (reliability.md §18)."""

    __tablename__ = "source_gap"

    id: int | None = Field(default=None, primary_key=True)
    xelion_context_id: int = Field(
        sa_column=Column(
            Integer, ForeignKey("xelion_context.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    started_at: datetime
    ended_at: datetime | None = None
    reason: str | None = Field(default=None, max_length=500)


class IdHighWater(SQLModel, table=True):
    """The highest id each configuration table has given, on SQLite (see ``_next_id``)."""

    __tablename__ = "id_high_water"

    table_name: str = Field(primary_key=True, max_length=64)
    last_id: int = Field(sa_column=Column(BigInteger, nullable=False))


#: The tables whose ids the admin API hands out (integrations, users, mappings, app contexts).
NEVER_REUSED: tuple[type[SQLModel], ...] = (
    XelionContext,
    CrmContext,
    UserCredentials,
    EventUriMapping,
    AppContext,
)

# max(this table's id, the high water) + 1: the row's id, and the new high water, in one statement.
_NEXT_ID_SQL = (
    "INSERT INTO id_high_water (table_name, last_id) "
    "VALUES (:t, coalesce((SELECT max(id) FROM {table}), 0) + 1) "
    "ON CONFLICT (table_name) DO UPDATE SET last_id = max(id_high_water.last_id + 1, excluded.last_id) "
    "RETURNING last_id"
)


def _next_id(mapper: Mapper[Any], connection: Connection, target: Any) -> None:
    """Give a new row of a ``NEVER_REUSED`` table an id no row of it ever had, on SQLite.

    SQLite gives a new row the largest id in the table plus one, so deleting the newest
    integration, user or mapping handed its id to the next one created: a script that retried
    ``DELETE api/user-credentials/7`` after a timeout deleted somebody else, and whatever was
    keyed by the old id (a cached access token, an open page of a list) reached the new row.
    PostgreSQL's sequences never go back; AUTOINCREMENT would need each table rebuilt, and with
    foreign keys on, dropping the old table cascades to every row that refers to it. Runs in the
    flush's own transaction: a rolled-back insert gives its id back with it."""
    if target.id is not None or connection.dialect.name != "sqlite":
        return
    table = mapper.local_table.name  # type: ignore[attr-defined]  # one of NEVER_REUSED's, not input
    target.id = connection.execute(text(_NEXT_ID_SQL.format(table=table)), {"t": table}).scalar_one()


for _model in NEVER_REUSED:
    event.listen(_model, "before_insert", _next_id)
