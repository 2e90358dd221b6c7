"""Outside programs the tests use as real peers, and how to find them.

A missing peer skips the test on a developer's machine but fails it under
CI (`CI=true`): there, a missing peer means the test setup is broken.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CHEST_CT = SHARED_DATA / "chest-ct-30"


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing(what: str) -> None:
    """Skip, or fail under CI, because `what` is not available."""
    message = f"{what} is not available"
    if under_ci():
        pytest.fail(f"{message} (CI=true: peers must be installed by `make test`)")
    pytest.skip(message)


def tool(name: str) -> str:
    """The absolute path of an outside program.

    Never one from this Python environment: pynetdicom installs Python apps
    named storescu, storescp and echoscu there, which an activated venv would
    put ahead of DCMTK's on PATH.
    """
    environment_bin = Path(sys.prefix, "bin").resolve()
    outside = os.pathsep.join(
        folder
        for folder in os.environ.get("PATH", os.defpath).split(os.pathsep)
        if folder and Path(folder).resolve() != environment_bin
    )
    found = shutil.which(name, path=outside)
    if found is None:
        missing(f"program {name!r}")
        raise AssertionError  # unreachable: missing() raises
    return found


def dciodvfy(path: Path) -> list[str]:
    """dicom3tools' dciodvfy on `path`: its output lines, printed; fails the test on
    any line that says "Error" (its warnings are left to the caller)."""
    completed = subprocess.run(
        [tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False, timeout=60
    )
    lines = (completed.stdout + completed.stderr).splitlines()
    print(f"dciodvfy {path.name}:", *lines, sep="\n  ")
    errors = [line for line in lines if "Error" in line]
    assert not errors, "\n".join(errors)
    return lines


def chest_ct() -> Path:
    if not CHEST_CT.is_dir():
        missing(f"shared data folder {CHEST_CT}")
    return CHEST_CT


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def dcmtk_environment() -> dict[str, str]:
    """DCMTK stalls ~40 ms per image without TCP_NODELAY."""
    return {**os.environ, "TCP_NODELAY": "1"}
