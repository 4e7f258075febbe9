"""ids are never given twice: id_high_water.

SQLite gives a new row the largest id in its table plus one, so an integration, user or mapping
created after the newest one was deleted got the deleted one's id (a script's retried DELETE then
removed the new row). On SQLite the store now takes each new configuration row's id from this
table (``store.models._next_id``); it starts at each table's largest id now. PostgreSQL's
sequences never go back and do not use it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 21:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ('xelion_context', 'crm_context', 'user_credentials', 'event_uri_mapping', 'app_context')


def upgrade() -> None:
    op.create_table(
        'id_high_water',
        sa.Column('table_name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('last_id', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('table_name'),
    )
    for table in TABLES:
        op.execute(
            f"INSERT INTO id_high_water (table_name, last_id) "  # noqa: S608 (constant names)
            f"SELECT '{table}', coalesce(max(id), 0) FROM {table}"
        )


def downgrade() -> None:
    op.drop_table('id_high_water')
