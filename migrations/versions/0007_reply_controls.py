"""jobs.kind, parent_job_id, finish_reason, shown_text: reply controls and crash resume

A job answers a message ("reply"), answers it again replacing the reply of `parent_job_id`
("regenerate", the Regenerate control), or goes on from where that reply was cut ("continue",
the Continue control). `finish_reason` is how its generation ended ("stop", "length",
"cancelled"): Continue is offered only after "length". `shown_text` is the text a streaming reply
had shown so far, persisted while it streams, so an attempt after a crash or restart goes on from
it instead of generating the reply afresh.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 10:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="reply"))
        batch.add_column(sa.Column("parent_job_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("finish_reason", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("shown_text", sa.Text(), nullable=True))
        batch.create_index("ix_jobs_parent_job_id", ["parent_job_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_parent_job_id")
        batch.drop_column("shown_text")
        batch.drop_column("finish_reason")
        batch.drop_column("parent_job_id")
        batch.drop_column("kind")
