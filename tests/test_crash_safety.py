"""The crash harness, short: 8 SIGKILLs while series arrive (soak: tests/crash_harness.py)."""

from __future__ import annotations

from pathlib import Path

from tests.crash_harness import run
from tests.peers import chest_ct, tool


def test_kills_lose_nothing_and_report_each_series_once(tmp_path: Path) -> None:
    chest_ct()
    tool("storescp")
    figures = run(tmp_path, kills=8)
    print("\n" + figures.table())
    assert figures.acknowledged > 0 and figures.srs_expected > 0
    assert figures.lost == 0
    assert figures.srs_missing == 0
    assert figures.srs_duplicated == 0
