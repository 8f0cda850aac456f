"""leases: roles only one bot process may hold (polling a Telegram token, a Discord gateway)

Telegram serves one getUpdates consumer per token and Discord one gateway session per token:
bot processes sharing a database elect the one that holds each such role through a row here,
held until `expires_at` and renewed by its holder well before.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 10:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("role", sa.String(length=255), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("role", name=op.f("pk_leases")),
    )


def downgrade() -> None:
    op.drop_table("leases")
