"""the credential index holds only deliveries waiting to be sent: ix_delivery_credential_waiting.

``ix_delivery_credential_undelivered`` (0005) held the ``pending``, ``sending`` and ``parked``
deliveries. Its readers, parking and unparking a credential's deliveries (reliability.md §13), ask
only for ``pending`` or ``parked`` ones; yet a delivery in flight had an entry too, so every claim
(``pending`` -> ``sending``) moved its entry and every completion (``sending`` -> ``delivered``)
removed it, and a delivery handed to the worker at ingest (stored ``sending``) got one. Measured on
an SQLite copy of 60,000 deliveries: a ``state`` change cost 6.6-7.5 us per row with the old index
and 3.2-4.1 without it. Now a claim removes the entry, a completion touches nothing, a hand-off adds
nothing, and a retry (``sending`` -> ``pending``) adds it back.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 11:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNDELIVERED = "state IN ('pending', 'sending', 'parked')"
WAITING = "state IN ('pending', 'parked')"

# Plain DROP/CREATE INDEX, not a batch (see 0006): a batch's table copy would cascade on SQLite.


def _replace(old: str, new: str, condition: str) -> None:
    op.drop_index(old, table_name='delivery')
    op.create_index(
        new,
        'delivery',
        ['credential_id', 'state'],
        unique=False,
        sqlite_where=sa.text(condition),
        postgresql_where=sa.text(condition),
    )


def upgrade() -> None:
    _replace('ix_delivery_credential_undelivered', 'ix_delivery_credential_waiting', WAITING)


def downgrade() -> None:
    _replace('ix_delivery_credential_waiting', 'ix_delivery_credential_undelivered', UNDELIVERED)
