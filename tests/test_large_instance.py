"""A 100+ MB instance is streamed to disk, never held whole in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import EnhancedCTImageStorage, generate_uid

from tests.benchmarks.receivers import peak_rss_mb
from tests.peers import chest_ct
from tests.polling import wait_for
from tests.processes import NodeProcess, storescu

FRAMES = 260  # 260 x 512 x 512 x 2 bytes = 136 MB of pixel data


def enhanced_ct(path: Path) -> Path:
    """A multi-frame Enhanced CT instance of FRAMES copies of a real slice."""
    dataset = pydicom.dcmread(sorted(chest_ct().glob("*.dcm"))[0])
    frame = dataset.pixel_array
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.NumberOfFrames = FRAMES
    dataset.PixelData = np.repeat(frame[None], FRAMES, axis=0).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_a_136_mb_instance_is_stored_without_holding_it_in_memory(
    tmp_path: Path, tiny_model: Path
) -> None:
    big = enhanced_ct(tmp_path / "enhanced.dcm")
    assert big.stat().st_size > 130e6
    with NodeProcess(tmp_path / "node", tiny_model, stages="receive") as node:
        before = peak_rss_mb(node.pid)
        sent = storescu(node.port, "PACSNODE", [big])
        assert sent.returncode == 0, sent.stderr
        assert "Received Store Response (Success)" in sent.stdout + sent.stderr
        after = peak_rss_mb(node.pid)
        print(f"\npeak RSS of the receiving node: {before:.0f} MB before, {after:.0f} MB after")
        assert after - before < 40, f"peak RSS grew by {after - before:.0f} MB"
        stored = list((tmp_path / "node" / "instances").rglob("*.dcm"))
        wait_for(
            lambda: node.has_logged(f"SOP class {EnhancedCTImageStorage} is not classified"),
            10,
            "the log line saying why it is not classified",
        )
    (path,) = stored
    assert path.read_bytes().endswith(big.read_bytes()[-1_000_000:])
