"""Retention: when an instance's file was removed, and the indexes the sweep reads.

Revision ID: 0002
Revises: 0001
Create Date: 2025-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of the column type at this revision (see 0001).
TIMESTAMP = sa.DateTime(timezone=True)
RETAINED = "removed_at IS NULL"


def upgrade() -> None:
    # Batch mode: SQLite cannot alter a table in place beyond the simplest
    # cases; on PostgreSQL it is a plain ALTER TABLE.
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("removed_at", TIMESTAMP, nullable=True))
    op.create_index(
        "ix_instances_retained",
        "instances",
        ["series_instance_uid"],
        sqlite_where=sa.text(RETAINED),
        postgresql_where=sa.text(RETAINED),
    )
    op.create_index(
        "ix_jobs_series_instance_uid_revision", "jobs", ["series_instance_uid", "revision"]
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_series_instance_uid_revision", table_name="jobs")
    op.drop_index("ix_instances_retained", table_name="instances")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("removed_at")
