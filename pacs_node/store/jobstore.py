"""JobStore: the one place that opens database sessions.

Each public method is one transaction; it hands out frozen records, never ORM
rows, and turns connection-level failures into StoreUnavailableError.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from pacs_node.errors import ConfigurationError
from pacs_node.store import assembly, ingest, jobs, migrate, retention
from pacs_node.store.database import (
    create_store_engine,
    translated_errors,
    writer,
)
from pacs_node.store.records import (
    Instance,
    Job,
    JobEvent,
    JobKind,
    JobStatus,
    NewInstance,
    NewResult,
    RecordedInstance,
    Result,
    Series,
)
from pacs_node.store.schema import InstanceRow, JobEventRow, JobRow, ResultRow, SeriesRow


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


class JobStore:
    def __init__(self, url: str) -> None:
        """Connects lazily; does not migrate (see upgrade and check_schema)."""
        self._engine = create_store_engine(url)
        self._writer = writer(self._engine)
        # SQLite: new instances through the driver's own connection (see ingest).
        self._new_instances = (
            ingest.NewInstanceWriter(self._engine)
            if self._engine.dialect.name == "sqlite"
            else None
        )

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Session]:
        engine = self._writer if write else self._engine
        with translated_errors(), Session(engine) as session, session.begin():
            yield session

    # schema

    def upgrade(self) -> None:
        """Migrate the database to the newest schema (alembic upgrade head)."""
        with translated_errors():
            migrate.upgrade(self._writer)

    def check_schema(self) -> None:
        """Raise ConfigurationError unless the database is at the newest schema."""
        with translated_errors():
            current = migrate.current_revision(self._engine)
        expected = migrate.head_revision()
        if current != expected:
            raise ConfigurationError(
                f"database schema is at revision {current or 'none (empty database)'}, "
                f"expected {expected}; run `pacs-node db upgrade`"
            )

    def close(self) -> None:
        self._engine.dispose()

    # receive

    def record_instance(self, instance: NewInstance) -> RecordedInstance:
        """Store an instance row and update its series; see InstanceOutcome for repeats."""
        if self._new_instances is not None:
            with translated_errors():
                recorded = self._new_instances.record(instance)
            if recorded is not None:
                return recorded
        with translated_errors(), self._writer.begin() as connection:
            return ingest.record_instance(connection, instance)

    # assembly

    def complete_ready_series(
        self,
        now: datetime,
        quiet_seconds: float,
        quiet_seconds_by_ae: Mapping[str, float] = {},
        max_attempts: int = 5,
    ) -> list[Series]:
        """Complete every ready open series, queueing one INFER job per revision."""
        _check_positive("max_attempts", max_attempts)
        with self._transaction(write=True) as session:
            return assembly.complete_ready_series(
                session, now, quiet_seconds, quiet_seconds_by_ae, max_attempts
            )

    # queue

    def claim(
        self, kind: JobKind, worker_id: str, lease_seconds: float, now: datetime | None = None
    ) -> Job | None:
        """Take the oldest due queued job of `kind`, or None when there is none."""
        _check_positive("lease_seconds", lease_seconds)
        with self._transaction(write=True) as session:
            return jobs.claim(session, kind, worker_id, lease_seconds, now or _utcnow())

    def heartbeat(self, job_id: int, worker_id: str, lease_seconds: float) -> bool:
        """Extend the lease; False when the worker no longer holds the job."""
        _check_positive("lease_seconds", lease_seconds)
        with self._transaction(write=True) as session:
            return jobs.heartbeat(session, job_id, worker_id, lease_seconds, _utcnow())

    def fail(self, job_id: int, worker_id: str, error: str, retry_at: datetime | None) -> Job:
        """Queue the job again at `retry_at`, or make it dead (no retry_at, attempts used up)."""
        with self._transaction(write=True) as session:
            return jobs.fail(session, job_id, worker_id, error, retry_at, _utcnow())

    def reap_expired_leases(self, now: datetime | None = None) -> int:
        """Return jobs whose lease ran out to the queue (or make them dead); how many."""
        with self._transaction(write=True) as session:
            return jobs.reap_expired_leases(session, now or _utcnow())

    def release_abandoned(self, worker_ids: Sequence[str]) -> int:
        """Requeue the running jobs of workers known to be gone (a crashed process)."""
        if not worker_ids:
            return 0
        with self._transaction(write=True) as session:
            return jobs.release_abandoned(session, worker_ids, _utcnow())

    def retry(self, job_id: int) -> Job:
        """Queue a dead (or queued) job now with its attempts reset."""
        with self._transaction(write=True) as session:
            return jobs.retry(session, job_id, _utcnow())

    def complete_inference(self, job_id: int, worker_id: str, result: NewResult) -> Result:
        """Store the result, queue its REPORT job, finish the INFER job."""
        with self._transaction(write=True) as session:
            return jobs.complete_inference(session, job_id, worker_id, result, _utcnow())

    def complete_report(
        self, job_id: int, worker_id: str, destinations: Sequence[str], max_attempts: int = 5
    ) -> Job:
        """The SR is written: queue one SEND job per destination, finish the REPORT job."""
        _check_positive("max_attempts", max_attempts)
        with self._transaction(write=True) as session:
            return jobs.complete_report(
                session, job_id, worker_id, destinations, max_attempts, _utcnow()
            )

    def complete_send(self, job_id: int, worker_id: str) -> Job:
        with self._transaction(write=True) as session:
            return jobs.complete_send(session, job_id, worker_id, _utcnow())

    # retention

    def expire_instances(
        self, received_before: datetime, now: datetime | None = None, limit: int = 500
    ) -> list[Instance]:
        """Mark instances of old, delivered series removed; the caller deletes their files.

        At most `limit` instances, of series last received before
        `received_before`; `pacs_node.store.retention` says what delivered
        means. Each instance goes to one caller only, however many sweep at once.
        """
        _check_positive("limit", limit)
        with self._transaction(write=True) as session:
            return retention.expire_instances(session, received_before, now or _utcnow(), limit)

    # reading

    def list_jobs(
        self, status: JobStatus | None = None, kind: JobKind | None = None, limit: int = 100
    ) -> list[Job]:
        """Newest first."""
        query = select(JobRow).order_by(JobRow.id.desc()).limit(limit)
        if status is not None:
            query = query.where(JobRow.status == status)
        if kind is not None:
            query = query.where(JobRow.kind == kind)
        with self._transaction(write=False) as session:
            return [job.to_record() for job in session.scalars(query)]

    def get_job(self, job_id: int) -> Job | None:
        with self._transaction(write=False) as session:
            job = session.get(JobRow, job_id)
            return None if job is None else job.to_record()

    def job_events(self, job_id: int) -> list[JobEvent]:
        """Oldest first."""
        query = select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id)
        with self._transaction(write=False) as session:
            return [event.to_record() for event in session.scalars(query)]

    def queue_depth(self) -> int:
        """Jobs not finished yet: queued plus running."""
        query = select(func.count()).where(JobRow.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        with self._transaction(write=False) as session:
            return session.scalar(query) or 0

    def get_series(self, series_instance_uid: str) -> Series | None:
        with self._transaction(write=False) as session:
            series = session.get(SeriesRow, series_instance_uid)
            return None if series is None else series.to_record()

    def series_instances(
        self,
        series_instance_uid: str,
        classifiable_only: bool = True,
        include_removed: bool = False,
    ) -> list[Instance]:
        """Ordered by InstanceNumber (missing ones last), then SOP Instance UID.

        Only instances whose file is there, unless `include_removed` asks for
        the rows whose file retention deleted as well.
        """
        query = (
            select(InstanceRow)
            .where(InstanceRow.series_instance_uid == series_instance_uid)
            .order_by(InstanceRow.instance_number.asc().nulls_last(), InstanceRow.sop_instance_uid)
        )
        if classifiable_only:
            query = query.where(InstanceRow.classifiable.is_(True))
        if not include_removed:
            query = query.where(InstanceRow.removed_at.is_(None))
        with self._transaction(write=False) as session:
            return [instance.to_record() for instance in session.scalars(query)]

    def get_result(self, result_id: int) -> Result | None:
        with self._transaction(write=False) as session:
            result = session.get(ResultRow, result_id)
            return None if result is None else result.to_record()

    def previous_result(
        self, series_instance_uid: str, model_version: str, before_revision: int
    ) -> Result | None:
        """The latest result of an earlier revision whose SR is written: the report a
        new one supersedes. (A result whose REPORT job is not done has no SR yet, and
        may never have one; results stored before report jobs existed have theirs.)"""
        unwritten = exists().where(
            JobRow.kind == JobKind.REPORT,
            JobRow.result_id == ResultRow.id,
            JobRow.status != JobStatus.DONE,
        )
        query = (
            select(ResultRow)
            .where(
                ResultRow.series_instance_uid == series_instance_uid,
                ResultRow.model_version == model_version,
                ResultRow.revision < before_revision,
                ~unwritten,
            )
            .order_by(ResultRow.revision.desc())
            .limit(1)
        )
        with self._transaction(write=False) as session:
            result = session.scalars(query).first()
            return None if result is None else result.to_record()

    def results_for_series(self, series_instance_uid: str) -> list[Result]:
        """Oldest revision first."""
        query = (
            select(ResultRow)
            .where(ResultRow.series_instance_uid == series_instance_uid)
            .order_by(ResultRow.revision, ResultRow.id)
        )
        with self._transaction(write=False) as session:
            return [result.to_record() for result in session.scalars(query)]
