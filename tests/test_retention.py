"""Retention: instance files go once their series is delivered and old, never before.

The store-level tests run on SQLite and PostgreSQL; the end-to-end tests run
the node with DCMTK's storescu as the sender and storescp as the PACS.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import create_engine, insert

from pacs_node.config import RetentionSettings
from pacs_node.retention import Retention
from pacs_node.storage import Storage
from pacs_node.store import InstanceOutcome, Job, JobKind, JobStore, SeriesState
from pacs_node.store.assembly import CLASSIFIABLE_FILES_REMOVED
from pacs_node.store.migrate import upgrade
from pacs_node.store.schema import InstanceRow, SeriesRow
from tests.dicom_data import renamed_series
from tests.dicom_data import series_uid as series_uid_of
from tests.peers import chest_ct
from tests.polling import wait_for
from tests.processes import NodeProcess, StoreSCP, storescu
from tests.test_store import (
    QUIET,
    STUDY,
    T0,
    in_threads,
    instance,
    reported,
    result_for,
    series_uid,
)

# Every series in these tests was last received at T0 (unless a test says
# otherwise); sweeping with this cutoff finds them old enough.
AFTER = T0 + timedelta(days=1)


def receive(store: JobStore, series: int, count: int = 2, at: datetime = T0) -> None:
    for number in range(1, count + 1):
        store.record_instance(instance(series, number, at=at))


def claim(store: JobStore, kind: JobKind) -> Job:
    job = store.claim(kind, "w1", 30)
    assert job is not None
    return job


def classify(store: JobStore, series: int, destinations: Sequence[str] = ("PACS",)) -> None:
    """Complete the series, store its result and write its SR; its send jobs stay queued."""
    (completed,) = store.complete_ready_series(AFTER, QUIET)
    assert completed.series_instance_uid == series_uid(series)
    job = claim(store, JobKind.INFER)
    reported(store, job.id, "w1", result_for(series, job.revision), list(destinations))


def send_all(store: JobStore) -> None:
    while (job := store.claim(JobKind.SEND, "w1", 30)) is not None:
        store.complete_send(job.id, "w1")


def deliver(store: JobStore, series: int, destinations: Sequence[str] = ("PACS",)) -> None:
    receive(store, series)
    classify(store, series, destinations)
    send_all(store)


def removed(store: JobStore, series: int) -> list[str]:
    """SOP Instance UIDs of the series' rows marked removed."""
    rows = store.series_instances(series_uid(series), classifiable_only=False, include_removed=True)
    return [row.sop_instance_uid for row in rows if row.removed_at is not None]


# which series are delivered


def test_a_delivered_series_is_marked_removed_and_its_rows_stay(store: JobStore) -> None:
    deliver(store, 1)
    jobs_before = store.list_jobs()
    assert store.expire_instances(T0, AFTER) == []  # last received at the cutoff: too young

    expired = store.expire_instances(AFTER, AFTER)
    assert sorted(row.sop_instance_uid for row in expired) == [
        f"{series_uid(1)}.1",
        f"{series_uid(1)}.2",
    ]
    assert {row.removed_at for row in expired} == {AFTER}
    assert store.expire_instances(AFTER, AFTER) == []  # each instance is handed out once

    # The history stays: rows, series, jobs and results.
    assert store.series_instances(series_uid(1)) == []
    assert len(removed(store, 1)) == 2
    series = store.get_series(series_uid(1))
    assert series is not None and (series.state, series.instance_count) == (SeriesState.COMPLETE, 2)
    assert store.list_jobs() == jobs_before
    assert len(store.results_for_series(series_uid(1))) == 1


@pytest.mark.parametrize("state", ["queued", "running", "retrying", "dead"])
def test_a_send_not_done_keeps_the_instances(store: JobStore, state: str) -> None:
    receive(store, 1)
    classify(store, 1)
    if state != "queued":
        send = claim(store, JobKind.SEND)
        if state == "retrying":
            store.fail(send.id, "w1", "association not established", AFTER)
        elif state == "dead":
            store.fail(send.id, "w1", "association not established", None)
    assert store.expire_instances(AFTER, AFTER) == []
    assert removed(store, 1) == []


def test_a_dead_send_retried_and_done_lets_the_instances_go(store: JobStore) -> None:
    receive(store, 1)
    classify(store, 1)
    send = claim(store, JobKind.SEND)
    store.fail(send.id, "w1", "association not established", None)
    assert store.expire_instances(AFTER, AFTER) == []
    store.retry(send.id)
    send_all(store)
    assert len(store.expire_instances(AFTER, AFTER)) == 2


def test_every_destination_must_have_the_sr(store: JobStore) -> None:
    receive(store, 1)
    classify(store, 1, ["PACS", "ARCHIVE"])
    send = claim(store, JobKind.SEND)
    store.complete_send(send.id, "w1")
    assert store.expire_instances(AFTER, AFTER) == []
    send_all(store)
    assert len(store.expire_instances(AFTER, AFTER)) == 2


def test_without_destinations_the_stored_sr_is_enough(store: JobStore) -> None:
    receive(store, 1)
    classify(store, 1, destinations=[])
    assert store.list_jobs(kind=JobKind.SEND) == []
    assert len(store.expire_instances(AFTER, AFTER)) == 2


@pytest.mark.parametrize("inference", ["queued", "running", "dead"])
def test_a_series_without_its_sr_keeps_the_instances(store: JobStore, inference: str) -> None:
    receive(store, 1)
    store.complete_ready_series(AFTER, QUIET)
    if inference != "queued":
        job = claim(store, JobKind.INFER)
        if inference == "dead":
            store.fail(job.id, "w1", "cannot decode", None)
    assert store.expire_instances(AFTER, AFTER) == []


@pytest.mark.parametrize("report", ["queued", "running", "dead"])
def test_a_result_whose_sr_is_not_written_keeps_the_instances(store: JobStore, report: str) -> None:
    receive(store, 1)
    store.complete_ready_series(AFTER, QUIET)
    store.complete_inference(claim(store, JobKind.INFER).id, "w1", result_for(1, 1))
    if report != "queued":
        job = claim(store, JobKind.REPORT)
        if report == "dead":
            store.fail(job.id, "w1", "disk full", None)
    assert store.expire_instances(AFTER, AFTER) == []


def test_a_skipped_series_goes_after_the_retention_period(store: JobStore) -> None:
    store.record_instance(instance(1, 1, classifiable=False))
    assert store.expire_instances(AFTER, AFTER) == []  # open
    (skipped,) = store.complete_ready_series(AFTER, QUIET)
    assert skipped.state is SeriesState.SKIPPED
    assert store.expire_instances(T0, AFTER) == []
    assert len(store.expire_instances(AFTER, AFTER)) == 1


def test_an_open_series_keeps_its_instances(store: JobStore) -> None:
    receive(store, 1)
    assert store.expire_instances(AFTER, AFTER) == []
    assert removed(store, 1) == []


def test_a_reopened_series_waits_for_its_new_revision(store: JobStore) -> None:
    deliver(store, 1)
    late = T0 + timedelta(minutes=5)
    store.record_instance(instance(1, 3, at=late))
    later = late + timedelta(days=1)
    assert store.expire_instances(later, later) == []  # open again

    store.complete_ready_series(later, QUIET)
    # Revision 1 was delivered, revision 2 is not reported yet.
    assert store.expire_instances(later, later) == []
    job = claim(store, JobKind.INFER)
    assert job.revision == 2
    reported(store, job.id, "w1", result_for(1, 2), ["PACS"])
    assert store.expire_instances(later, later) == []
    send_all(store)
    assert len(store.expire_instances(later, later)) == 3


def test_an_earlier_revision_still_queued_keeps_the_instances(store: JobStore) -> None:
    receive(store, 1)
    store.complete_ready_series(AFTER, QUIET)
    first = claim(store, JobKind.INFER)
    # Revision 1's inference waits for a retry while revision 2 is delivered;
    # it will read the series' files too.
    retry_at = datetime.now(timezone.utc) + timedelta(hours=1)
    store.fail(first.id, "w1", "out of GPU memory", retry_at)
    store.record_instance(instance(1, 3, at=T0 + timedelta(minutes=5)))
    classify(store, 1)
    send_all(store)
    assert [job.revision for job in store.list_jobs(kind=JobKind.INFER)] == [2, 1]
    assert store.expire_instances(AFTER, AFTER) == []


def test_only_old_series_go(store: JobStore) -> None:
    deliver(store, 1)
    receive(store, 2, at=T0 + timedelta(hours=2))
    classify(store, 2)
    send_all(store)
    cutoff = T0 + timedelta(hours=1)
    assert {row.series_instance_uid for row in store.expire_instances(cutoff, AFTER)} == {
        series_uid(1)
    }
    assert removed(store, 2) == []


# late and repeated data after removal


def test_a_late_instance_after_removal_is_reported_from_the_files_still_there(
    store: JobStore,
) -> None:
    deliver(store, 1)
    store.expire_instances(AFTER, AFTER)
    late = AFTER + timedelta(hours=1)
    assert store.record_instance(instance(1, 3, at=late)).outcome is InstanceOutcome.NEW
    series = store.get_series(series_uid(1))
    assert series is not None and series.state is SeriesState.OPEN
    assert [row.instance_number for row in store.series_instances(series_uid(1))] == [3]
    (completed,) = store.complete_ready_series(late + timedelta(seconds=QUIET), QUIET)
    assert (completed.state, completed.revision) == (SeriesState.COMPLETE, 2)


def test_a_late_localizer_after_removal_skips_the_series_and_goes_too(store: JobStore) -> None:
    deliver(store, 1)
    store.expire_instances(AFTER, AFTER)
    late = AFTER + timedelta(hours=1)
    store.record_instance(instance(1, 3, at=late, classifiable=False))
    (skipped,) = store.complete_ready_series(late + timedelta(seconds=QUIET), QUIET)
    # Nothing is left to classify: no inference job that could only fail.
    assert (skipped.state, skipped.skip_reason) == (SeriesState.SKIPPED, CLASSIFIABLE_FILES_REMOVED)
    assert len(store.list_jobs(kind=JobKind.INFER)) == 1
    later = late + timedelta(days=1)
    assert [row.instance_number for row in store.expire_instances(later, later)] == [3]


def test_an_identical_copy_of_a_removed_instance_is_not_kept(store: JobStore) -> None:
    deliver(store, 1)
    store.expire_instances(AFTER, AFTER)
    copy = instance(1, 1, at=AFTER)
    recorded = store.record_instance(copy)
    # The receiver deletes the copy it wrote; the series stays delivered.
    assert (recorded.outcome, recorded.replaced_path) == (InstanceOutcome.IDENTICAL, copy.path)
    assert len(removed(store, 1)) == 2
    series = store.get_series(series_uid(1))
    assert series is not None and series.state is SeriesState.COMPLETE


def test_a_different_object_under_a_removed_instance_is_kept_and_reopens(store: JobStore) -> None:
    deliver(store, 1)
    store.expire_instances(AFTER, AFTER)
    original = instance(1, 1, sha256="c" * 64, at=AFTER)
    changed = dataclasses.replace(original, path=original.path + ".new")
    recorded = store.record_instance(changed)
    assert recorded.outcome is InstanceOutcome.CHANGED
    (kept,) = store.series_instances(series_uid(1))
    assert (kept.sha256, kept.path, kept.removed_at) == ("c" * 64, changed.path, None)
    series = store.get_series(series_uid(1))
    assert series is not None and series.state is SeriesState.OPEN


# many sweepers


def test_concurrent_sweeps_hand_each_instance_to_one(store: JobStore) -> None:
    for n in range(4):
        receive(store, n, count=5)
    store.complete_ready_series(AFTER, QUIET)
    while (job := store.claim(JobKind.INFER, "w1", 30)) is not None:
        reported(
            store, job.id, "w1", result_for(int(job.series_instance_uid.rsplit(".", 1)[1]), 1), []
        )

    def sweep(_: int) -> list[str]:
        taken = []
        while batch := store.expire_instances(AFTER, AFTER, limit=3):
            taken += [row.sop_instance_uid for row in batch]
        return taken

    taken = [uid for batch in in_threads(4, sweep) for uid in batch]
    assert len(taken) == len(set(taken)) == 20


# the schema


def test_the_migrations_keep_rows_stored_before_them(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        upgrade(engine, "0001")
        # A row as the first schema held it: without the columns later revisions add.
        old = dataclasses.asdict(instance(1, 1))
        del old["pixel_layout"]
        with engine.begin() as connection:
            connection.execute(
                insert(SeriesRow).values(
                    series_instance_uid=series_uid(1),
                    study_instance_uid=STUDY,
                    calling_ae="PACS",
                    state=SeriesState.OPEN,
                    revision=0,
                    instance_count=1,
                    classifiable_count=1,
                    first_received_at=T0,
                    last_received_at=T0,
                )
            )
            connection.execute(insert(InstanceRow).values(old))
    finally:
        engine.dispose()
    store = JobStore(database_url)
    try:
        store.upgrade()
        (row,) = store.series_instances(series_uid(1))
        assert row.sop_instance_uid == f"{series_uid(1)}.1"
        assert (row.removed_at, row.pixel_layout) == (None, None)  # 0002, 0003
    finally:
        store.close()


def test_keep_days_0_disables_retention_and_bad_values_are_refused() -> None:
    assert RetentionSettings().keep_days == 30 and RetentionSettings().enabled
    assert not RetentionSettings(keep_days=0).enabled
    for bad in ({"keep_days": -1}, {"sweep_seconds": 0}):
        with pytest.raises(ValidationError):
            RetentionSettings(**bad)


# deleting the files


def test_a_sweep_deletes_the_files_and_empty_folders_and_keeps_the_rest(
    store: JobStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = Storage(tmp_path / "var", fsync=False)

    def receive_files(series: int) -> None:
        for number in (1, 2):
            new = instance(series, number)
            storage.write(new.path, [b"DICM"])
            store.record_instance(new)

    receive_files(1)
    classify(store, 1)
    send_all(store)
    receive_files(2)  # same study, still open
    report = storage.write(result_for(1, 1).sr_path, [b"SR"])

    retention = Retention(store, storage, keep_days=0.5)
    assert retention.sweep(now=T0 + timedelta(hours=11)) == 0
    with caplog.at_level(logging.INFO, logger="pacs_node.retention"):
        assert retention.sweep(now=T0 + timedelta(hours=13)) == 2
    assert caplog.messages == ["retention deleted 2 instance file(s) of 1 delivered series"]

    instances = storage.absolute(f"instances/{STUDY}")
    assert not (instances / series_uid(1)).exists()
    assert len(list((instances / series_uid(2)).iterdir())) == 2
    assert storage.absolute(report.relative_path).exists()

    # The last series of the study goes: its folder and the study's go too.
    classify(store, 2)
    send_all(store)
    assert retention.sweep(now=T0 + timedelta(days=1)) == 2
    assert not instances.exists()
    assert storage.absolute("instances").is_dir()
    assert retention.sweep(now=T0 + timedelta(days=2)) == 0


def test_a_sweep_works_through_batches(store: JobStore, tmp_path: Path) -> None:
    storage = Storage(tmp_path / "var", fsync=False)
    for number in range(1, 8):
        new = instance(1, number)
        storage.write(new.path, [b"DICM"])
        store.record_instance(new)
    classify(store, 1, destinations=[])
    assert Retention(store, storage, keep_days=0.5, batch_size=3).sweep(now=AFTER) == 7
    assert len(removed(store, 1)) == 7
    assert not storage.absolute("instances").joinpath(STUDY).exists()


# end to end


def instance_files(node: NodeProcess, series: Sequence[Path] | None = None) -> list[Path]:
    """The node's received files, or those of the series of the files `series`."""
    pattern = f"*/{series_uid_of(series)}/*.dcm" if series else "*/*/*.dcm"
    return sorted((node.storage_root / "instances").glob(pattern))


def series_rows(node: NodeProcess, files: Sequence[Path]) -> list[Any]:
    """The instance rows of the series of `files`, removed ones included."""
    store = JobStore(f"sqlite:///{node.storage_root / 'pacs-node.sqlite3'}")
    try:
        return list(store.series_instances(series_uid_of(files), include_removed=True))
    finally:
        store.close()


# About 1.7 s: a real sweep every second sees the series first too young, then old.
RETENTION = {"PACS_NODE_RETENTION__KEEP_DAYS": "0.00002", "PACS_NODE_RETENTION__SWEEP_SECONDS": "1"}


def test_the_files_of_a_delivered_series_go_and_its_history_stays(
    tmp_path: Path, tiny_model: Path
) -> None:
    files = renamed_series(chest_ct(), tmp_path / "series", count=3)
    with (
        StoreSCP(tmp_path / "destination") as destination,
        NodeProcess(
            tmp_path / "node",
            tiny_model,
            destinations=[("DEST", destination.port)],
            settings=RETENTION,
        ) as node,
    ):
        assert storescu(node.port, "PACSNODE", files).returncode == 0
        wait_for(destination.received, 120, "the SR")
        instances = node.storage_root / "instances"
        wait_for(lambda: not any(instances.iterdir()), 60, "the files and their folders to go")
        assert [(job["kind"], job["status"]) for job in node.jobs()] == [
            ("send", "done"),
            ("report", "done"),
            ("infer", "done"),
        ]
        assert node.has_logged("retention deleted 3 instance file(s) of 1 delivered series")

        # The same series again: acknowledged, no file kept, nothing reported again.
        assert storescu(node.port, "PACSNODE", files).returncode == 0
        assert instance_files(node) == []
        assert len(node.jobs()) == 3
    rows = series_rows(node, files)
    assert len(rows) == 3 and all(row.removed_at is not None for row in rows)
    assert len(list((node.storage_root / "reports").rglob("*.dcm"))) == 1


def test_the_files_stay_while_the_sr_is_not_delivered(tmp_path: Path, tiny_model: Path) -> None:
    undelivered = renamed_series(chest_ct(), tmp_path / "first", count=3)
    delivered = renamed_series(chest_ct(), tmp_path / "second", count=3)
    destination = StoreSCP(tmp_path / "destination")  # not started: the PACS is down
    with NodeProcess(
        tmp_path / "node",
        tiny_model,
        destinations=[("DEST", destination.port)],
        settings={**RETENTION, "PACS_NODE_RESULTS__MAX_ATTEMPTS": "1"},
    ) as node:
        assert storescu(node.port, "PACSNODE", undelivered).returncode == 0
        (dead,) = wait_for(
            lambda: [job for job in node.jobs("send") if job["status"] == "dead"],
            120,
            "the send job to die",
        )
        with destination:
            # A later series is delivered and swept: the sweep that deletes its
            # files saw the older, undelivered series as well.
            assert storescu(node.port, "PACSNODE", delivered).returncode == 0
            wait_for(
                lambda: not instance_files(node, delivered),
                120,
                "the delivered series' files to go",
            )
            assert all(row.removed_at for row in series_rows(node, delivered))
            assert len(instance_files(node, undelivered)) == 3
            assert not any(row.removed_at for row in series_rows(node, undelivered))

            node.run("jobs", "retry", str(dead["id"]))
            wait_for(lambda: not instance_files(node), 60, "the retried series' files to go")
            assert len(destination.received()) == 2
