"""What the Xelion sources write: their state, their gaps, and the token of their live session.

Also loads the configuration a source runs with (``SourceConfig``) from the stored integration,
decrypting the admin password only in memory.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select, update

from cti_bridge.ports import SourceConfig, XelionTarget
from cti_bridge.store.crypto import SecretBox
from cti_bridge.store.models import CrmContext, EventUriMapping, SourceGap, XelionContext

BASE_EVENT_TYPES = frozenset({"newCallEvent", "callConnectedEvent", "callHungUpEvent", "missedCallEvent"})


def load_source_config(session: Session, box: SecretBox, xelion_context_id: int) -> SourceConfig | None:
    ctx = session.get(XelionContext, xelion_context_id)
    if ctx is None or ctx.id is None:
        return None
    events = set(BASE_EVENT_TYPES)
    rows = session.exec(
        select(EventUriMapping.xelion_event)
        .join(CrmContext, col(CrmContext.id) == col(EventUriMapping.crm_context_id))
        .where(col(CrmContext.xelion_context_id) == ctx.id, col(EventUriMapping.retired).is_(False))
    ).all()
    events.update(rows)
    return SourceConfig(
        xelion_context_id=ctx.id,
        target=XelionTarget(protocol=ctx.protocol, host=ctx.host, tenant=ctx.tenant),
        admin_username=ctx.admin_username,
        admin_password=box.decrypt(ctx.admin_password_enc),
        event_types=frozenset(events),
    )


def all_context_ids(session: Session) -> list[int]:
    return [int(i) for i in session.exec(select(XelionContext.id)).all() if i is not None]


def set_state(session: Session, xelion_context_id: int, state: str, error: str | None, now: datetime) -> None:
    session.execute(
        update(XelionContext)
        .where(col(XelionContext.id) == xelion_context_id)
        .values(source_state=state, source_error=(error or None) and error[:1000], updated_at=now)
    )


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def open_gap(session: Session, xelion_context_id: int, started_at: datetime, reason: str) -> None:
    # One open gap at a time: a second "opened" while one is open keeps the first start.
    exists = session.exec(
        select(SourceGap.id).where(
            col(SourceGap.xelion_context_id) == xelion_context_id, col(SourceGap.ended_at).is_(None)
        )
    ).first()
    if exists is None and session.get(XelionContext, xelion_context_id) is not None:
        session.add(
            SourceGap(xelion_context_id=xelion_context_id, started_at=started_at, reason=reason[:500])
        )


def extend_open_gap(session: Session, xelion_context_id: int, started_at: datetime, reason: str) -> None:
    """Move the open gap's start back to ``started_at`` if that is earlier (events lost before the
    gap opened, told later: a failed commit). Never opens one: with none open (the source listens
    again, or another replica owns it now) there is nothing to move, and a gap opened here would
    stay open for ever, since no source knows of it."""
    open_row = session.exec(
        select(SourceGap).where(
            col(SourceGap.xelion_context_id) == xelion_context_id, col(SourceGap.ended_at).is_(None)
        )
    ).first()
    if open_row is not None and _aware(started_at) < _aware(open_row.started_at):
        open_row.started_at = started_at
        open_row.reason = f"{reason[:250]}; then: {open_row.reason or ''}"[:500]
        session.add(open_row)


def close_gap(session: Session, xelion_context_id: int, ended_at: datetime) -> None:
    session.execute(
        update(SourceGap)
        .where(col(SourceGap.xelion_context_id) == xelion_context_id, col(SourceGap.ended_at).is_(None))
        .values(ended_at=ended_at)
    )


def heartbeat(session: Session, xelion_context_id: int, at: datetime) -> None:
    """The source is subscribed at ``at`` (``listened_at``; it never goes back)."""
    session.execute(
        update(XelionContext)
        .where(
            col(XelionContext.id) == xelion_context_id,
            col(XelionContext.listened_at).is_(None) | (col(XelionContext.listened_at) < at),
        )
        .values(listened_at=at)
    )


def load_state(session: Session, xelion_context_id: int) -> tuple[str | None, datetime | None]:
    """The source's stored state, and the last moment its owner is known to have listened: the
    latest of its last stored event (``last_event_at``, written up to a second late, so a second
    earlier), the end of its last gap (its subscription, to the microsecond) and its last
    heartbeat (``listened_at``, written while subscribed)."""
    ctx = session.get(XelionContext, xelion_context_id)
    if ctx is None:
        return None, None
    subscribed = session.exec(
        select(func.max(SourceGap.ended_at)).where(col(SourceGap.xelion_context_id) == xelion_context_id)
    ).first()
    event = None if ctx.last_event_at is None else ctx.last_event_at - timedelta(seconds=1)
    seen = [t for t in (event, subscribed, ctx.listened_at) if t is not None]
    return ctx.source_state, max(seen) if seen else None


def load_session_token(session: Session, box: SecretBox, xelion_context_id: int) -> str | None:
    ctx = session.get(XelionContext, xelion_context_id)
    return box.decrypt_opt(ctx.session_token_enc) if ctx is not None else None


def save_session_token(session: Session, box: SecretBox, xelion_context_id: int, token: str | None) -> None:
    session.execute(
        update(XelionContext)
        .where(col(XelionContext.id) == xelion_context_id)
        .values(session_token_enc=box.encrypt_opt(token))
    )
