"""Shared fixtures. Peers and data helpers live in their own modules under tests/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dicom_data import tiny_artifact
from tests.postgres_server import postgres_server, postgres_url  # noqa: F401 (fixtures)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight artifact built with the same code as a trained one."""
    return tiny_artifact(tmp_path_factory.mktemp("model") / "test-model")
