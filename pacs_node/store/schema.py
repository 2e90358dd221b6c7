"""The job store's tables as SQLAlchemy ORM classes, and their conversion to records.

The schema itself is created only by the Alembic migrations in
`pacs_node/migrations`; a test checks that these classes and the migrated
database agree.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pacs_node.store.records import (
    Instance,
    Job,
    JobEvent,
    JobKind,
    JobStatus,
    Result,
    Series,
    SeriesState,
    TextEnum,
)

UID = String(64)
AE_TITLE = String(16)
PATH = String(1024)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend.

    PostgreSQL keeps them as timestamptz. SQLite has no time zone type, so the
    UTC wall time is stored (fixed-width text, which also sorts correctly) and
    UTC is attached again on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the job store; use timezone-aware UTC")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _enum(cls: type[TextEnum]) -> Enum:
    # Stored as plain text values ("queued"), not names and not a native
    # PostgreSQL enum type, so a new member needs no type migration.
    return Enum(
        cls,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=lambda members: [member.value for member in members],
    )


class Base(DeclarativeBase):
    # Deterministic constraint names, so migrations can refer to them.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class SeriesRow(Base):
    __tablename__ = "series"
    __table_args__ = (Index(None, "state"),)

    series_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    calling_ae: Mapped[str] = mapped_column(AE_TITLE)
    state: Mapped[SeriesState] = mapped_column(_enum(SeriesState))
    revision: Mapped[int] = mapped_column(Integer)
    instance_count: Mapped[int] = mapped_column(Integer)
    classifiable_count: Mapped[int] = mapped_column(Integer)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    skip_reason: Mapped[str | None] = mapped_column(Text)

    def to_record(self) -> Series:
        return Series(
            series_instance_uid=self.series_instance_uid,
            study_instance_uid=self.study_instance_uid,
            calling_ae=self.calling_ae,
            state=self.state,
            revision=self.revision,
            instance_count=self.instance_count,
            classifiable_count=self.classifiable_count,
            first_received_at=self.first_received_at,
            last_received_at=self.last_received_at,
            completed_at=self.completed_at,
            skip_reason=self.skip_reason,
        )


class InstanceRow(Base):
    __tablename__ = "instances"
    __table_args__ = (
        Index(None, "series_instance_uid", "instance_number"),
        # The retention sweep reads only instances whose file is still there:
        # a set that stays small while the history grows.
        Index(
            "ix_instances_retained",
            "series_instance_uid",
            sqlite_where=text("removed_at IS NULL"),
            postgresql_where=text("removed_at IS NULL"),
        ),
    )

    sop_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_instance_uid: Mapped[str] = mapped_column(UID, ForeignKey("series.series_instance_uid"))
    study_instance_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str] = mapped_column(String(16))
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(PATH)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(AE_TITLE)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    images_in_acquisition: Mapped[int | None] = mapped_column(Integer)
    classifiable: Mapped[bool] = mapped_column(Boolean)
    exclusion_reason: Mapped[str | None] = mapped_column(Text)
    pixel_layout: Mapped[str | None] = mapped_column(Text)
    # When retention deleted the file; the row stays as the history.
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def to_record(self) -> Instance:
        return Instance(
            sop_instance_uid=self.sop_instance_uid,
            sop_class_uid=self.sop_class_uid,
            series_instance_uid=self.series_instance_uid,
            study_instance_uid=self.study_instance_uid,
            modality=self.modality,
            transfer_syntax_uid=self.transfer_syntax_uid,
            path=self.path,
            size=self.size,
            sha256=self.sha256,
            calling_ae=self.calling_ae,
            received_at=self.received_at,
            instance_number=self.instance_number,
            images_in_acquisition=self.images_in_acquisition,
            classifiable=self.classifiable,
            exclusion_reason=self.exclusion_reason,
            pixel_layout=self.pixel_layout,
            removed_at=self.removed_at,
        )


class ResultRow(Base):
    __tablename__ = "results"
    # One report per series revision and model version.
    __table_args__ = (UniqueConstraint("series_instance_uid", "model_version", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, ForeignKey("series.series_instance_uid"))
    study_instance_uid: Mapped[str] = mapped_column(UID)
    revision: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    model_hash: Mapped[str] = mapped_column(String(128))
    label: Mapped[str] = mapped_column(String(64))
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)
    slices: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    evidence: Mapped[list[str]] = mapped_column(JSON)
    sr_sop_instance_uid: Mapped[str] = mapped_column(UID)
    sr_series_instance_uid: Mapped[str] = mapped_column(UID)
    sr_path: Mapped[str] = mapped_column(PATH)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    def to_record(self) -> Result:
        return Result(
            id=self.id,
            series_instance_uid=self.series_instance_uid,
            study_instance_uid=self.study_instance_uid,
            revision=self.revision,
            model_name=self.model_name,
            model_version=self.model_version,
            model_hash=self.model_hash,
            label=self.label,
            probabilities=dict(self.probabilities),
            slices=[dict(item) for item in self.slices],
            evidence=list(self.evidence),
            sr_sop_instance_uid=self.sr_sop_instance_uid,
            sr_series_instance_uid=self.sr_series_instance_uid,
            sr_path=self.sr_path,
            created_at=self.created_at,
        )


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # The claim query: oldest due job of a kind.
        Index(None, "kind", "status", "run_after"),
        # The reaper: running jobs by lease end.
        Index(None, "status", "lease_until"),
        # Retention: the jobs of a series revision.
        Index(None, "series_instance_uid", "revision"),
        # At most one inference per series revision, one report per result and
        # one send per result and destination, however many sweepers or workers race.
        Index(
            "uq_jobs_infer_series_revision",
            "series_instance_uid",
            "revision",
            unique=True,
            sqlite_where=text("kind = 'infer'"),
            postgresql_where=text("kind = 'infer'"),
        ),
        Index(
            "uq_jobs_report_result",
            "result_id",
            unique=True,
            sqlite_where=text("kind = 'report'"),
            postgresql_where=text("kind = 'report'"),
        ),
        Index(
            "uq_jobs_send_result_destination",
            "result_id",
            "destination",
            unique=True,
            sqlite_where=text("kind = 'send'"),
            postgresql_where=text("kind = 'send'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind))
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus))
    series_instance_uid: Mapped[str] = mapped_column(UID, ForeignKey("series.series_instance_uid"))
    revision: Mapped[int] = mapped_column(Integer)
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id"))
    destination: Mapped[str | None] = mapped_column(String(256))
    attempts: Mapped[int] = mapped_column(Integer)
    max_attempts: Mapped[int] = mapped_column(Integer)
    run_after: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    def to_record(self) -> Job:
        return Job(
            id=self.id,
            kind=self.kind,
            status=self.status,
            series_instance_uid=self.series_instance_uid,
            revision=self.revision,
            result_id=self.result_id,
            destination=self.destination,
            attempts=self.attempts,
            max_attempts=self.max_attempts,
            run_after=self.run_after,
            lease_until=self.lease_until,
            worker_id=self.worker_id,
            last_error=self.last_error,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


class JobEventRow(Base):
    """Append-only history of a job; rows are never updated or deleted."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    event: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)

    def to_record(self) -> JobEvent:
        return JobEvent(
            id=self.id, job_id=self.job_id, at=self.at, event=self.event, detail=self.detail
        )
