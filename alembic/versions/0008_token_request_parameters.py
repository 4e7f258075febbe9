"""more form parameters of a CRM context's token requests: crm_context.token_parameters.

Microsoft Entra ID (Dynamics 365) refuses a refresh on its v2 endpoint without ``scope``, and its v1
endpoint may want ``resource``: a CRM context can now name such parameters, sent with every token
request of its users (``crmContext.tokenRequestParameters``).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 21:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE, not a batch (see 0006): a batch's table copy would cascade on SQLite.


def upgrade() -> None:
    op.add_column('crm_context', sa.Column('token_parameters', sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column('crm_context', 'token_parameters')
