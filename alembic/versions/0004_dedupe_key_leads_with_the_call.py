"""call_event.dedupe_key leads with the call: ``<callId>|<first 128 bits of the sha256>``.

The key was a bare sha256 hex digest: every new event landed on a random page of the unique index
on it (a page written per event, and a page read once the index outgrows the cache). The new key
begins with the callId, which begins with the call's start time, so new keys sort together. The
digest is the same sha256 of the same tuple (events.dedupe_key), so a stored key is converted in
place: the first 31 characters of the event's call_id, '|', the first 32 hex digits of the old
key. An event that arrives again after the upgrade gets exactly that key and is still counted as a
duplicate. Downgrade recomputes the full digest from the stored payload.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 04:30:00
"""

import hashlib
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A new key has a '|' and an old one (hex) never has: no new key can meet an old one in the
    # unique index while the rows are being rewritten.
    op.execute(
        "UPDATE call_event "
        "SET dedupe_key = substr(call_id, 1, 31) || '|' || substr(dedupe_key, 1, 32) "
        "WHERE dedupe_key NOT LIKE '%|%'"
    )


def _old_key(xelion_context_id: int, notification_type: str, fields: dict[str, object]) -> str:
    """The key as revision 0003's code computed it (a frozen copy: events.dedupe_key moved on)."""
    canonical = json.dumps(
        [
            xelion_context_id,
            notification_type,
            fields.get("callId"),
            fields.get("callerPhoneNumber"),
            fields.get("calleePhoneNumber"),
        ],
        separators=(",", ":"),
        ensure_ascii=False,
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def downgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(
        sa.text(
            "SELECT id, xelion_context_id, notification_type, payload FROM call_event "
            "WHERE dedupe_key LIKE '%|%'"
        )
    ).all()
    updates = []
    for event_id, xelion_context_id, notification_type, payload in rows:
        try:
            fields = json.loads(payload)
        except ValueError:
            fields = {}
        if not isinstance(fields, dict):
            fields = {}
        updates.append({"id": event_id, "key": _old_key(xelion_context_id, notification_type, fields)})
    for start in range(0, len(updates), 1000):
        conn.execute(
            sa.text("UPDATE call_event SET dedupe_key = :key WHERE id = :id"), updates[start : start + 1000]
        )
