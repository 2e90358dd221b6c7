"""Instances: where their uncompressed words lie, so the infer stage need not parse them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
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
    # Batch mode: SQLite cannot alter a table in place beyond the simplest
    # cases; on PostgreSQL it is a plain ALTER TABLE. Rows stored before stay
    # NULL: their files are parsed, as before.
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("pixel_layout", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("pixel_layout")
