"""jobs.reply_platform_ids: the platform messages a reply was already posted in

So that after a crash, a partly streamed reply is finished by editing the messages already
posted, not answered twice.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 17:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("reply_platform_ids", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("reply_platform_ids")
