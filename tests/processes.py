"""Real processes the end-to-end tests run: the node itself and DCMTK's storescp."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

from typing_extensions import Self

from tests.peers import REPO, dcmtk_environment, free_port, tool
from tests.polling import wait_for


class NodeProcess:
    """`pacs-node serve` in a subprocess, with its log lines collected."""

    def __init__(
        self,
        storage_root: Path,
        model: Path,
        *,
        destinations: Sequence[tuple[str, int]] = (),
        port: int | None = None,
        stages: str | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.storage_root = storage_root
        self.environment = {
            **os.environ,
            "PACS_NODE_DICOM__PORT": str(self.port),
            "PACS_NODE_DICOM__BIND": "127.0.0.1",
            "PACS_NODE_STORAGE__ROOT": str(storage_root),
            "PACS_NODE_INFERENCE__MODEL": str(model),
            "PACS_NODE_INFERENCE__DEVICE": "cpu",
            "PACS_NODE_SERIES__QUIET_SECONDS": "2",
            "PACS_NODE_QUEUE__POLL_SECONDS": "0.2",
            "PACS_NODE_RESULTS__RETRY_BASE_SECONDS": "0.5",
            "PACS_NODE_RESULTS__RETRY_MAX_SECONDS": "2",
            "PACS_NODE_RESULTS__DESTINATIONS": json.dumps(
                [{"ae_title": ae, "host": "127.0.0.1", "port": p} for ae, p in destinations]
            ),
            **(settings or {}),
        }
        self.stages = stages
        self.lines: list[str] = []
        self._process: subprocess.Popen[str] | None = None

    def command(self, *arguments: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pacs_node.cli",
            "--config",
            str(REPO / "config/node.toml"),
            *arguments,
        ]

    def start(self, timeout: float = 60.0) -> NodeProcess:
        # Only this run's lines count: after a restart the log holds earlier ones.
        first_line = len(self.lines)
        process = self.launch()
        try:
            wait_for(
                lambda: (
                    any(" ready: " in line for line in self.lines[first_line:]) or self._exited()
                ),
                timeout,
                "the node's ready line",
            )
        except AssertionError as error:
            self._process = None
            self._end_stuck(process, f"was not ready in {timeout:.0f} s", error)
        if self._exited():
            raise AssertionError(f"pacs-node exited with {process.returncode}:\n{self.log}")
        return self

    def launch(self) -> subprocess.Popen[str]:
        """Start `serve` without waiting for its ready line (`start` waits)."""
        arguments = ["serve"] + (["--stages", self.stages] if self.stages else [])
        process = self._process = subprocess.Popen(
            self.command(*arguments),
            env=self.environment,
            cwd=self.storage_root.parent,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._collect, args=(process,), daemon=True).start()
        return process

    def run(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Another `pacs-node` command with the same settings (jobs, classify, db)."""
        completed = subprocess.run(
            self.command(*arguments),
            env=self.environment,
            cwd=self.storage_root.parent,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and completed.returncode != 0:
            raise AssertionError(f"pacs-node {' '.join(arguments)} failed:\n{completed.stderr}")
        return completed

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self._process is None:
            return 0
        process, self._process = self._process, None
        process.send_signal(sig)
        try:
            return process.wait(timeout=60)
        except subprocess.TimeoutExpired as error:
            self._end_stuck(process, "did not stop in 60 s", error)

    def _end_stuck(self, process: subprocess.Popen[str], what: str, error: Exception) -> NoReturn:
        """Fail the test with where each of the node's processes waits (their stacks,
        in the log), but leave none of them behind."""
        stuck = [process.pid, *descendants(process.pid)]
        for pid in stuck:  # one at a time: stacks written at once interleave their lines
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
            time.sleep(0.5)
        for child in stuck[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        process.kill()
        process.wait()
        raise AssertionError(f"pacs-node {what}; its log:\n{self.log}") from error

    def jobs(self, kind: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """`pacs-node jobs list --json`, optionally for one kind and status."""
        arguments = ["jobs", "list", "--json", "--limit", "1000"]
        arguments += ["--kind", kind] if kind else []
        arguments += ["--status", status] if status else []
        return list(json.loads(self.run(*arguments).stdout))

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the node is not running")
        return self._process.pid

    def has_logged(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def _exited(self) -> bool:
        return self._process is not None and self._process.poll() is not None

    def _collect(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.lines.append(line.rstrip("\n"))

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self.stop()


class ServerProcess(ABC):
    """A peer server run for one test: started, used as a context manager, stopped."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def start(self) -> Self: ...

    def stop(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGTERM)
            self._process.wait(timeout=30)
            self._process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


class StoreSCP(ServerProcess):
    """DCMTK's storescp as a destination PACS, writing what it receives to a folder."""

    def __init__(self, folder: Path, ae_title: str = "DEST", unique_names: bool = False) -> None:
        self.folder = folder
        self.ae_title = ae_title
        # One file per receipt, so a repeated delivery of the same object shows.
        self.unique_names = unique_names
        self.port = free_port()
        super().__init__()

    @property
    def finished(self) -> Path:
        """A marker per file storescp has written whole (see `received`)."""
        return self.folder.with_name(f"{self.folder.name}.finished")

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.finished.mkdir(exist_ok=True)
        self._process = subprocess.Popen(
            [
                tool("storescp"),
                "--aetitle",
                self.ae_title,
                "--output-directory",
                str(self.folder),
                "--accept-all",
                *(["--unique-filenames"] if self.unique_names else []),
                # Run once a C-STORE has been processed, its file written and closed.
                "--exec-on-reception",
                f"touch '{self.finished}/#f'",
                str(self.port),
            ],
            env=dcmtk_environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: echo(self.port, self.ae_title), 20, "storescp to answer C-ECHO")
        return self

    def received(self) -> list[Path]:
        """The files storescp has finished writing. A file appears in the folder while it
        is being written; read then, it was once found without its header."""
        if not self.finished.is_dir():
            return []  # never started
        return sorted(self.folder / marker.name for marker in self.finished.iterdir())


def descendants(pid: int) -> list[int]:
    """The child processes of `pid`, their children, and so on."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found  # it ended since its parent listed it (a forked storescp's child)
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue  # a thread that ended (an association's) since the folder was listed
        for child in children:
            found += [int(child), *descendants(int(child))]
    return found


def export_child(parent: int) -> int | None:
    """The ONNX export process (`models.onnx_export`) under `parent`, if one runs."""
    found = _children_whose(parent, "cmdline", lambda text: b"models.onnx_export" in text)
    return found[0] if found else None


def spawned_children(parent: int) -> list[int]:
    """Processes under `parent` that run multiprocessing's spawned target (not its
    resource tracker): a `serve`'s stage processes, named or not yet."""
    return _children_whose(parent, "cmdline", lambda text: b"spawn_main" in text)


def stage_children(parent: int, stage: str) -> list[int]:
    """A `serve`'s child processes of one stage ("infer", "receive"), by the name
    each gives itself once it runs (`ps -o comm`)."""
    return _children_whose(parent, "comm", lambda text: text.strip() == f"pacs-{stage}".encode())


def _children_whose(parent: int, field: str, matches: Callable[[bytes], bool]) -> list[int]:
    """The processes under `parent` whose /proc file `field` matches."""
    found = []
    for child in descendants(parent):
        with contextlib.suppress(FileNotFoundError):  # ended since it was listed
            if matches(Path(f"/proc/{child}/{field}").read_bytes()):
                found.append(child)
    return found


def running(pid: int) -> bool:
    """Whether `pid` runs: neither gone nor a zombie that nobody has reaped yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def echo(port: int, ae_title: str) -> bool:
    completed = subprocess.run(
        [tool("echoscu"), "-aec", ae_title, "127.0.0.1", str(port)],
        env=dcmtk_environment(),
        capture_output=True,
        timeout=20,
    )
    return completed.returncode == 0


def storescu(
    port: int,
    called_ae: str,
    files: Sequence[Path],
    calling_ae: str = "STORESCU",
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Send `files` with DCMTK's storescu; returns its result (output at verbose level)."""
    return subprocess.run(
        [
            tool("storescu"),
            "-v",
            "-aet",
            calling_ae,
            "-aec",
            called_ae,
            *extra,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=dcmtk_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
