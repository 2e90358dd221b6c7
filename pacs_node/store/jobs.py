"""The job queue: enqueue, atomic claim, leases, failure and completion.

Every function runs inside the caller's write transaction and records what it
did in the append-only job_events table. A worker may finish or fail a job
only while it still holds it (RUNNING with its worker id); a job whose lease
expired may already belong to someone else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session, aliased

from pacs_node.errors import LeaseLostError, NotFoundError, PermanentError
from pacs_node.store.database import insert_ignoring_conflicts
from pacs_node.store.records import Job, JobKind, JobStatus, NewResult, Result
from pacs_node.store.schema import JobEventRow, JobRow, ResultRow


def enqueue(
    session: Session,
    kind: JobKind,
    series_instance_uid: str,
    revision: int,
    now: datetime,
    max_attempts: int,
    result_id: int | None = None,
    destination: str | None = None,
) -> int | None:
    """Queue a job unless its twin exists (unique indexes); the new job's id or None."""
    job_id = session.scalar(
        insert_ignoring_conflicts(session.get_bind().dialect.name, JobRow)
        .values(
            kind=kind,
            status=JobStatus.QUEUED,
            series_instance_uid=series_instance_uid,
            revision=revision,
            result_id=result_id,
            destination=destination,
            attempts=0,
            max_attempts=max_attempts,
            run_after=now,
            created_at=now,
            updated_at=now,
        )
        .returning(JobRow.id)
    )
    if job_id is not None:
        _record(session, job_id, now, "queued", f"revision {revision}")
    return job_id


def claim(
    session: Session, kind: JobKind, worker_id: str, lease_seconds: float, now: datetime
) -> Job | None:
    # One statement: the subquery picks the oldest due job (locking it and
    # skipping rows other claimers hold, on PostgreSQL) and the UPDATE takes it
    # only if it is still queued. SQLite serialises it by BEGIN IMMEDIATE.
    candidate = aliased(JobRow)
    oldest_due = (
        select(candidate.id)
        .where(
            candidate.kind == kind,
            candidate.status == JobStatus.QUEUED,
            candidate.run_after <= now,
        )
        .order_by(candidate.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    job = session.scalars(
        update(JobRow)
        .where(JobRow.id == oldest_due, JobRow.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.RUNNING,
            lease_until=now + timedelta(seconds=lease_seconds),
            worker_id=worker_id,
            attempts=JobRow.attempts + 1,
            updated_at=now,
        )
        .returning(JobRow)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if job is None:
        return None
    _record(session, job.id, now, "claimed", f"worker {worker_id}, attempt {job.attempts}")
    return job.to_record()


def heartbeat(
    session: Session, job_id: int, worker_id: str, lease_seconds: float, now: datetime
) -> bool:
    extended = session.execute(
        update(JobRow)
        .where(
            JobRow.id == job_id,
            JobRow.worker_id == worker_id,
            JobRow.status == JobStatus.RUNNING,
        )
        .values(lease_until=now + timedelta(seconds=lease_seconds), updated_at=now)
        .returning(JobRow.id)
        .execution_options(synchronize_session=False)
    ).first()
    return extended is not None


def fail(
    session: Session,
    job_id: int,
    worker_id: str,
    error: str,
    retry_at: datetime | None,
    now: datetime,
) -> Job:
    job = _held_job(session, job_id, worker_id, None)
    job.last_error = error
    job.lease_until = None
    job.updated_at = now
    if retry_at is None or job.attempts >= job.max_attempts:
        job.status = JobStatus.DEAD
        _record(session, job_id, now, "dead", f"after {job.attempts} attempt(s): {error}")
    else:
        job.status = JobStatus.QUEUED
        job.run_after = retry_at
        _record(session, job_id, now, "failed", f"retry at {retry_at.isoformat()}: {error}")
    return job.to_record()


def reap_expired_leases(session: Session, now: datetime) -> int:
    return _release(session, now, JobRow.lease_until < now, "lease expired")


def release_abandoned(session: Session, worker_ids: Sequence[str], now: datetime) -> int:
    return _release(session, now, JobRow.worker_id.in_(worker_ids), "worker gone")


def _release(session: Session, now: datetime, condition: ColumnElement[bool], why: str) -> int:
    """Return RUNNING jobs matching `condition` to the queue, or make them dead.

    The attempt stays counted: a job that kills its worker every time must
    end up dead, not loop forever.
    """
    released = session.scalars(
        select(JobRow)
        .where(JobRow.status == JobStatus.RUNNING, condition)
        .with_for_update(skip_locked=True)
    ).all()
    for job in released:
        job.last_error = f"{why}: worker {job.worker_id}"
        job.lease_until = None
        job.updated_at = now
        if job.attempts >= job.max_attempts:
            job.status = JobStatus.DEAD
            outcome = f"dead after {job.attempts} attempt(s)"
        else:
            job.status = JobStatus.QUEUED
            job.run_after = now
            outcome = "queued again"
        _record(session, job.id, now, why, f"worker {job.worker_id}; {outcome}")
    return len(released)


def retry(session: Session, job_id: int, now: datetime) -> Job:
    job = _locked_job(session, job_id)
    if job.status not in (JobStatus.DEAD, JobStatus.QUEUED):
        raise PermanentError(
            f"job {job_id} is {job.status}; only dead or queued jobs can be retried"
        )
    previous = job.status
    job.status = JobStatus.QUEUED
    job.attempts = 0
    job.run_after = now
    job.lease_until = None
    job.updated_at = now
    _record(session, job_id, now, "retried by operator", f"was {previous}")
    return job.to_record()


def complete_inference(
    session: Session, job_id: int, worker_id: str, result: NewResult, now: datetime
) -> Result:
    """Store the result and queue its REPORT job, which inherits the job's attempts."""
    job = _held_job(session, job_id, worker_id, JobKind.INFER)
    if (result.series_instance_uid, result.revision) != (job.series_instance_uid, job.revision):
        raise PermanentError(
            f"job {job_id} is for revision {job.revision} of its series; "
            "the result is for another series or revision"
        )
    inserted_id = session.scalar(
        insert_ignoring_conflicts(session.get_bind().dialect.name, ResultRow)
        .values(**asdict(result), created_at=now)
        .returning(ResultRow.id)
    )
    # A result for this series, revision and model version is never stored twice.
    stored = session.scalars(
        select(ResultRow).where(
            ResultRow.series_instance_uid == result.series_instance_uid,
            ResultRow.model_version == result.model_version,
            ResultRow.revision == result.revision,
        )
    ).one()
    enqueue(
        session,
        JobKind.REPORT,
        job.series_instance_uid,
        job.revision,
        now,
        job.max_attempts,
        result_id=stored.id,
    )
    _finish(session, job, now, f"result {stored.id}" + ("" if inserted_id else " (already stored)"))
    return stored.to_record()


def complete_report(
    session: Session,
    job_id: int,
    worker_id: str,
    destinations: Sequence[str],
    max_attempts: int,
    now: datetime,
) -> Job:
    """The SR is written: queue one SEND job per destination."""
    job = _held_job(session, job_id, worker_id, JobKind.REPORT)
    for destination in dict.fromkeys(destinations):
        enqueue(
            session,
            JobKind.SEND,
            job.series_instance_uid,
            job.revision,
            now,
            max_attempts,
            result_id=job.result_id,
            destination=destination,
        )
    _finish(session, job, now, f"SR of result {job.result_id} written")
    return job.to_record()


def complete_send(session: Session, job_id: int, worker_id: str, now: datetime) -> Job:
    job = _held_job(session, job_id, worker_id, JobKind.SEND)
    _finish(session, job, now, f"sent to {job.destination}")
    return job.to_record()


def _finish(session: Session, job: JobRow, now: datetime, detail: str) -> None:
    job.status = JobStatus.DONE
    job.lease_until = None
    job.updated_at = now
    _record(session, job.id, now, "done", detail)


def _locked_job(session: Session, job_id: int) -> JobRow:
    job = session.scalars(select(JobRow).where(JobRow.id == job_id).with_for_update()).one_or_none()
    if job is None:
        raise NotFoundError(f"job {job_id} does not exist")
    return job


def _held_job(session: Session, job_id: int, worker_id: str, kind: JobKind | None) -> JobRow:
    """The job, locked, if `worker_id` still holds it; LeaseLostError otherwise."""
    job = _locked_job(session, job_id)
    if kind is not None and job.kind != kind:
        raise PermanentError(f"job {job_id} is a {job.kind} job, not {kind}")
    if job.status != JobStatus.RUNNING or job.worker_id != worker_id:
        raise LeaseLostError(f"job {job_id} is no longer held by worker {worker_id}")
    return job


def _record(session: Session, job_id: int, at: datetime, event: str, detail: str | None) -> None:
    session.add(JobEventRow(job_id=job_id, at=at, event=event, detail=detail))
