"""Durable writes and the storage layout."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacs_node.errors import BadInstanceError
from pacs_node.storage import Storage, check_uid


def test_a_received_instance_is_placed_privately_under_the_hash_of_what_follows_its_header(
    tmp_path: Path,
) -> None:
    storage = Storage(tmp_path / "root")
    incoming = storage.incoming_file(header=b"META")
    incoming.write(b"abc")
    incoming.write(memoryview(b"def"))
    written = storage.adopt_instance("1.2.3", "1.2.3.4", "1.2.3.4.5", incoming.finish()).wait()
    digest = hashlib.sha256(b"abcdef").hexdigest()
    assert written.relative_path == f"instances/1.2.3/1.2.3.4/1.2.3.4.5.{digest[:16]}.dcm"
    path = storage.absolute(written.relative_path)
    assert path.read_bytes() == b"METAabcdef"
    assert written.size == 10
    assert written.sha256 == digest
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(storage.root.stat().st_mode) == 0o700
    assert not list(storage.incoming.iterdir())


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "root")
    relative = "instances/1.2/1.2.3/1.2.3.4.dcm"

    def chunks() -> Iterator[bytes]:
        yield b"partial"
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        storage.write(relative, chunks())
    assert not storage.absolute(relative).exists()
    assert not list(storage.incoming.iterdir())


def test_only_stale_partial_files_are_discarded(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "root")
    stale = storage.incoming / "dead.part"
    stale.write_bytes(b"x")
    old = time.time() - 600
    os.utime(stale, (old, old))
    # A file another process is writing right now must survive.
    live = storage.incoming / "live.part"
    live.write_bytes(b"y")
    assert storage.discard_incoming(older_than_seconds=300) == 1
    assert list(storage.incoming.iterdir()) == [live]


@pytest.mark.parametrize(
    "uid",
    ["", "../../etc/passwd", "1.2.3/4", "1.02.3", "1..2", "1.2.", "a.b", "1." + "2" * 64, "1.2 "],
)
def test_invalid_uids_cannot_name_a_file(uid: str) -> None:
    with pytest.raises(BadInstanceError, match="not a valid UID"):
        check_uid(uid, "SOPInstanceUID")


def test_valid_uids_pass() -> None:
    assert check_uid("1.2.840.10008.5.1.4.1.1.2", "SOPClassUID") == "1.2.840.10008.5.1.4.1.1.2"
    assert check_uid("0.1.0", "X") == "0.1.0"


def test_with_fsync_off_nothing_is_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    storage = Storage(tmp_path / "root", fsync=False)
    incoming = storage.incoming_file(header=b"META")
    incoming.write(b"abc")
    written = storage.adopt_instance("1.2.3", "1.2.3.4", "1.2.3.4.5", incoming.finish()).wait()
    storage.write("reports/1.2.3/1.2.3.9.dcm", [b"report"])
    assert storage.absolute(written.relative_path).read_bytes() == b"METAabc"
    assert synced == []
