"""A throwaway PostgreSQL server for the tests: one per session, a fresh database per test.

The server runs from the Debian binaries (/usr/lib/postgresql/<version>/bin)
on a free loopback port, with its socket and data in a temporary folder.
PostgreSQL refuses to run as root, so under root it runs as user `postgres`.
Without the binaries the PostgreSQL tests are skipped, except under CI
(`CI=true`), where a missing peer is a failure.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.peers import free_port, missing

SUPERUSER = "postgres"
START_ATTEMPTS = 3


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def create_database(self) -> str:
        """Create an empty database; its SQLAlchemy URL."""
        name = f"test_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(
            host=self.host, port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)


def _bin_dir() -> Path | None:
    on_path = shutil.which("pg_ctl")
    if on_path is not None:
        return Path(on_path).parent
    # Debian keeps the server binaries off PATH; prefer the newest version.
    found = [
        path
        for path in Path("/usr/lib/postgresql").glob("*/bin")
        if path.parent.name.isdigit() and (path / "pg_ctl").exists() and (path / "initdb").exists()
    ]
    return max(found, key=lambda path: int(path.parent.name), default=None)


class Cluster:
    def __init__(self, bin_dir: Path, folder: Path, as_postgres: bool, durable: bool) -> None:
        self.durable = durable
        self.bin_dir = bin_dir
        self.folder = folder
        self.data = folder / "data"
        self.prefix = ["runuser", "-u", SUPERUSER, "--"] if as_postgres else []

    def run(self, program: str, *args: str) -> None:
        command = [*self.prefix, str(self.bin_dir / program), *args]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)

    def init(self) -> None:
        try:
            self.run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
        except subprocess.CalledProcessError as exc:
            pytest.fail(f"initdb failed: {exc.stderr}")

    def start(self) -> int:
        """Start on a free port; the port."""
        errors = []
        for _ in range(START_ATTEMPTS):
            port = free_port()
            try:
                self.start_on(port)
            except subprocess.CalledProcessError as exc:
                # Another process may have taken the port in between; try another.
                errors.append(exc.stderr)
                continue
            return port
        pytest.fail(f"PostgreSQL did not start: {errors[-1]}\n{self.log_tail()}")

    def start_on(self, port: int) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={self.folder}"
        )
        if not self.durable:
            # A test cluster is thrown away anyway; but a crash then loses commits.
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        log = str(self.folder / "server.log")
        self.run(
            "pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "30", "start"
        )

    def stop(self) -> None:
        """Stop at once, as a crash or a power cut would."""
        self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def log_tail(self) -> str:
        log = self.folder / "server.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""


@contextmanager
def running_cluster(durable: bool = False) -> Iterator[tuple[Cluster, PostgresServer]]:
    """A PostgreSQL cluster of its own in a temporary folder, started on a free port.

    `durable`: committed transactions survive `stop()` (a crash), as in production;
    otherwise fsync and synchronous commit are off, for speed.
    """
    bin_dir = _bin_dir()
    if bin_dir is None:
        missing("PostgreSQL (pg_ctl and initdb on PATH or under /usr/lib/postgresql)")
        raise AssertionError  # unreachable: missing() raises
    as_postgres = os.geteuid() == 0
    try:
        account = pwd.getpwnam(SUPERUSER) if as_postgres else None
    except KeyError:
        missing(f"user {SUPERUSER!r} to run PostgreSQL as (it refuses to run as root)")
        raise AssertionError from None  # unreachable: missing() raises
    # Not pytest's tmp_path: its parents are private to root, the server user must reach it.
    folder = Path(tempfile.mkdtemp(prefix="pacs-node-pg-"))
    if account is not None:
        os.chown(folder, account.pw_uid, account.pw_gid)
    cluster = Cluster(bin_dir, folder, as_postgres, durable)
    try:
        cluster.init()
        port = cluster.start()
        yield cluster, PostgresServer(host="127.0.0.1", port=port)
        cluster.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with running_cluster() as (_, server):
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A SQLAlchemy URL of a new, empty database on the session's server."""
    return postgres_server.create_database()
