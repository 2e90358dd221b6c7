"""The job store against real databases: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event, text

from pacs_node.errors import (
    ConfigurationError,
    LeaseLostError,
    NotFoundError,
    PermanentError,
    StoreUnavailableError,
)
from pacs_node.store import (
    InstanceOutcome,
    JobKind,
    JobStatus,
    JobStore,
    NewInstance,
    NewResult,
    Result,
    SeriesState,
    ingest,
)
from pacs_node.store.database import create_store_engine, writer
from pacs_node.store.migrate import alembic_config
from pacs_node.store.schema import Base
from tests.peers import free_port

T = TypeVar("T")

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
STUDY = "1.2.826.0.1.3680043.8.498.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
QUIET = 60.0


def series_uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.2.{n}"


def instance(
    series: int,
    number: int | None,
    *,
    sop: str | None = None,
    sha256: str = "a" * 64,
    at: datetime = T0,
    images_in_acquisition: int | None = None,
    classifiable: bool = True,
    calling_ae: str = "PACS",
) -> NewInstance:
    sop = sop or f"{series_uid(series)}.{number}"
    return NewInstance(
        sop_instance_uid=sop,
        sop_class_uid=CT_IMAGE,
        series_instance_uid=series_uid(series),
        study_instance_uid=STUDY,
        modality="CT",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"instances/{STUDY}/{series_uid(series)}/{sop}.dcm",
        size=1024,
        sha256=sha256,
        calling_ae=calling_ae,
        received_at=at,
        instance_number=number,
        images_in_acquisition=images_in_acquisition,
        classifiable=classifiable,
        exclusion_reason=None if classifiable else "localizer",
    )


def result_for(series: int, revision: int, model_version: str = "1.0.0") -> NewResult:
    return NewResult(
        series_instance_uid=series_uid(series),
        study_instance_uid=STUDY,
        revision=revision,
        model_name="lung-ct-mobilenetv2",
        model_version=model_version,
        model_hash="sha256:" + "b" * 64,
        label="benign",
        probabilities={"normal": 0.1, "benign": 0.7, "malignant": 0.2},
        slices=[{"sop_instance_uid": f"{series_uid(series)}.1", "probabilities": [0.1, 0.7, 0.2]}],
        evidence=[f"{series_uid(series)}.1"],
        sr_sop_instance_uid=f"2.25.{series}{revision}",
        sr_series_instance_uid=f"2.25.9{series}",
        sr_path=f"reports/{STUDY}/2.25.{series}{revision}.dcm",
    )


def infer_jobs(store: JobStore, count: int) -> list[int]:
    """`count` queued INFER jobs, one per completed single-instance series; oldest first."""
    for n in range(count):
        store.record_instance(instance(n, 1))
    store.complete_ready_series(T0 + timedelta(seconds=QUIET), QUIET)
    ids = sorted(job.id for job in store.list_jobs(kind=JobKind.INFER, limit=count))
    assert len(ids) == count
    return ids


def claimed_infer_job(store: JobStore, worker: str = "w1", lease: float = 30.0) -> int:
    (job_id,) = infer_jobs(store, 1)
    job = store.claim(JobKind.INFER, worker, lease, now=T0 + timedelta(seconds=QUIET))
    assert job is not None and job.id == job_id
    return job_id


def reported(
    store: JobStore, job_id: int, worker: str, result: NewResult, destinations: list[str]
) -> Result:
    """Complete a claimed INFER job with `result`, then its REPORT job, as the stages do."""
    stored = store.complete_inference(job_id, worker, result)
    report = store.claim(JobKind.REPORT, worker, 30)
    assert report is not None and report.result_id == stored.id
    store.complete_report(report.id, worker, destinations)
    return stored


def in_threads(count: int, work: Callable[[int], T]) -> list[T]:
    """Run `work(i)` in `count` threads released together; their results."""
    start = threading.Barrier(count)

    def run(i: int) -> T:
        start.wait(timeout=10)
        return work(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def events(store: JobStore, job_id: int) -> list[str]:
    return [event.event for event in store.job_events(job_id)]


def execute(url: str, statement: str, **params: Any) -> None:
    """Change rows behind the store's back, to set up a state the API cannot reach."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(statement), params)
    finally:
        engine.dispose()


# schema


def test_migrations_run_from_empty_and_match_the_models(database_url: str) -> None:
    store = JobStore(database_url)
    try:
        with pytest.raises(ConfigurationError, match=r"none.*expected 0004"):
            store.check_schema()
        store.upgrade()
        store.check_schema()
        store.upgrade()  # at head already: nothing to do

        engine = create_engine(database_url)
        try:
            with engine.connect() as connection:
                diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
            assert diff == []
            with engine.begin() as connection:
                command.downgrade(alembic_config(connection), "base")
        finally:
            engine.dispose()
        with pytest.raises(ConfigurationError):
            store.check_schema()
        store.upgrade()
        store.check_schema()
    finally:
        store.close()


def test_datetimes_come_back_aware_utc(store: JobStore) -> None:
    local = T0.astimezone(timezone(timedelta(hours=2)))
    store.record_instance(instance(1, 1, at=local))
    series = store.get_series(series_uid(1))
    assert series is not None
    assert series.first_received_at == T0
    assert series.first_received_at.utcoffset() == timedelta(0)


def test_unreachable_sqlite_database_is_store_unavailable(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'missing-folder' / 'store.db'}")
    with pytest.raises(StoreUnavailableError):
        store.get_job(1)
    with pytest.raises(StoreUnavailableError):
        store.check_schema()
    store.close()


def test_locked_sqlite_database_is_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    setup = JobStore(f"sqlite:///{path}")
    setup.upgrade()
    setup.close()
    store = JobStore(f"sqlite:///{path}?timeout=0.2")
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailableError, match="locked"):
            store.record_instance(instance(1, 1))
        holder.execute("ROLLBACK")
        assert store.record_instance(instance(1, 1)).outcome is InstanceOutcome.NEW
    finally:
        holder.close()
        store.close()


def sqlite_rows(path: Path, table: str, key: str) -> dict[str, dict[str, Any]]:
    """Every row of `table` as SQLite stores it (no SQLAlchemy types), by `key`."""
    connection = sqlite3.connect(path)
    connection.row_factory = sqlite3.Row
    try:
        return {row[key]: dict(row) for row in connection.execute(f"SELECT * FROM {table}")}
    finally:
        connection.close()


def sqlite_write_lock_is_free(path: Path) -> bool:
    """Whether another connection can take the database's write lock at once."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        other.close()


def test_sqlite_new_instance_rows_equal_the_core_statements_rows(tmp_path: Path) -> None:
    """A new instance goes through sqlite3 itself on SQLite (ingest.NewInstanceWriter):
    its rows must hold exactly what SQLAlchemy's statements would have written."""
    path = tmp_path / "store.db"
    store = JobStore(f"sqlite:///{path}")
    store.upgrade()
    local = T0.astimezone(timezone(timedelta(hours=-5)))  # converted to UTC on both paths
    through_driver = [
        instance(1, 1, at=local, images_in_acquisition=2),
        instance(1, 2, at=local, classifiable=False),
    ]
    through_core = [
        instance(2, 1, at=local, images_in_acquisition=2),
        instance(2, 2, at=local, classifiable=False),
    ]
    for new in through_driver:
        assert store.record_instance(new).outcome is InstanceOutcome.NEW
    engine = writer(create_store_engine(f"sqlite:///{path}"))
    try:
        for new in through_core:
            with engine.begin() as connection:
                assert ingest.record_instance(connection, new).outcome is InstanceOutcome.NEW
    finally:
        engine.dispose()
        store.close()

    series = sqlite_rows(path, "series", "series_instance_uid")
    driver_series, core_series = series.pop(series_uid(1)), series.pop(series_uid(2))
    assert series == {}
    assert {**driver_series, "series_instance_uid": ""} == {
        **core_series,
        "series_instance_uid": "",
    }
    assert driver_series["first_received_at"] == "2025-03-01 12:00:00.000000"
    instances = sqlite_rows(path, "instances", "sop_instance_uid")
    for driver_new, core_new in zip(through_driver, through_core, strict=True):
        driver_row = instances.pop(driver_new.sop_instance_uid)
        core_row = instances.pop(core_new.sop_instance_uid)
        for row in (driver_row, core_row):
            row["sop_instance_uid"] = row["series_instance_uid"] = ""
            row["path"] = row["path"].replace(series_uid(1), "").replace(series_uid(2), "")
        assert driver_row == core_row


def test_sqlite_new_instances_skip_sqlalchemy_and_repeats_take_it(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = JobStore(f"sqlite:///{path}")
    store.upgrade()
    executed: list[str] = []

    def count(*arguments: Any) -> None:
        executed.append(arguments[2])  # the SQL

    event.listen(Engine, "before_cursor_execute", count)
    try:
        assert store.record_instance(instance(1, 1)).outcome is InstanceOutcome.NEW
        assert executed == []
        changed = instance(1, 1, sha256="c" * 64)
        assert store.record_instance(changed).outcome is InstanceOutcome.CHANGED
        assert executed != []
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    # The repeat's first try was rolled back: no lock is left held.
    assert sqlite_write_lock_is_free(path)
    assert store.record_instance(instance(1, 2)).outcome is InstanceOutcome.NEW
    series = store.get_series(series_uid(1))
    assert series is not None and (series.instance_count, series.classifiable_count) == (2, 2)
    store.close()


def test_sqlite_new_instance_writer_ends_its_own_transactions(tmp_path: Path) -> None:
    """A repeat, or a failure mid-transaction, must not leave the write lock held,
    even on an engine whose pool does not roll back connections it takes back."""
    path = tmp_path / "store.db"
    setup = JobStore(f"sqlite:///{path}")
    setup.upgrade()
    setup.record_instance(instance(1, 1))
    setup.close()
    engine = create_engine(f"sqlite:///{path}", pool_reset_on_return=None)
    event.listen(
        engine, "connect", lambda connection, _: setattr(connection, "isolation_level", None)
    )
    writer_ = ingest.NewInstanceWriter(engine)

    try:
        assert writer_.record(instance(1, 1)) is None  # a repeat
        assert sqlite_write_lock_is_free(path)
        with pytest.raises(ValueError, match="naive"):
            writer_.record(instance(1, 2, at=datetime(2025, 3, 1, 12, 0)))
        assert sqlite_write_lock_is_free(path)
        recorded = writer_.record(instance(1, 3))
        assert recorded is not None and recorded.classifiable_in_series == 2
    finally:
        engine.dispose()


def test_postgresql_server_down_is_store_unavailable() -> None:
    store = JobStore(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    with pytest.raises(StoreUnavailableError):
        store.queue_depth()
    store.close()


def test_unknown_backend_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        JobStore("mysql://localhost/pacs")


# receive


def test_duplicate_instance_is_identical_and_changes_nothing(store: JobStore) -> None:
    assert store.record_instance(instance(1, 1)).outcome is InstanceOutcome.NEW
    before = store.get_series(series_uid(1))
    later = T0 + timedelta(minutes=5)
    assert store.record_instance(instance(1, 1, at=later)).outcome is InstanceOutcome.IDENTICAL
    assert store.get_series(series_uid(1)) == before
    assert before is not None and before.instance_count == 1
    (stored,) = store.series_instances(series_uid(1))
    assert stored.received_at == T0


def test_changed_instance_updates_its_row_and_reopens_the_series(store: JobStore) -> None:
    store.record_instance(instance(1, 1))
    store.record_instance(instance(1, 2))
    (completed,) = store.complete_ready_series(T0 + timedelta(seconds=QUIET), QUIET)
    assert (completed.state, completed.revision) == (SeriesState.COMPLETE, 1)

    later = T0 + timedelta(minutes=5)
    changed = instance(1, 1, sha256="c" * 64, at=later, classifiable=False)
    assert store.record_instance(changed).outcome is InstanceOutcome.CHANGED

    series = store.get_series(series_uid(1))
    assert series is not None
    assert series.state is SeriesState.OPEN
    assert (series.revision, series.completed_at) == (1, None)
    assert (series.instance_count, series.classifiable_count) == (2, 1)
    assert series.last_received_at == later
    (row,) = [
        i
        for i in store.series_instances(series_uid(1), classifiable_only=False)
        if i.sha256[0] == "c"
    ]
    assert (row.classifiable, row.exclusion_reason, row.received_at) == (False, "localizer", later)

    (again,) = store.complete_ready_series(later + timedelta(seconds=QUIET), QUIET)
    assert (again.state, again.revision) == (SeriesState.COMPLETE, 2)
    revisions = sorted(job.revision for job in store.list_jobs(kind=JobKind.INFER))
    assert revisions == [1, 2]


def test_instance_moved_to_another_series_reopens_both(store: JobStore) -> None:
    store.record_instance(instance(1, 1, sop="2.25.77"))
    store.record_instance(instance(1, 2))
    store.complete_ready_series(T0 + timedelta(seconds=QUIET), QUIET)
    moved = instance(2, 1, sop="2.25.77", sha256="d" * 64)
    assert store.record_instance(moved).outcome is InstanceOutcome.CHANGED
    old, new = store.get_series(series_uid(1)), store.get_series(series_uid(2))
    assert old is not None and new is not None
    assert (old.state, old.instance_count, old.classifiable_count) == (SeriesState.OPEN, 1, 1)
    assert (new.state, new.instance_count, new.classifiable_count) == (SeriesState.OPEN, 1, 1)


def test_new_instance_reopens_a_skipped_series(store: JobStore) -> None:
    store.record_instance(instance(1, 1, classifiable=False))
    (skipped,) = store.complete_ready_series(T0 + timedelta(seconds=QUIET), QUIET)
    assert skipped.state is SeriesState.SKIPPED
    assert skipped.skip_reason == "no classifiable instance"
    assert store.list_jobs() == []

    later = T0 + timedelta(minutes=5)
    assert store.record_instance(instance(1, 2, at=later)).outcome is InstanceOutcome.NEW
    reopened = store.get_series(series_uid(1))
    assert reopened is not None
    assert (reopened.state, reopened.skip_reason) == (SeriesState.OPEN, None)
    (complete,) = store.complete_ready_series(later + timedelta(seconds=QUIET), QUIET)
    assert (complete.state, complete.revision) == (SeriesState.COMPLETE, 2)
    (job,) = store.list_jobs()
    assert (job.kind, job.revision) == (JobKind.INFER, 2)


def test_concurrent_instances_of_one_new_series(store: JobStore) -> None:
    per_thread = 5

    def receive(thread: int) -> list[InstanceOutcome]:
        return [
            store.record_instance(instance(1, thread * per_thread + k + 1, at=T0)).outcome
            for k in range(per_thread)
        ]

    outcomes = [o for batch in in_threads(8, receive) for o in batch]
    assert outcomes == [InstanceOutcome.NEW] * 8 * per_thread
    series = store.get_series(series_uid(1))
    assert series is not None
    assert (series.instance_count, series.classifiable_count) == (40, 40)
    assert len(store.series_instances(series_uid(1))) == 40


def test_concurrent_copies_of_one_instance_are_new_once(store: JobStore) -> None:
    outcomes = in_threads(8, lambda _: store.record_instance(instance(1, 1)).outcome)
    assert Counter(outcomes) == {InstanceOutcome.NEW: 1, InstanceOutcome.IDENTICAL: 7}
    series = store.get_series(series_uid(1))
    assert series is not None and series.instance_count == 1


def test_series_instances_order_and_filter(store: JobStore) -> None:
    for number in (3, None, 1, 2):
        store.record_instance(instance(1, number, sop=f"2.25.{number or 0}"))
    store.record_instance(instance(1, 4, classifiable=False))
    numbers = [i.instance_number for i in store.series_instances(series_uid(1))]
    assert numbers == [1, 2, 3, None]
    everything = store.series_instances(series_uid(1), classifiable_only=False)
    assert [i.instance_number for i in everything] == [1, 2, 3, 4, None]


# assembly


def test_recording_says_how_many_classifiable_instances_the_series_now_holds(
    store: JobStore,
) -> None:
    """What the receiver compares with ImagesInAcquisition to sweep at once."""
    counts = [store.record_instance(instance(1, n)).classifiable_in_series for n in (1, 2)]
    assert counts == [1, 2]
    assert store.record_instance(instance(1, None, classifiable=False)).classifiable_in_series == 2
    assert store.record_instance(instance(1, 2)).classifiable_in_series is None  # identical
    changed = store.record_instance(instance(1, 2, sha256="b" * 64, classifiable=False))
    assert (changed.outcome, changed.classifiable_in_series) == (InstanceOutcome.CHANGED, 1)


def test_content_completes_a_series_before_its_quiet_period(store: JobStore) -> None:
    for number in (1, 2, 3):
        store.record_instance(instance(1, number, images_in_acquisition=3))
    store.record_instance(instance(1, None, classifiable=False))  # a localizer does not count
    (series,) = store.complete_ready_series(T0, quiet_seconds=3600)
    assert (series.series_instance_uid, series.state, series.revision) == (
        series_uid(1),
        SeriesState.COMPLETE,
        1,
    )
    assert series.completed_at == T0


@pytest.mark.parametrize(
    ("numbers", "images_in_acquisition"),
    [
        pytest.param((1, 2), (3, 3), id="one-missing"),
        pytest.param((1, 2, 4), (3, 3, 3), id="gap"),
        pytest.param((1, 2, 2), (3, 3, 3), id="duplicate-number"),
        pytest.param((1, 2, None), (3, 3, 3), id="no-number"),
        pytest.param((1, 2, 3), (3, 3, None), id="count-not-stated"),
        pytest.param((1, 2, 3), (3, 4, 3), id="counts-disagree"),
    ],
)
def test_incomplete_content_waits_for_the_quiet_period(
    store: JobStore,
    numbers: tuple[int | None, ...],
    images_in_acquisition: tuple[int | None, ...],
) -> None:
    for k, (number, expected) in enumerate(zip(numbers, images_in_acquisition, strict=True)):
        store.record_instance(instance(1, number, sop=f"2.25.{k}", images_in_acquisition=expected))
    assert store.complete_ready_series(T0 + timedelta(seconds=QUIET - 1), QUIET) == []
    (series,) = store.complete_ready_series(T0 + timedelta(seconds=QUIET), QUIET)
    assert series.state is SeriesState.COMPLETE


def test_quiet_period_per_calling_ae(store: JobStore) -> None:
    store.record_instance(instance(1, 1, calling_ae="FAST"))
    store.record_instance(instance(2, 1, calling_ae="SLOW"))
    by_ae = {"SLOW": 600.0}
    (fast,) = store.complete_ready_series(T0 + timedelta(seconds=QUIET), QUIET, by_ae)
    assert fast.series_instance_uid == series_uid(1)
    assert store.complete_ready_series(T0 + timedelta(seconds=599), QUIET, by_ae) == []
    (slow,) = store.complete_ready_series(T0 + timedelta(seconds=600), QUIET, by_ae)
    assert slow.series_instance_uid == series_uid(2)


def test_sweeping_twice_queues_one_infer_job(store: JobStore) -> None:
    store.record_instance(instance(1, 1))
    now = T0 + timedelta(seconds=QUIET)
    assert len(store.complete_ready_series(now, QUIET, max_attempts=3)) == 1
    assert store.complete_ready_series(now, QUIET) == []
    (job,) = store.list_jobs()
    assert (job.kind, job.status, job.series_instance_uid, job.revision, job.max_attempts) == (
        JobKind.INFER,
        JobStatus.QUEUED,
        series_uid(1),
        1,
        3,
    )
    assert events(store, job.id) == ["queued"]


def test_concurrent_sweeps_queue_one_infer_job_per_series(store: JobStore) -> None:
    for n in range(20):
        store.record_instance(instance(n, 1))
    now = T0 + timedelta(seconds=QUIET)
    swept = in_threads(4, lambda _: store.complete_ready_series(now, QUIET))
    completed = [series.series_instance_uid for batch in swept for series in batch]
    assert sorted(completed) == sorted(series_uid(n) for n in range(20))
    jobs = store.list_jobs(kind=JobKind.INFER)
    assert sorted(job.series_instance_uid for job in jobs) == sorted(completed)
    assert {job.revision for job in jobs} == {1}


# queue


def test_claim_takes_the_oldest_due_job(store: JobStore) -> None:
    first, second = infer_jobs(store, 2)
    now = T0 + timedelta(seconds=QUIET)
    assert store.claim(JobKind.SEND, "w1", 30, now=now) is None
    job = store.claim(JobKind.INFER, "w1", 30, now=now)
    assert job is not None
    assert (job.id, job.status, job.attempts, job.worker_id) == (first, JobStatus.RUNNING, 1, "w1")
    assert job.lease_until == now + timedelta(seconds=30)
    assert events(store, first) == ["queued", "claimed"]
    # Not due before its run_after.
    assert store.claim(JobKind.INFER, "w2", 30, now=T0) is None
    job = store.claim(JobKind.INFER, "w2", 30, now=now)
    assert job is not None and job.id == second
    assert store.queue_depth() == 2


def test_claim_is_exclusive_across_threads(store: JobStore) -> None:
    created = infer_jobs(store, 30)
    now = T0 + timedelta(seconds=QUIET)

    def drain(thread: int) -> list[int]:
        taken = []
        while (job := store.claim(JobKind.INFER, f"w{thread}", 30, now=now)) is not None:
            taken.append(job.id)
        return taken

    claimed = [job_id for batch in in_threads(8, drain) for job_id in batch]
    assert sorted(claimed) == sorted(created)
    assert all(job.attempts == 1 for job in store.list_jobs(status=JobStatus.RUNNING))


def test_heartbeat_extends_only_a_held_lease(store: JobStore) -> None:
    job_id = claimed_infer_job(store, "w1", lease=30)
    assert store.heartbeat(job_id, "w1", 3600)
    job = store.get_job(job_id)
    assert job is not None and job.lease_until is not None
    assert job.lease_until > datetime.now(timezone.utc) + timedelta(seconds=3000)
    assert not store.heartbeat(job_id, "w2", 3600)


def test_expired_lease_is_reaped_and_the_old_worker_loses_the_job(store: JobStore) -> None:
    job_id = claimed_infer_job(store, "w1", lease=30)
    claimed_at = T0 + timedelta(seconds=QUIET)
    assert store.reap_expired_leases(now=claimed_at + timedelta(seconds=10)) == 0
    assert store.reap_expired_leases(now=claimed_at + timedelta(seconds=31)) == 1
    job = store.get_job(job_id)
    assert job is not None
    assert (job.status, job.lease_until, job.attempts) == (JobStatus.QUEUED, None, 1)
    assert events(store, job_id)[-1] == "lease expired"

    reclaimed = store.claim(JobKind.INFER, "w2", 30, now=claimed_at + timedelta(seconds=32))
    assert reclaimed is not None and (reclaimed.id, reclaimed.attempts) == (job_id, 2)
    assert not store.heartbeat(job_id, "w1", 30)
    with pytest.raises(LeaseLostError):
        store.complete_inference(job_id, "w1", result_for(0, 1))
    with pytest.raises(LeaseLostError):
        store.fail(job_id, "w1", "late failure", None)
    assert store.results_for_series(series_uid(0)) == []
    assert store.list_jobs(kind=JobKind.SEND) == []
    job = store.get_job(job_id)
    assert job is not None and (job.status, job.worker_id) == (JobStatus.RUNNING, "w2")


def test_reaping_the_last_attempt_makes_the_job_dead(store: JobStore) -> None:
    store.record_instance(instance(1, 1))
    store.complete_ready_series(T0 + timedelta(seconds=QUIET), QUIET, max_attempts=1)
    job = store.claim(JobKind.INFER, "w1", 30, now=T0 + timedelta(seconds=QUIET))
    assert job is not None
    assert store.reap_expired_leases(now=T0 + timedelta(hours=1)) == 1
    dead = store.get_job(job.id)
    assert dead is not None and dead.status is JobStatus.DEAD
    assert dead.last_error is not None and "expired" in dead.last_error


def test_failures_back_off_then_the_job_is_dead(store: JobStore) -> None:
    store.record_instance(instance(1, 1))
    now = T0 + timedelta(seconds=QUIET)
    store.complete_ready_series(now, QUIET, max_attempts=3)
    for attempt in (1, 2):
        job = store.claim(JobKind.INFER, "w1", 30, now=now)
        assert job is not None and job.attempts == attempt
        retry_at = now + timedelta(seconds=10 * attempt)
        failed = store.fail(job.id, "w1", f"GPU busy ({attempt})", retry_at)
        assert (failed.status, failed.run_after, failed.lease_until) == (
            JobStatus.QUEUED,
            retry_at,
            None,
        )
        assert failed.last_error == f"GPU busy ({attempt})"
        assert store.claim(JobKind.INFER, "w1", 30, now=retry_at - timedelta(seconds=1)) is None
        now = retry_at
    job = store.claim(JobKind.INFER, "w1", 30, now=now)
    assert job is not None and job.attempts == 3
    dead = store.fail(job.id, "w1", "GPU busy (3)", now + timedelta(seconds=30))
    assert dead.status is JobStatus.DEAD
    assert store.claim(JobKind.INFER, "w1", 30, now=now + timedelta(days=1)) is None
    assert store.list_jobs(status=JobStatus.DEAD) == [dead]
    assert events(store, job.id) == ["queued"] + ["claimed", "failed"] * 2 + ["claimed", "dead"]


def test_failure_without_retry_time_is_dead_at_once(store: JobStore) -> None:
    job_id = claimed_infer_job(store)
    dead = store.fail(job_id, "w1", "model artifact missing", None)
    assert (dead.status, dead.attempts, dead.last_error) == (
        JobStatus.DEAD,
        1,
        "model artifact missing",
    )


def test_retry_revives_a_dead_job(store: JobStore) -> None:
    job_id = claimed_infer_job(store)
    store.fail(job_id, "w1", "broken", None)
    revived = store.retry(job_id)
    assert (revived.status, revived.attempts, revived.lease_until) == (JobStatus.QUEUED, 0, None)
    assert events(store, job_id)[-1] == "retried by operator"
    job = store.claim(JobKind.INFER, "w2", 30)
    assert job is not None and (job.id, job.attempts) == (job_id, 1)
    with pytest.raises(PermanentError, match="running"):
        store.retry(job_id)
    with pytest.raises(NotFoundError):
        store.retry(job_id + 1000)


def test_complete_inference_queues_one_report_job_and_is_idempotent(
    store: JobStore, database_url: str
) -> None:
    job_id = claimed_infer_job(store)
    result = store.complete_inference(job_id, "w1", result_for(0, 1))
    assert result == store.get_result(result.id)
    assert (result.revision, result.label, result.probabilities["benign"]) == (1, "benign", 0.7)
    assert result.slices == result_for(0, 1).slices
    done = store.get_job(job_id)
    assert done is not None and done.status is JobStatus.DONE
    assert events(store, job_id)[-1] == "done"
    (report,) = store.list_jobs(kind=JobKind.REPORT)
    assert (report.status, report.result_id, report.revision, report.max_attempts) == (
        JobStatus.QUEUED,
        result.id,
        1,
        done.max_attempts,
    )
    assert store.list_jobs(kind=JobKind.SEND) == []  # no SR to send yet

    # A worker that completes the same inference again (say, after a commit
    # whose answer was lost) gets the stored result, and nothing doubles.
    execute(database_url, "UPDATE jobs SET status = 'running' WHERE id = :id", id=job_id)
    again = store.complete_inference(job_id, "w1", result_for(0, 1))
    assert again == result
    assert store.results_for_series(series_uid(0)) == [result]
    assert store.list_jobs(kind=JobKind.REPORT) == [report]


def test_complete_inference_rejects_a_result_for_another_revision(store: JobStore) -> None:
    job_id = claimed_infer_job(store)
    with pytest.raises(PermanentError, match="revision"):
        store.complete_inference(job_id, "w1", result_for(0, 2))
    job = store.get_job(job_id)
    assert job is not None and job.status is JobStatus.RUNNING
    assert store.list_jobs(kind=JobKind.REPORT) == []


def test_complete_report_fans_out_sends_and_is_idempotent(
    store: JobStore, database_url: str
) -> None:
    job_id = claimed_infer_job(store)
    result = store.complete_inference(job_id, "w1", result_for(0, 1))
    with pytest.raises(PermanentError, match="infer job, not report"):
        store.complete_report(job_id, "w1", ["PACS"])
    report = store.claim(JobKind.REPORT, "reporter", 30)
    assert report is not None
    with pytest.raises(LeaseLostError):
        store.complete_report(report.id, "someone-else", ["PACS"])
    assert store.list_jobs(kind=JobKind.SEND) == []
    done = store.complete_report(report.id, "reporter", ["PACS", "ARCHIVE", "PACS"], 7)
    assert done.status is JobStatus.DONE
    assert events(store, report.id)[-1] == "done"
    sends = store.list_jobs(kind=JobKind.SEND)
    assert sorted(
        (job.destination, job.result_id, job.revision, job.max_attempts) for job in sends
    ) == [
        ("ARCHIVE", result.id, 1, 7),
        ("PACS", result.id, 1, 7),
    ]
    execute(database_url, "UPDATE jobs SET status = 'running' WHERE id = :id", id=report.id)
    store.complete_report(report.id, "reporter", ["PACS", "ARCHIVE"])
    assert len(store.list_jobs(kind=JobKind.SEND)) == 2


def test_complete_send(store: JobStore) -> None:
    reported(store, claimed_infer_job(store), "w1", result_for(0, 1), ["PACS"])
    send = store.claim(JobKind.SEND, "sender", 30)
    assert send is not None and send.destination == "PACS"
    with pytest.raises(LeaseLostError):
        store.complete_send(send.id, "someone-else")
    done = store.complete_send(send.id, "sender")
    assert done.status is JobStatus.DONE
    assert store.queue_depth() == 0
    with pytest.raises(PermanentError, match="done"):
        store.retry(send.id)


def test_results_by_revision(store: JobStore) -> None:
    store.record_instance(instance(1, 1))
    store.complete_ready_series(T0 + timedelta(seconds=QUIET), QUIET)
    first = store.claim(JobKind.INFER, "w1", 30)
    assert first is not None
    one = reported(store, first.id, "w1", result_for(1, 1), [])
    later = T0 + timedelta(minutes=5)
    store.record_instance(instance(1, 2, at=later))
    store.complete_ready_series(later + timedelta(seconds=QUIET), QUIET)
    second = store.claim(JobKind.INFER, "w1", 30)
    assert second is not None and second.revision == 2
    two = store.complete_inference(second.id, "w1", result_for(1, 2))

    assert store.results_for_series(series_uid(1)) == [one, two]
    assert store.previous_result(series_uid(1), "1.0.0", before_revision=2) == one
    # Revision 2's SR is not written yet: a report of revision 3 supersedes revision 1's.
    assert store.previous_result(series_uid(1), "1.0.0", before_revision=3) == one
    report = store.claim(JobKind.REPORT, "w1", 30)
    assert report is not None and report.result_id == two.id
    store.complete_report(report.id, "w1", [])
    assert store.previous_result(series_uid(1), "1.0.0", before_revision=3) == two
    assert store.previous_result(series_uid(1), "1.0.0", before_revision=1) is None
    assert store.previous_result(series_uid(1), "2.0.0", before_revision=3) is None


def test_listing_and_lookups(store: JobStore) -> None:
    first, second = infer_jobs(store, 2)
    assert [job.id for job in store.list_jobs()] == [second, first]
    assert [job.id for job in store.list_jobs(limit=1)] == [second]
    assert store.list_jobs(status=JobStatus.DEAD) == []
    assert store.get_job(second + 1000) is None
    assert store.get_series("2.25.404") is None
    assert store.get_result(404) is None
    assert store.queue_depth() == 2


def test_jobs_of_a_gone_worker_are_requeued_at_once(store: JobStore) -> None:
    job_id = claimed_infer_job(store, "host:123:infer", lease=3600)
    assert store.release_abandoned(["host:999:infer"]) == 0
    assert store.release_abandoned(["host:123:infer"]) == 1
    job = store.get_job(job_id)
    assert job is not None
    # The attempt stays counted, so a job that kills its worker every time ends up dead.
    assert (job.status, job.lease_until, job.attempts) == (JobStatus.QUEUED, None, 1)
    assert events(store, job_id)[-1] == "worker gone"
    assert store.release_abandoned([]) == 0
