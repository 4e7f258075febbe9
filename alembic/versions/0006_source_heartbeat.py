"""the source's heartbeat: xelion_context.listened_at.

After a ``kill -9`` (or a crash, or a lost host) no stop time is stored, and the next start's gap
began at the last moment the store knew the source was listening: its last stored event or the
subscription that closed its last gap. For a quiet integration (a night, a weekend) that was hours
or days before the outage, so the gap told the operator to look for missed calls over all that
time. A subscribed source now writes ``listened_at`` every ``source_heartbeat_seconds`` (30 by
default), which bounds the early start of such a gap to that interval (reliability.md §18).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 16:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE, not a batch: on SQLite a batch copies the table and drops the old one, and with
# foreign keys on, that drop cascades to every event of every integration (SQLite has ADD and DROP
# COLUMN since 3.35).


def upgrade() -> None:
    op.add_column('xelion_context', sa.Column('listened_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))


def downgrade() -> None:
    op.drop_column('xelion_context', 'listened_at')
