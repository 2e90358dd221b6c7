"""The initial job store: series, instances, results, jobs and their events.

Revision ID: 0001
Revises:
Create Date: 2025-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types at this revision; later model changes must
# not change what this migration creates.
UID = sa.String(64)
AE_TITLE = sa.String(16)
PATH = sa.String(1024)
STATE = sa.String(16)
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "series",
        sa.Column("series_instance_uid", UID, nullable=False),
        sa.Column("study_instance_uid", UID, nullable=False),
        sa.Column("calling_ae", AE_TITLE, nullable=False),
        sa.Column("state", STATE, nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("classifiable_count", sa.Integer(), nullable=False),
        sa.Column("first_received_at", TIMESTAMP, nullable=False),
        sa.Column("last_received_at", TIMESTAMP, nullable=False),
        sa.Column("completed_at", TIMESTAMP, nullable=True),
        sa.Column("skip_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("series_instance_uid", name="pk_series"),
    )
    op.create_index("ix_series_state", "series", ["state"])

    op.create_table(
        "instances",
        sa.Column("sop_instance_uid", UID, nullable=False),
        sa.Column("sop_class_uid", UID, nullable=False),
        sa.Column("series_instance_uid", UID, nullable=False),
        sa.Column("study_instance_uid", UID, nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("transfer_syntax_uid", UID, nullable=False),
        sa.Column("path", PATH, nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("calling_ae", AE_TITLE, nullable=False),
        sa.Column("received_at", TIMESTAMP, nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("images_in_acquisition", sa.Integer(), nullable=True),
        sa.Column("classifiable", sa.Boolean(), nullable=False),
        sa.Column("exclusion_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["series_instance_uid"],
            ["series.series_instance_uid"],
            name="fk_instances_series_instance_uid_series",
        ),
        sa.PrimaryKeyConstraint("sop_instance_uid", name="pk_instances"),
    )
    op.create_index(
        "ix_instances_series_instance_uid_instance_number",
        "instances",
        ["series_instance_uid", "instance_number"],
    )

    op.create_table(
        "results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", UID, nullable=False),
        sa.Column("study_instance_uid", UID, nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("model_hash", sa.String(128), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("slices", sa.JSON(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("sr_sop_instance_uid", UID, nullable=False),
        sa.Column("sr_series_instance_uid", UID, nullable=False),
        sa.Column("sr_path", PATH, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["series_instance_uid"],
            ["series.series_instance_uid"],
            name="fk_results_series_instance_uid_series",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_results"),
        sa.UniqueConstraint(
            "series_instance_uid",
            "model_version",
            "revision",
            name="uq_results_series_instance_uid_model_version_revision",
        ),
    )

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", STATE, nullable=False),
        sa.Column("status", STATE, nullable=False),
        sa.Column("series_instance_uid", UID, nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=True),
        sa.Column("destination", sa.String(256), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("run_after", TIMESTAMP, nullable=False),
        sa.Column("lease_until", TIMESTAMP, nullable=True),
        sa.Column("worker_id", sa.String(128), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["series_instance_uid"],
            ["series.series_instance_uid"],
            name="fk_jobs_series_instance_uid_series",
        ),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"], name="fk_jobs_result_id_results"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_kind_status_run_after", "jobs", ["kind", "status", "run_after"])
    op.create_index("ix_jobs_status_lease_until", "jobs", ["status", "lease_until"])
    op.create_index(
        "uq_jobs_infer_series_revision",
        "jobs",
        ["series_instance_uid", "revision"],
        unique=True,
        sqlite_where=sa.text("kind = 'infer'"),
        postgresql_where=sa.text("kind = 'infer'"),
    )
    op.create_index(
        "uq_jobs_send_result_destination",
        "jobs",
        ["result_id", "destination"],
        unique=True,
        sqlite_where=sa.text("kind = 'send'"),
        postgresql_where=sa.text("kind = 'send'"),
    )

    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("at", TIMESTAMP, nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_job_events_job_id_jobs"),
        sa.PrimaryKeyConstraint("id", name="pk_job_events"),
    )
    op.create_index("ix_job_events_job_id", "job_events", ["job_id"])


def downgrade() -> None:
    op.drop_table("job_events")
    op.drop_table("jobs")
    op.drop_table("results")
    op.drop_table("instances")
    op.drop_table("series")
