"""Shared fixtures. Peers and data helpers live in their own modules under tests/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pacs_node.store import JobStore
from tests.dicom_data import tiny_artifact
from tests.postgres_server import postgres_server, postgres_url  # noqa: F401 (fixtures)


@pytest.fixture(scope="session", autouse=True)
def _cache_of_this_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The user's cache stays as it was: the nodes the tests start export their test
    models (~9 MB each) into a cache of this run instead, shared by its tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight artifact built with the same code as a trained one."""
    return tiny_artifact(tmp_path_factory.mktemp("model") / "test-model")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty job store database: every test that takes it runs on both backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def store(database_url: str) -> Iterator[JobStore]:
    """A job store migrated to the newest schema."""
    store = JobStore(database_url)
    store.upgrade()
    yield store
    store.close()
