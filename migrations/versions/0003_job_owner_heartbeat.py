"""jobs.owner, jobs.heartbeat_at: which bot process runs a job, and when it last said so

With more than one bot process on one database, start-up must not requeue the jobs another live
process is running: a job left `running` goes back to the queue only when its owner is this
process's previous life, is known to be dead, or stopped heartbeating.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 10:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_jobs_owner_status", ["owner", "status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_owner_status")
        batch.drop_column("heartbeat_at")
        batch.drop_column("owner")
