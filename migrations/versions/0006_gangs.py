"""Multi-node jobs: `jobs.nodes` (machines one job spans, default 1) and `job_nodes`, the
workers an attempt of such a job reserved, one row per node rank.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("nodes", sa.Integer(), nullable=False, server_default="1"))
    op.create_table(
        "job_nodes",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE")),
        sa.Column("rank", sa.Integer()),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(200), nullable=False),
        sa.Column("state", sa.String(20), nullable=False, server_default="reserved"),
        sa.Column("endpoint", sa.String(300), nullable=True),
        sa.Column("resume_from", sa.String(500), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "rank"),
    )
    op.create_index("ix_job_nodes_worker", "job_nodes", ["worker"])


def downgrade() -> None:
    op.drop_index("ix_job_nodes_worker", table_name="job_nodes")
    op.drop_table("job_nodes")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("nodes")
