"""What the infer stage keeps of a series while it classifies it."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from models.onnx_network import OnnxNetwork
from models.predictor import SlicePredictor
from models.preprocessing import Preprocessing, input_from_dataset
from pacs_node import cores, inference
from pacs_node.config import BUNDLED_MODEL, InferenceSettings, Settings
from pacs_node.cores import forward_threads
from pacs_node.errors import ConfigurationError
from pacs_node.inference import (
    REFERENCE_KEYWORDS,
    SeriesClassifier,
    decode_thread_count,
    forward_lane_count,
    load_classifier,
)
from pacs_node.report import ReportingNode, build_report
from tests.dicom_data import renamed_series, stored_slice, tiny_artifact
from tests.peers import REPO, chest_ct


def test_no_header_is_kept_whole_and_the_report_copies_the_first_from_its_file(
    tmp_path: Path, tiny_model: Path
) -> None:
    files = renamed_series(chest_ct(), tmp_path / "series", count=3)
    classifier = SeriesClassifier(SlicePredictor(tiny_model, "cpu"), batch_size=2)
    classification = classifier.classify(files)
    # Memory must not grow with the series by a whole header per slice.
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    references = sorted(first[keyword].tag for keyword in REFERENCE_KEYWORDS)
    assert [sorted(header.keys()) for header in classification.headers] == [references] * 3
    assert classification.first_path == files[0]
    report = build_report(
        sources=classification.sources_for_report(),
        result=classification.result,
        manifest=classifier.predictor.manifest,
        revision=1,
        node=ReportingNode(ae_title="TEST"),
    )
    assert (report.PatientID, report.PatientName) == (first.PatientID, first.PatientName)
    (study,) = report.CurrentRequestedProcedureEvidenceSequence
    (series,) = study.ReferencedSeriesSequence
    assert [item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence] == [
        str(header.SOPInstanceUID) for header in classification.headers
    ]


def test_while_a_series_is_classified_no_garbage_is_collected(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = renamed_series(chest_ct(), tmp_path / "series", count=3)
    classifier = SeriesClassifier(SlicePredictor(tiny_model, "cpu"), batch_size=2)
    seen = []

    def recorded(dataset: Dataset, preprocessing: Preprocessing) -> np.ndarray:
        seen.append(gc.isenabled())  # in a decode thread
        return input_from_dataset(dataset, preprocessing)

    monkeypatch.setattr(inference, "input_from_dataset", recorded)
    classifier.classify(files)
    assert seen == [False] * 3
    assert gc.isenabled()


@pytest.mark.parametrize(
    ("setting", "device", "cores", "threads"),
    [
        ("auto", "cpu", 1, 2),
        ("auto", "cpu", 2, 2),
        ("auto", "cpu", 16, 4),
        ("auto", "cpu", 64, 4),
        ("auto", "cuda", 2, 2),
        ("auto", "cuda", 16, 8),
        ("auto", "cuda", 64, 8),
        (3, "cuda", 16, 3),
    ],
)
def test_auto_decode_threads_follow_the_device_and_the_cores(
    setting: int | Literal["auto"], device: str, cores: int, threads: int
) -> None:
    assert decode_thread_count(setting, device, cores) == threads


def test_the_default_decode_threads_are_chosen_for_this_machine(tiny_model: Path) -> None:
    settings = Settings(inference=InferenceSettings(model=tiny_model, device="cpu"))
    assert settings.inference.decode_threads == "auto"
    classifier = load_classifier(settings)
    assert classifier.decode_threads == decode_thread_count("auto", "cpu")


@pytest.mark.parametrize(
    ("setting", "device", "threads", "lanes"),
    [
        ("auto", "cpu", 1, 1),
        ("auto", "cpu", 2, 2),
        ("auto", "cpu", 16, 2),
        (3, "cpu", 2, 3),
        ("auto", "cuda", 16, 1),
        (3, "cuda", 16, 1),
    ],
)
def test_auto_forward_lanes_follow_the_device_and_the_threads(
    setting: int | Literal["auto"], device: str, threads: int, lanes: int
) -> None:
    assert forward_lane_count(setting, device, threads) == lanes


def test_the_default_forward_lanes_share_this_machines_threads(tiny_model: Path) -> None:
    settings = Settings(inference=InferenceSettings(model=tiny_model, device="cpu"))
    assert settings.inference.forward_lanes == "auto"
    predictor = load_classifier(settings).predictor
    lanes = forward_lane_count("auto", "cpu")
    assert predictor.lanes == lanes
    assert _session_threads(predictor) == [max(1, forward_threads() // lanes)] * lanes


def test_a_node_limited_to_one_thread_keeps_one_lane_of_one_thread(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(inference=InferenceSettings(model=tiny_model, device="cpu"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    predictor = load_classifier(settings).predictor
    assert predictor.lanes == 1
    assert _session_threads(predictor) == [1]


def _host_cores(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """As if this process could use `count` cores (`usable_cores`), each a physical one."""
    monkeypatch.setattr(inference, "usable_cores", lambda: count)
    monkeypatch.setattr(cores, "usable_cores", lambda: count)
    monkeypatch.setattr(cores, "physical_cores", lambda cpus, topology: count)


def test_an_infer_process_takes_its_share_of_the_threads_and_the_cores(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(inference=InferenceSettings(model=tiny_model, device="cpu"))
    _host_cores(monkeypatch, 16)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    classifier = load_classifier(settings, processes=2)
    assert classifier.predictor.lanes == 2
    assert _session_threads(classifier.predictor) == [1, 1]
    # A quarter of its 8 cores, where the whole host's 16 would give 4.
    assert classifier.decode_threads == 2


@pytest.mark.parametrize(("usable", "threads"), [(3, [1, 1]), (16, [8, 8])])
def test_the_forward_passes_follow_the_usable_cores_a_cpu_quota_included(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, usable: int, threads: list[int]
) -> None:
    settings = Settings(inference=InferenceSettings(model=tiny_model, device="cpu"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    _host_cores(monkeypatch, usable)
    assert _session_threads(load_classifier(settings).predictor) == threads


def _session_threads(predictor: SlicePredictor) -> list[int]:
    """The ONNX Runtime threads of each of the predictor's sessions, one per lane."""
    assert isinstance(predictor.network, OnnxNetwork)
    return [
        session.get_session_options().intra_op_num_threads for session in predictor.network.sessions
    ]


def _classifier_with_lanes(model: Path, lanes: int, batch_size: int) -> SeriesClassifier:
    return load_classifier(
        Settings(
            inference=InferenceSettings(
                model=model, device="cpu", batch_size=batch_size, forward_lanes=lanes
            )
        )
    )


def test_forward_lanes_run_that_many_batches_at_once(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = renamed_series(chest_ct(), tmp_path / "series", count=4)
    predictor = _classifier_with_lanes(tiny_model, lanes=2, batch_size=2).predictor
    network = predictor.network
    # Each forward pass waits until the other is under way: one at a time would time out.
    both_running = threading.Barrier(2, timeout=10)

    def together(batch: np.ndarray) -> np.ndarray:
        both_running.wait()
        return network(batch)

    monkeypatch.setattr(predictor, "network", together)
    classification = SeriesClassifier(predictor, batch_size=2).classify(files)
    assert len(classification.slices) == 4


def test_lanes_give_back_each_slice_its_own_probabilities_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = renamed_series(chest_ct(), tmp_path / "series", count=6)
    # The bundled model: a tiny untrained one gives every slice nearly the same numbers.
    expected = _classifier_with_lanes(BUNDLED_MODEL, lanes=1, batch_size=2).classify(files)
    first, second = (expected.slices[index]["probabilities"] for index in (0, 2))
    assert first != pytest.approx(second, abs=1e-3)  # a mix-up of batches would show
    classifier = _classifier_with_lanes(BUNDLED_MODEL, lanes=2, batch_size=2)
    network = classifier.predictor.network
    calls = 0

    def first_finishes_last(batch: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 1:
            time.sleep(0.5)  # the second batch, on the other lane, finishes first
        return network(batch)

    monkeypatch.setattr(classifier.predictor, "network", first_finishes_last)
    classification = classifier.classify(files)
    assert [entry["sop_instance_uid"] for entry in classification.slices] == [
        entry["sop_instance_uid"] for entry in expected.slices
    ]
    for entry, reference in zip(classification.slices, expected.slices, strict=True):
        assert entry["probabilities"] == pytest.approx(reference["probabilities"], abs=1e-6)
    assert classification.result.evidence == expected.result.evidence
    assert classification.result.label == expected.result.label


@pytest.mark.parametrize("threads", [2, 3])
def test_inference_decode_threads_decode_that_many_slices_at_once(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    files = renamed_series(chest_ct(), tmp_path / "series", count=threads)
    settings = Settings(
        inference=InferenceSettings(
            model=tiny_model, device="cpu", batch_size=threads, decode_threads=threads
        )
    )
    classifier = load_classifier(settings)
    # Each decode waits until `threads` decodes are under way: fewer threads would time out.
    all_decoding = threading.Barrier(threads, timeout=10)

    def together(dataset: Dataset, preprocessing: Preprocessing) -> np.ndarray:
        all_decoding.wait()
        return input_from_dataset(dataset, preprocessing)

    monkeypatch.setattr(inference, "input_from_dataset", together)
    classification = classifier.classify(files)
    assert classification.skipped == []
    assert len(classification.slices) == threads


def test_slices_read_through_their_layouts_classify_as_their_files_do(
    tmp_path: Path, tiny_model: Path
) -> None:
    files = renamed_series(chest_ct(), tmp_path / "series", count=3)
    classifier = SeriesClassifier(SlicePredictor(tiny_model, "cpu"), batch_size=2)
    by_file = classifier.classify(files)
    stored = [stored_slice(path) for path in files]
    by_layout = classifier.classify(stored)
    assert by_layout.slices == by_file.slices  # the same probabilities, exactly
    assert by_layout.result == by_file.result
    assert by_layout.headers == by_file.headers
    assert by_layout.first_path == by_file.first_path == files[0]
    # The headers the rows gave, not copies made between forward passes; no file is
    # parsed for them.
    assert all(
        header is item.reference for header, item in zip(by_layout.headers, stored, strict=True)
    )


def test_a_slice_whose_file_was_cut_short_after_it_was_stored_is_skipped(
    tmp_path: Path, tiny_model: Path
) -> None:
    files = renamed_series(chest_ct(), tmp_path / "series", count=3)
    slices = [stored_slice(path) for path in files]
    files[1].write_bytes(files[1].read_bytes()[:-100])
    classifier = SeriesClassifier(SlicePredictor(tiny_model, "cpu"), batch_size=2)
    classification = classifier.classify(slices)
    ((name, reason),) = classification.skipped
    assert name == files[1].name and "ends before its 262144 stored words" in reason
    assert len(classification.slices) == 2


def test_a_model_whose_reports_would_be_invalid_is_refused_when_the_node_loads_it(
    tmp_path: Path,
) -> None:
    no_scheme_no_meaning = {"benign": {"value": "1"}}
    tiny_artifact(tmp_path / "model", details={"class_codes": no_scheme_no_meaning})
    settings = Settings(inference=InferenceSettings(model=tmp_path / "model", device="cpu"))
    with pytest.raises(ConfigurationError, match=r"no valid report.*class_codes.*benign"):
        load_classifier(settings)


def _classified_and_reported_in_a_fresh_process(
    model: Path, slices: int, before_report: str, after_report: str
) -> str:
    """The last line a fresh Python process prints after it loads `model` on the CPU,
    classifies the first `slices` real slices, runs `before_report`, builds their
    SR and runs `after_report` (top-level statements)."""
    script = f"""
from pathlib import Path
from pacs_node.config import InferenceSettings, Settings
from pacs_node.inference import load_classifier
from pacs_node.report import ReportingNode, build_report
from tests.peers import chest_ct
classifier = load_classifier(
    Settings(inference=InferenceSettings(model=Path({str(model)!r}), device="cpu"))
)
classification = classifier.classify(sorted(chest_ct().glob("*.dcm"))[:{slices}])
{before_report}
build_report(
    sources=classification.sources_for_report(),
    result=classification.result,
    manifest=classifier.predictor.manifest,
    revision=1,
    node=ReportingNode(ae_title="TEST"),
)
{after_report}
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()[-1]


def test_the_infer_stage_on_a_cpu_never_imports_torch(tiny_model: Path) -> None:
    """A `serve`'s infer process (what it imports, the model it loads, a series it
    classifies and reports) holds no torch: ~670 MB it does not need on a CPU."""
    last = _classified_and_reported_in_a_fresh_process(
        tiny_model,
        slices=3,
        before_report="import pacs_node.classify, pacs_node.service, pacs_node.stage_process,"
        " pacs_node.worker",
        after_report="import sys\n"
        "print(sorted({name.split('.')[0] for name in sys.modules}"
        " & {'torch', 'torchvision', 'onnx'}))",
    )
    assert last == "[]"


def test_highdicom_tables_are_loaded_and_frozen_with_the_model(tiny_model: Path) -> None:
    """The first report reads highdicom's tables of the standard (~200 000 objects);
    loaded after the freeze, every full garbage collection would scan them."""
    last = _classified_and_reported_in_a_fresh_process(
        tiny_model,
        slices=2,
        before_report="import gc\ngc.collect()\nbefore = len(gc.get_objects())",
        after_report="gc.collect()\nprint(len(gc.get_objects()) - before)",
    )
    assert int(last) < 5_000
