"""The fleet: `teams.share` (fair-share weight, default 1), `teams.gpu_quota` (NULL: none)
`jobs.preempt_requested` (checkpoint and give the worker back) and `workers.draining`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        batch.add_column(sa.Column("share", sa.Float(), nullable=False, server_default="1.0"))
        batch.add_column(sa.Column("gpu_quota", sa.Integer(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("preempt_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("workers") as batch:
        batch.add_column(
            sa.Column("draining", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("draining")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("preempt_requested")
    with op.batch_alter_table("teams") as batch:
        batch.drop_column("gpu_quota")
        batch.drop_column("share")
