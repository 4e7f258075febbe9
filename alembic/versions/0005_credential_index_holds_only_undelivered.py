"""the credential index holds only undelivered deliveries: ix_delivery_credential_undelivered.

``ix_delivery_credential_state`` (credential_id, state) held every delivery ever made. Its only
readers are parking and unparking a credential's undelivered deliveries (reliability.md §13),
yet every delivery's every state change rewrote its entry, at a place set by its user: with many
users, a random page of an index as large as the history, per change. Measured with
``N=100000 bench/store_scale.py 1000 200`` (round 1, after 100,000 events), three pairs:
149-164 us per event with the old index, 119-131 with this one (1 user and 4 mappings: 112-118
and 114-118), because an index of the undelivered deliveries alone is as small as the backlog.
Both databases support partial indexes; the queries repeat the index's condition word for word
(store/deliveries.py), since SQLite uses a partial index only for a query that says so.

Deleting a credential now finds its deliveries (ON DELETE SET NULL) by a scan of the table,
which retention keeps to its window; deleting a CRM context did so already.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 22:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNDELIVERED = "state IN ('pending', 'sending', 'parked')"


def upgrade() -> None:
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.drop_index('ix_delivery_credential_state')
        batch_op.create_index(
            'ix_delivery_credential_undelivered',
            ['credential_id', 'state'],
            unique=False,
            sqlite_where=sa.text(UNDELIVERED),
            postgresql_where=sa.text(UNDELIVERED),
        )


def downgrade() -> None:
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.drop_index('ix_delivery_credential_undelivered')
        batch_op.create_index('ix_delivery_credential_state', ['credential_id', 'state'], unique=False)
