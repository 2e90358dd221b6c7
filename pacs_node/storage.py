"""The storage root: received instances and written reports, made durable.

Layout under `root`: `instances/<study>/<series>/<sop>.dcm`, `reports/<study>/
<sop>.dcm`, and `incoming/` for files being written. A file is written to
`incoming/`, fsynced, renamed into place and its folder fsynced, so a crash
leaves either the whole file or none of it at its final path.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from pacs_node.errors import BadInstanceError

# PS3.5 9.1: components of digits without leading zeros, at most 64 characters.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def check_uid(value: str, name: str) -> str:
    """Return `value` if it is a valid UID; it then cannot escape a folder."""
    if len(value) > 64 or not _UID.match(value):
        raise BadInstanceError(f"{name} is not a valid UID")
    return value


T = TypeVar("T")


@dataclass(frozen=True)
class Syncing(Generic[T]):
    """`value` is usable now (a row can be recorded); `wait()` returns it once its
    fsync has finished. Lets the receiver commit a row while a folder syncs,
    instead of one after the other."""

    value: T
    synced: Future[None]

    def wait(self) -> T:
        self.synced.result()
        return self.value


@dataclass(frozen=True)
class ReceivedFile:
    """A complete, synced file in incoming/, and the SHA-256 of its content."""

    path: Path
    size: int
    sha256: str


class IncomingFile:
    """A file being written to incoming/, hashed on the way, synced when finished.

    The hash covers what is written after `header`: for a received instance the
    header is the File Meta Information the node puts in front of the data set,
    so the hash identifies the object as the peer sent it, whichever version of
    the node wrote the header.
    """

    def __init__(self, folder: Path, fsync: bool) -> None:
        self.path = folder / f"{uuid.uuid4().hex}.part"
        self._fsync = fsync
        self._digest = hashlib.sha256()
        self._size = 0
        # Unbuffered: the network layer hands over large chunks, written as they are.
        self._stream = io.FileIO(self.path, "xb", opener=_private)

    @property
    def size(self) -> int:
        """Bytes written so far, the header included; all of them are in the file."""
        return self._size

    def start(self, header: bytes) -> IncomingFile:
        """Write `header`, which the hash does not cover, first; returns the file."""
        try:
            self._write_all(header)
        except BaseException:
            self.discard()
            raise
        return self

    def write(self, data: bytes | memoryview) -> None:
        self._write_all(data)
        self._digest.update(data)

    def finish(self) -> ReceivedFile:
        """The file is complete: sync (unless storage.fsync = false) and close it.

        On the caller's thread: fsync lets go of the GIL, so another thread can
        work on the file meanwhile (the receiver reads its header), and no thread
        has to be woken to begin the sync. On failure the file is removed.
        """
        try:
            if self._fsync:
                os.fsync(self._stream.fileno())
        except BaseException:
            self.discard()
            raise
        self._stream.close()
        return ReceivedFile(self.path, self._size, self._digest.hexdigest())

    def discard(self) -> None:
        """Close and remove the file (a refused or interrupted transfer)."""
        self._stream.close()
        self.path.unlink(missing_ok=True)

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = self._stream.write(view)
            view = view[written:]
        self._size += len(data)


@dataclass(frozen=True)
class WrittenFile:
    relative_path: str
    size: int
    sha256: str


class Storage:
    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root.resolve()
        self.fsync = fsync
        self.incoming = self.root / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        # Folders are synced here while the receiver commits the row (fsync releases
        # the GIL); a handful of threads serve all the associations.
        self._syncs = ThreadPoolExecutor(8, thread_name_prefix="fsync") if fsync else None
        self._creator = ThreadPoolExecutor(2, thread_name_prefix="incoming")
        # Restrict new files and folders to the service user.
        self.root.chmod(0o700)

    def report_path(self, study_uid: str, sop_uid: str) -> str:
        check_uid(study_uid, "StudyInstanceUID")
        check_uid(sop_uid, "SOPInstanceUID")
        return f"reports/{study_uid}/{sop_uid}.dcm"

    def absolute(self, relative_path: str) -> Path:
        return self.root / relative_path

    def incoming_file(self, header: bytes = b"") -> IncomingFile:
        """A new file in incoming/ that starts with `header`; see IncomingFile."""
        return IncomingFile(self.incoming, self.fsync).start(header)

    def incoming_file_ahead(self) -> Future[IncomingFile]:
        """An empty file in incoming/, created in the background; `start` it when needed.

        Creating a file took about 0.4 ms per instance while receiving (0.02 ms on an
        idle disk), so an association has its next file made while it stores the
        current one. On the benchmark VM's ext4, which has no journal, a new inode
        skips those deleted in the last minutes, reading their table blocks: `perf`
        put ~15% of the receiving process's CPU samples there, all in this thread.
        """
        return self._creator.submit(IncomingFile, self.incoming, self.fsync)

    def adopt_instance(
        self, study_uid: str, series_uid: str, sop_uid: str, received: ReceivedFile
    ) -> Syncing[WrittenFile]:
        """Move a synced received instance to a name that includes its content hash.

        An identical re-send lands on the same name; a different object under
        the same SOP Instance UID gets a new name, so the acknowledged file stays
        intact until the store has committed the replacement.
        """
        folder = self._instance_folder(study_uid, series_uid)
        check_uid(sop_uid, "SOPInstanceUID")
        return self._place(received, f"{folder}/{sop_uid}.{received.sha256[:16]}.dcm")

    def write(self, relative_path: str, chunks: Iterable[bytes | memoryview]) -> WrittenFile:
        """Write `chunks` durably at `relative_path`, replacing any older file."""
        incoming = self.incoming_file()
        try:
            for chunk in chunks:
                incoming.write(chunk)
        except BaseException:
            incoming.discard()
            raise
        return self._place(incoming.finish(), relative_path).wait()

    def _instance_folder(self, study_uid: str, series_uid: str) -> str:
        return (
            f"instances/{check_uid(study_uid, 'StudyInstanceUID')}/"
            f"{check_uid(series_uid, 'SeriesInstanceUID')}"
        )

    def remove(self, relative_path: str) -> None:
        """Delete a file no row refers to any more (a replaced instance)."""
        (self.root / relative_path).unlink(missing_ok=True)

    def remove_empty_folders(self, relative_folder: str) -> None:
        """Remove `relative_folder`, then its parents, while they are empty.

        Stops below the top-level folder (`instances/`), and at the first folder
        that is not empty: a receiver may be writing into it right now.
        """
        parts = Path(relative_folder).parts
        for depth in range(len(parts), 1, -1):
            try:
                self.root.joinpath(*parts[:depth]).rmdir()
            except FileNotFoundError:
                continue  # another sweeper was first
            except OSError:
                return

    def _move(self, source: Path, final: Path) -> None:
        """Rename `source` to `final`, creating the folders it needs."""
        try:
            self._make_folders(final.parent)
            source.replace(final)
        except FileNotFoundError:
            if not source.exists():
                raise
            # Retention removed the folder, empty until now, in between: once more.
            self._make_folders(final.parent)
            source.replace(final)

    def _place(self, received: ReceivedFile, relative_path: str) -> Syncing[WrittenFile]:
        """Rename a synced incoming file to `relative_path`; its folder syncs in the background."""
        final = self.root / relative_path
        try:
            self._move(received.path, final)
        except BaseException:
            received.path.unlink(missing_ok=True)
            raise
        written = WrittenFile(relative_path, received.size, received.sha256)
        if self._syncs is None:
            return Syncing(written, _done())
        return Syncing(written, self._syncs.submit(_fsync_folder, final.parent))

    def _make_folders(self, folder: Path) -> None:
        """Create `folder` and its missing parents, syncing each new entry."""
        if folder.is_dir():
            return
        self._make_folders(folder.parent)
        folder.mkdir(mode=0o700, exist_ok=True)
        if self.fsync:
            _fsync_folder(folder.parent)

    def discard_incoming(self, older_than_seconds: float) -> int:
        """Remove partial files (a crash, an aborted transfer); returns how many.

        Only files untouched for a while: this and other processes sharing the
        storage root (scale-out) may be writing theirs right now.
        """
        cutoff = time.time() - older_than_seconds
        removed = 0
        for path in self.incoming.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # its writer finished (renamed) or gave up meanwhile
        return removed


def _done() -> Future[None]:
    """A finished future: what `Syncing` holds when nothing is synced (no fsync)."""
    done: Future[None] = Future()
    done.set_result(None)
    return done


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
