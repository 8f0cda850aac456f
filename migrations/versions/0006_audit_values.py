"""audit_log.old_value / new_value: what an admin change replaced, and with what

`/audit` and `parley audit` show them (a /system or /set change). Both are JSON text (`null` is
"the configured default"); rows of other actions leave them empty.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 10:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.add_column(sa.Column("old_value", sa.Text(), nullable=True))
        batch.add_column(sa.Column("new_value", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("new_value")
        batch.drop_column("old_value")
