"""Longer shown token prefixes: `api_tokens.prefix` grows from 12 to 32 characters.

New tokens store `hmkd_` and 12 random characters (the 8 stored before, `hmkd_` and 3 random
ones, were shared by two tokens of a few hundred); existing rows keep their 8 characters.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LEGACY_PREFIX_CHARS = 8  # what the code before this revision stores and looks prefixes up by


def upgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.alter_column(
            "prefix", existing_type=sa.String(12), type_=sa.String(32), existing_nullable=False
        )


def downgrade() -> None:
    # the older code shows and matches 8 characters: cut the longer prefixes to that, which
    # also lets them fit the narrower column
    op.execute(
        sa.text(
            "UPDATE api_tokens SET prefix = substr(prefix, 1, :n) WHERE length(prefix) > :n"
        ).bindparams(n=LEGACY_PREFIX_CHARS)
    )
    with op.batch_alter_table("api_tokens") as batch:
        batch.alter_column(
            "prefix", existing_type=sa.String(32), type_=sa.String(12), existing_nullable=False
        )
