"""handled_updates: platform updates already handled, written with their effect

A command delivered again after a crash (Telegram redelivers a batch whose confirmation never
arrived) must change nothing and say nothing: its effect, its audit row and this record are one
transaction, and the record is looked up before an update is handled.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 10:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "handled_updates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("conversation_key", sa.String(length=255), nullable=False),
        sa.Column("update_id", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_handled_updates")),
        sa.UniqueConstraint(
            "platform",
            "conversation_key",
            "update_id",
            name=op.f("uq_handled_updates_platform_conversation_key_update_id"),
        ),
    )
    with op.batch_alter_table("handled_updates") as batch:
        batch.create_index("ix_handled_updates_created_at", ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("handled_updates") as batch:
        batch.drop_index("ix_handled_updates_created_at")
    op.drop_table("handled_updates")
