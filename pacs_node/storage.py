"""The storage root: received instances and written reports, made durable.

Layout under `root`: `instances/<study>/<series>/<sop>.dcm`, `reports/<study>/
<sop>.dcm`, and `incoming/` for files being written. A file is written to
`incoming/`, fsynced, renamed into place and its folder fsynced, so a crash
leaves either the whole file or none of it at its final path.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pacs_node.errors import BadInstanceError

READ_CHUNK_BYTES = 1 << 20
# PS3.5 9.1: components of digits without leading zeros, at most 64 characters.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def check_uid(value: str, name: str) -> str:
    """Return `value` if it is a valid UID; it then cannot escape a folder."""
    if len(value) > 64 or not _UID.match(value):
        raise BadInstanceError(f"{name} is not a valid UID")
    return value


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
        # Restrict new files and folders to the service user.
        self.root.chmod(0o700)

    def report_path(self, study_uid: str, sop_uid: str) -> str:
        check_uid(study_uid, "StudyInstanceUID")
        check_uid(sop_uid, "SOPInstanceUID")
        return f"reports/{study_uid}/{sop_uid}.dcm"

    def absolute(self, relative_path: str) -> Path:
        return self.root / relative_path

    def write_instance(
        self, study_uid: str, series_uid: str, sop_uid: str, chunks: Iterable[bytes | memoryview]
    ) -> WrittenFile:
        """Write a received instance durably under a name that includes its content hash.

        An identical re-send lands on the same name; a different object under
        the same SOP Instance UID gets a new name, so the acknowledged file stays
        intact until the store has committed the replacement.
        """
        folder = self._instance_folder(study_uid, series_uid)
        check_uid(sop_uid, "SOPInstanceUID")
        return self._write(lambda digest: f"{folder}/{sop_uid}.{digest[:16]}.dcm", chunks)

    def adopt_instance(
        self, study_uid: str, series_uid: str, sop_uid: str, source: Path
    ) -> WrittenFile:
        """Move a received file from incoming/ to its place, durably; see write_instance.

        The network layer streams large data sets straight to a file there, so
        they are never held whole in memory and never copied.
        """
        folder = self._instance_folder(study_uid, series_uid)
        check_uid(sop_uid, "SOPInstanceUID")
        digest = hashlib.sha256()
        size = 0
        with source.open("rb") as stream:
            while chunk := stream.read(READ_CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
            if self.fsync:
                os.fsync(stream.fileno())
        relative_path = f"{folder}/{sop_uid}.{digest.hexdigest()[:16]}.dcm"
        final = self.root / relative_path
        try:
            self._move(source, final)
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
            # The file was written on another volume: copy it, durably.
            with source.open("rb") as stream:
                return self.write_instance(
                    study_uid, series_uid, sop_uid, iter(lambda: stream.read(READ_CHUNK_BYTES), b"")
                )
        if self.fsync:
            _fsync_folder(final.parent)
        return WrittenFile(relative_path=relative_path, size=size, sha256=digest.hexdigest())

    def write(self, relative_path: str, chunks: Iterable[bytes | memoryview]) -> WrittenFile:
        """Write `chunks` durably at `relative_path`, replacing any older file."""
        return self._write(lambda digest: relative_path, chunks)

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

    def _write(
        self, name: Callable[[str], str], chunks: Iterable[bytes | memoryview]
    ) -> WrittenFile:
        """Write to incoming/, fsync, rename to `name(sha256)`, fsync its folder."""
        temporary = self.incoming / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        size = 0
        try:
            with temporary.open("wb") as stream:
                os.fchmod(stream.fileno(), 0o600)
                for chunk in chunks:
                    stream.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                stream.flush()
                if self.fsync:
                    os.fsync(stream.fileno())
            relative_path = name(digest.hexdigest())
            final = self.root / relative_path
            self._move(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        if self.fsync:
            _fsync_folder(final.parent)
        return WrittenFile(relative_path=relative_path, size=size, sha256=digest.hexdigest())

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


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
