"""delivery due index covers the claim order: (state, next_attempt_at, event_id, mapping_id).

The claim reads due deliveries in (next_attempt_at, event_id, mapping_id) order with a LIMIT. With
the old index (state, next_attempt_at) the database had to sort every due row before taking the
first few, so a claim cost grew with the backlog; with this one it walks the index in claim order and
stops at the LIMIT. The old index is a prefix of the new one, so it is replaced, not kept.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 16:20:00
"""

from collections.abc import Sequence

from alembic import op


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.drop_index('ix_delivery_due')
        batch_op.create_index(
            'ix_delivery_due', ['state', 'next_attempt_at', 'event_id', 'mapping_id'], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.drop_index('ix_delivery_due')
        batch_op.create_index('ix_delivery_due', ['state', 'next_attempt_at'], unique=False)
