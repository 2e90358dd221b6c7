"""The receiver in-process, over real loopback associations from pynetdicom."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from models.pixel_layout import JPEG_LOSSLESS, NATIVE
from models.preprocessing import PixelLayout, Preprocessing, input_from_dataset, input_from_layout
from pacs_node.config import DicomSettings, IntakeSettings
from pacs_node.receiver import Receiver
from pacs_node.storage import Storage
from pacs_node.store import JobStore
from tests.dicom_data import made_jpeg_lossless, renamed_series
from tests.peers import chest_ct, free_port
from tests.polling import wait_for
from tests.scu import associate, store_statuses


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Receiver, JobStore, Storage]]:
    storage = Storage(tmp_path / "var")
    store = JobStore(f"sqlite:///{tmp_path / 'var' / 'db.sqlite3'}")
    store.upgrade()
    receiver = Receiver(
        DicomSettings(port=free_port(), bind="127.0.0.1"), IntakeSettings(), storage, store
    )
    receiver.start()
    yield receiver, store, storage
    receiver.stop()
    store.close()


def stored_files(storage: Storage) -> list[Path]:
    return sorted((storage.root / "instances").rglob("*.dcm"))


def test_a_different_object_under_the_same_uid_replaces_the_old_one(
    tmp_path: Path, node: tuple[Receiver, JobStore, Storage], caplog: pytest.LogCaptureFixture
) -> None:
    receiver, store, storage = node
    (path,) = renamed_series(chest_ct(), tmp_path / "series", count=1)
    original = pydicom.dcmread(path)
    changed = pydicom.dcmread(path)
    changed.WindowCenter = 123  # same SOP Instance UID, different object

    assert store_statuses(receiver.port, original) == [0x0000]
    (first_file,) = stored_files(storage)
    first_bytes = first_file.read_bytes()
    assert store_statuses(receiver.port, original) == [0x0000]
    assert stored_files(storage) == [first_file]
    assert first_file.read_bytes() == first_bytes

    with caplog.at_level(logging.WARNING, logger="pacs_node.receiver"):
        assert store_statuses(receiver.port, changed) == [0x0000]
    (second_file,) = stored_files(storage)
    assert second_file != first_file
    assert pydicom.dcmread(second_file).WindowCenter == 123
    (row,) = store.series_instances(str(original.SeriesInstanceUID))
    assert storage.absolute(row.path) == second_file
    assert "replaced by a different object" in caplog.text


def test_stored_bytes_are_exactly_what_was_sent(
    tmp_path: Path, node: tuple[Receiver, JobStore, Storage]
) -> None:
    receiver, store, storage = node
    files = renamed_series(chest_ct(), tmp_path / "series", count=3)
    assert store_statuses(receiver.port, *(pydicom.dcmread(path) for path in files)) == [0] * 3
    for path in files:
        sent = pydicom.dcmread(path)
        (row,) = [
            row
            for row in store.series_instances(str(sent.SeriesInstanceUID))
            if row.sop_instance_uid == sent.SOPInstanceUID
        ]
        received = storage.absolute(row.path).read_bytes()
        # The data set is byte-identical to the sender's (after its own file meta).
        sent_bytes = path.read_bytes()
        data_set_offset = 132 + 12 + int.from_bytes(sent_bytes[140:144], "little")
        assert received.endswith(sent_bytes[data_set_offset:])


def test_each_association_has_its_next_file_made_ahead_and_removed_when_it_closes(
    tmp_path: Path, node: tuple[Receiver, JobStore, Storage]
) -> None:
    receiver, store, storage = node
    first, second = (
        pydicom.dcmread(path) for path in renamed_series(chest_ct(), tmp_path / "s", count=2)
    )
    association = associate(receiver.port, first)
    try:
        assert int(association.send_c_store(first).Status) == 0
        (ahead,) = wait_for(
            lambda: list(storage.incoming.iterdir()), 10, "the file made ahead in incoming/"
        )
        made_ahead = ahead.stat()
        assert made_ahead.st_size == 0
        assert int(association.send_c_store(second).Status) == 0
        # The second data set went into the file made ahead; a new one waits.
        (row,) = [
            row
            for row in store.series_instances(str(second.SeriesInstanceUID))
            if row.sop_instance_uid == second.SOPInstanceUID
        ]
        assert storage.absolute(row.path).stat().st_ino == made_ahead.st_ino
    finally:
        association.release()
    wait_for(lambda: not list(storage.incoming.iterdir()), 10, "incoming/ empty after the release")


def test_the_row_keeps_where_a_slices_words_lie_in_place_or_as_a_jpeg_lossless_frame(
    tmp_path: Path, node: tuple[Receiver, JobStore, Storage]
) -> None:
    receiver, store, storage = node
    plain, jpeg, rle = (
        pydicom.dcmread(path) for path in renamed_series(chest_ct(), tmp_path / "s", count=3)
    )
    made_jpeg_lossless(jpeg, fragments=2)
    rle.compress(RLELossless, rle.pixel_array)
    assert store_statuses(receiver.port, plain, jpeg, rle) == [0, 0, 0]
    rows = {row.sop_instance_uid: row for row in store.series_instances(plain.SeriesInstanceUID)}
    assert rows[rle.SOPInstanceUID].pixel_layout is None  # the infer stage parses it
    preprocessing = Preprocessing(window_center=70, window_width=30, input_size=160)
    for dataset, encoding in ((plain, NATIVE), (jpeg, JPEG_LOSSLESS)):
        text = rows[dataset.SOPInstanceUID].pixel_layout
        assert text is not None
        layout = PixelLayout.from_text(text)
        assert layout.encoding == encoding
        path = storage.absolute(rows[dataset.SOPInstanceUID].path)
        expected = input_from_dataset(pydicom.dcmread(path), preprocessing)
        assert np.array_equal(input_from_layout(path, layout, preprocessing), expected)


def test_a_file_that_cannot_be_synced_is_refused_and_removed(
    tmp_path: Path, node: tuple[Receiver, JobStore, Storage], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, store, storage = node
    (path,) = renamed_series(chest_ct(), tmp_path / "series", count=1)
    dataset = pydicom.dcmread(path)
    synced_on: list[str] = []
    real_fsync = os.fsync

    def failing_for_files(descriptor: int) -> None:
        if stat.S_ISREG(os.fstat(descriptor).st_mode):
            synced_on.append(threading.current_thread().name)
            raise OSError(errno.EIO, "I/O error")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", failing_for_files)
    assert store_statuses(receiver.port, dataset) == [0xA700]
    # The association's own thread syncs: no helper thread must be woken to start it.
    assert synced_on and not synced_on[0].startswith(("fsync", "header"))
    assert stored_files(storage) == []
    assert list(storage.incoming.iterdir()) == []
    assert store.series_instances(str(dataset.SeriesInstanceUID)) == []
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert store_statuses(receiver.port, dataset) == [0x0000]
    assert len(stored_files(storage)) == 1
