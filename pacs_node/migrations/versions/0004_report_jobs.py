"""Report jobs: at most one per result.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

The SR became a job of its own (kind "report") between inference and
sending. The kind is stored as plain text, so only the index is new. Results
stored before have their SR written already and no report job: nothing to
migrate.
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
    op.create_index(
        "uq_jobs_report_result",
        "jobs",
        ["result_id"],
        unique=True,
        sqlite_where=sa.text("kind = 'report'"),
        postgresql_where=sa.text("kind = 'report'"),
    )


def downgrade() -> None:
    op.drop_index("uq_jobs_report_result", table_name="jobs")
