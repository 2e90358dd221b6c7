"""The node's Structured Report, checked with real tools (dicom3tools, DCMTK) on real headers."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from models.aggregation import SeriesResult
from models.artifact import Aggregation, Manifest, save_artifact
from models.network import build_mobilenet_v2
from models.preprocessing import Preprocessing
from pacs_node.report import (
    PRIVATE_SCHEME,
    SR_SERIES_NUMBER,
    PredecessorReport,
    ReportError,
    ReportingNode,
    build_report,
    read_report,
    sr_series_uid,
    sr_sop_instance_uid,
)
from tests.peers import dciodvfy, tool

DATA = Path(__file__).parents[2] / "shared" / "data" / "chest-ct-30"
CLASSES = ["normal", "benign", "malignant"]
NODE = ReportingNode(ae_title="PACSNODE", institution_name="Test Hospital", station_name="node-1")
WHEN = datetime(2024, 5, 6, 7, 8, 9)
IDENTITY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)


def _manifest(folder: Path, classes: Sequence[str], **details: object) -> Manifest:
    torch.manual_seed(0)
    return save_artifact(
        folder,
        build_mobilenet_v2(len(classes)),
        name="tiny-test-model",
        version="1.2.3-test",
        classes=list(classes),
        preprocessing=Preprocessing(window_center=-600, window_width=1200, input_size=64),
        aggregation=Aggregation(negative_class="normal", fraction=0.1),
        details=dict(details) or None,
    )


@pytest.fixture(scope="module")
def sources() -> tuple[Dataset, ...]:
    files = sorted(DATA.glob("*.dcm"))
    if not files:
        pytest.fail(f"no test series in {DATA}")
    return tuple(pydicom.dcmread(path, stop_before_pixels=True) for path in files)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return _manifest(tmp_path_factory.mktemp("model") / "tiny", CLASSES)


@pytest.fixture
def result() -> SeriesResult:
    return SeriesResult(
        classes=tuple(CLASSES),
        label="malignant",
        probabilities=(0.125, 0.25, 0.625),
        evidence=(7, 3, 12),
    )


def _build(
    sources: Sequence[Dataset],
    result: SeriesResult,
    manifest: Manifest,
    revision: int = 1,
    predecessor: PredecessorReport | None = None,
) -> Dataset:
    return build_report(
        sources=sources,
        result=result,
        manifest=manifest,
        revision=revision,
        node=NODE,
        predecessor=predecessor,
        content_datetime=WHEN,
    )


def _write(report: Dataset, path: Path) -> Path:
    report.save_as(path, enforce_file_format=True)
    return path


def _dsrdump(path: Path) -> str:
    completed = subprocess.run(
        [tool("dsrdump"), "+Pl", "+U8", str(path)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return completed.stdout.decode("utf-8", errors="replace")


def _predecessor(sources: Sequence[Dataset], manifest: Manifest) -> PredecessorReport:
    series = str(sources[0].SeriesInstanceUID)
    return PredecessorReport(
        study_instance_uid=str(sources[0].StudyInstanceUID),
        series_instance_uid=sr_series_uid(series, manifest.version),
        sop_instance_uid=sr_sop_instance_uid(series, manifest.version, 1),
        sop_class_uid=Comprehensive3DSRStorage,
    )


# -- validity and readability -------------------------------------------------------------


@pytest.mark.peer
def test_dciodvfy_finds_no_errors(
    tmp_path: Path, sources: tuple[Dataset, ...], result: SeriesResult, manifest: Manifest
) -> None:
    report = _build(
        sources, result, manifest, revision=2, predecessor=_predecessor(sources, manifest)
    )
    dciodvfy(_write(report, tmp_path / "sr.dcm"))


@pytest.mark.peer
def test_dciodvfy_finds_no_errors_with_private_and_overridden_codes(
    tmp_path: Path, sources: tuple[Dataset, ...]
) -> None:
    classes = [*CLASSES, "ground-glass opacity, long name"]
    manifest = _manifest(
        tmp_path / "model",
        classes,
        class_codes={
            "benign": {"value": "20376005", "scheme": "SCT", "meaning": "Benign neoplasm"}
        },
    )
    result = SeriesResult(
        classes=tuple(classes),
        label="ground-glass opacity, long name",
        probabilities=(0.1, 0.2, 0.3, 0.4),
        evidence=(0,),
    )
    path = _write(_build(sources, result, manifest), tmp_path / "sr.dcm")
    dciodvfy(path)
    text = _dsrdump(path)
    assert f'(ground-glass opacity, long name,{PRIVATE_SCHEME},"ground-glass opacity' in text
    assert '(20376005,SCT,"Benign neoplasm")' in text
    back = read_report(pydicom.dcmread(path))
    assert back.label == "ground-glass opacity, long name"
    assert list(back.probabilities) == classes


@pytest.mark.peer
def test_dsrdump_shows_the_result_in_plain_words(
    tmp_path: Path, sources: tuple[Dataset, ...], result: SeriesResult, manifest: Manifest
) -> None:
    text = _dsrdump(_write(_build(sources, result, manifest), tmp_path / "sr.dcm"))
    print(text)
    assert '"Finding")=(363346000,SCT,"Malignant neoplastic disease")' in text
    for name, probability in zip(CLASSES, result.probabilities, strict=True):
        assert f'"Probability of {name}")="{probability}"' in text
    assert '"Algorithm Version")="1.2.3-test"' in text
    assert '"Algorithm Name")="tiny-test-model"' in text
    assert f"content_hash={manifest.content_hash}" in text
    assert "negative_class=normal; fraction=0.1; evidence=3/30" in text
    assert "Research use only, not a medical device" in text
    assert '(169069000,SCT,"CT of chest")' in text
    assert '"Device Observer Name")="PACSNODE"' in text
    assert '"Device Observer Manufacturer")="pacs-node"' in text
    assert text.count('"Source of Measurement")') == len(result.evidence)


# -- identity and UIDs --------------------------------------------------------------------


def test_uids_are_deterministic(
    sources: tuple[Dataset, ...], result: SeriesResult, manifest: Manifest
) -> None:
    first = _build(sources, result, manifest, revision=1)
    again = _build(sources, result, manifest, revision=1)
    later = _build(sources, result, manifest, revision=2)
    series = str(sources[0].SeriesInstanceUID)
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SOPInstanceUID == sr_sop_instance_uid(series, manifest.version, 1)
    assert first.SOPInstanceUID.startswith("2.25.")
    assert later.SOPInstanceUID != first.SOPInstanceUID
    assert (
        later.SeriesInstanceUID
        == first.SeriesInstanceUID
        == sr_series_uid(series, manifest.version)
    )
    assert sr_series_uid(series, "other-version") != first.SeriesInstanceUID
    assert sr_sop_instance_uid(series, "other-version", 1) != first.SOPInstanceUID
    assert (first.InstanceNumber, later.InstanceNumber) == (1, 2)
    assert first.SeriesNumber == SR_SERIES_NUMBER
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID


def test_same_inputs_give_the_same_bytes(
    tmp_path: Path, sources: tuple[Dataset, ...], result: SeriesResult, manifest: Manifest
) -> None:
    one = _write(_build(sources, result, manifest), tmp_path / "one.dcm").read_bytes()
    two = _write(_build(sources, result, manifest), tmp_path / "two.dcm").read_bytes()
    assert one == two


def test_report_keeps_patient_and_study_and_gets_its_own_series(
    tmp_path: Path, sources: tuple[Dataset, ...], result: SeriesResult, manifest: Manifest
) -> None:
    report = pydicom.dcmread(_write(_build(sources, result, manifest), tmp_path / "sr.dcm"))
    for keyword in IDENTITY:
        assert report.get(keyword) == sources[0].get(keyword), keyword
    assert report.StudyInstanceUID == sources[0].StudyInstanceUID
    assert report.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert report.Modality == "SR"
    assert report.SOPClassUID == Comprehensive3DSRStorage
    assert report.Manufacturer == "pacs-node"
    assert report.InstitutionName == "Test Hospital"
    assert report.StationName == "node-1"
    assert report.ContentDate == "20240506"
    assert report.CompletionFlag == "COMPLETE"
    assert report.VerificationFlag == "UNVERIFIED"
    schemes = [item.CodingSchemeDesignator for item in report.CodingSchemeIdentificationSequence]
    assert schemes == [PRIVATE_SCHEME]


def test_evidence_lists_every_classified_instance(
    sources: tuple[Dataset, ...], result: SeriesResult, manifest: Manifest
) -> None:
    report = _build(sources, result, manifest)
    (study,) = report.CurrentRequestedProcedureEvidenceSequence
    (series,) = study.ReferencedSeriesSequence
    assert study.StudyInstanceUID == sources[0].StudyInstanceUID
    assert series.SeriesInstanceUID == sources[0].SeriesInstanceUID
    listed = {item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence}
    assert listed == {source.SOPInstanceUID for source in sources}


def test_predecessor_is_referenced_only_when_given(
    sources: tuple[Dataset, ...], result: SeriesResult, manifest: Manifest
) -> None:
    predecessor = _predecessor(sources, manifest)
    report = _build(sources, result, manifest, revision=2, predecessor=predecessor)
    (study,) = report.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (instance,) = series.ReferencedSOPSequence
    assert study.StudyInstanceUID == predecessor.study_instance_uid
    assert series.SeriesInstanceUID == predecessor.series_instance_uid
    assert instance.ReferencedSOPInstanceUID == predecessor.sop_instance_uid
    assert instance.ReferencedSOPClassUID == Comprehensive3DSRStorage
    assert "PredecessorDocumentsSequence" not in _build(sources, result, manifest)


# -- round trip ---------------------------------------------------------------------------


def test_read_report_round_trips(
    tmp_path: Path, sources: tuple[Dataset, ...], result: SeriesResult, manifest: Manifest
) -> None:
    predecessor = _predecessor(sources, manifest)
    report = _build(sources, result, manifest, revision=2, predecessor=predecessor)
    for dataset in (report, pydicom.dcmread(_write(report, tmp_path / "sr.dcm"))):
        summary = read_report(dataset)
        assert summary.label == "malignant"
        assert summary.probabilities == dict(zip(CLASSES, result.probabilities, strict=True))
        assert list(summary.probabilities) == CLASSES
        assert summary.model_name == manifest.name
        assert summary.model_version == manifest.version
        assert summary.model_hash == manifest.content_hash
        assert summary.source_series_uid == sources[0].SeriesInstanceUID
        assert summary.evidence_sop_uids == tuple(
            str(sources[index].SOPInstanceUID) for index in result.evidence
        )
        assert summary.predecessor_sop_uids == (predecessor.sop_instance_uid,)


def test_probabilities_survive_exactly(sources: tuple[Dataset, ...], manifest: Manifest) -> None:
    probabilities = (0.1234567890123456789, 1 / 3, 1 - 0.1234567890123456789 - 1 / 3)
    result = SeriesResult(tuple(CLASSES), "benign", probabilities, evidence=(0, 1))
    summary = read_report(_build(sources, result, manifest))
    assert tuple(summary.probabilities.values()) == probabilities
    assert summary.label == "benign"


def test_read_report_rejects_documents_that_are_not_ours(
    sources: tuple[Dataset, ...], result: SeriesResult, manifest: Manifest
) -> None:
    with pytest.raises(ValueError, match="SOPClassUID"):
        read_report(sources[0])
    stranger = _build(sources, result, manifest)
    group = stranger.ContentSequence[-2].ContentSequence[0]
    group.ContentSequence[0].TextValue = "someone else's group"
    with pytest.raises(ValueError, match="tracking identifier"):
        read_report(stranger)
    no_template = _build(sources, result, manifest)
    del no_template.ContentTemplateSequence
    with pytest.raises(ValueError, match="TID 1500"):
        read_report(no_template)


# -- bad arguments ------------------------------------------------------------------------


def _other_series(sources: Sequence[Dataset]) -> list[Dataset]:
    moved = copy.deepcopy(sources[1])
    moved.SeriesInstanceUID = "1.2.3.4.5"
    return [sources[0], moved, *sources[2:]]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda s, r: {"sources": []}, "sources"),
        (lambda s, r: {"sources": _other_series(s)}, "sources"),
        (lambda s, r: {"sources": [s[0], s[0], *s[2:]]}, "sources"),
        (lambda s, r: {"revision": 0}, "revision"),
        (lambda s, r: {"revision": -3}, "revision"),
        (
            lambda s, r: {
                "result": SeriesResult(("a", "b", "c"), "a", r.probabilities, r.evidence)
            },
            "result.classes",
        ),
        (
            lambda s, r: {
                "result": SeriesResult(r.classes, "unknown", r.probabilities, r.evidence)
            },
            "result.label",
        ),
        (
            lambda s, r: {"result": SeriesResult(r.classes, r.label, (0.5, 0.5), r.evidence)},
            "result.probabilities",
        ),
        (
            lambda s, r: {"result": SeriesResult(r.classes, r.label, r.probabilities, (99,))},
            "result.evidence",
        ),
        (
            lambda s, r: {"result": SeriesResult(r.classes, r.label, r.probabilities, ())},
            "result.evidence",
        ),
        (lambda s, r: {"node": ReportingNode(ae_title="")}, "node.ae_title"),
        (lambda s, r: {"node": ReportingNode("AE", station_name="x" * 17)}, "node.station_name"),
    ],
)
def test_bad_arguments_are_named(
    sources: tuple[Dataset, ...],
    result: SeriesResult,
    manifest: Manifest,
    change: object,
    named: str,
) -> None:
    arguments: dict[str, object] = {
        "sources": sources,
        "result": result,
        "manifest": manifest,
        "revision": 1,
        "node": NODE,
    }
    arguments.update(change(sources, result))  # type: ignore[operator]
    with pytest.raises(ReportError, match=named.replace(".", r"\.")):
        build_report(**arguments)  # type: ignore[arg-type]


def test_bad_class_codes_are_named(tmp_path: Path, sources: tuple[Dataset, ...]) -> None:
    manifest = _manifest(tmp_path / "model", CLASSES, class_codes={"benign": {"value": "1"}})
    result = SeriesResult(tuple(CLASSES), "benign", (0.2, 0.5, 0.3), (0,))
    with pytest.raises(ValueError, match=r"class_codes.*benign"):
        _build(sources, result, manifest)


def test_predecessor_cannot_be_the_report_itself(
    sources: tuple[Dataset, ...], result: SeriesResult, manifest: Manifest
) -> None:
    itself = _predecessor(sources, manifest)
    with pytest.raises(ReportError, match="predecessor"):
        _build(sources, result, manifest, revision=1, predecessor=itself)


# -- character sets -----------------------------------------------------------------------


@pytest.mark.peer
@pytest.mark.parametrize(
    ("charset", "name"),
    [
        ("ISO_IR 100", "Müller^Zoë^José"),
        ("ISO_IR 192", "Wang^XiaoDong=王^小東=ワン^ショウドン"),
    ],
)
def test_non_ascii_patient_names_survive(
    tmp_path: Path,
    sources: tuple[Dataset, ...],
    result: SeriesResult,
    manifest: Manifest,
    charset: str,
    name: str,
) -> None:
    changed = [copy.deepcopy(source) for source in sources]
    for source in changed:
        source.SpecificCharacterSet = charset
        source.PatientName = name
        source.ReferringPhysicianName = (
            "Dvořák^Antonín" if charset == "ISO_IR 192" else "Ångström^Anders"
        )
    path = _write(_build(changed, result, manifest), tmp_path / "sr.dcm")
    back = pydicom.dcmread(path)
    assert back.SpecificCharacterSet == charset
    assert str(back.PatientName) == name
    assert back.ReferringPhysicianName == changed[0].ReferringPhysicianName
    dciodvfy(path)
    assert name.split("=")[0].split("^")[0] in _dsrdump(path)


def test_node_text_outside_the_source_character_set_switches_to_utf8(
    tmp_path: Path, sources: tuple[Dataset, ...], result: SeriesResult, manifest: Manifest
) -> None:
    node = ReportingNode(ae_title="PACSNODE", institution_name="Klinikum Łódź")
    report = build_report(sources=sources, result=result, manifest=manifest, revision=1, node=node)
    back = pydicom.dcmread(_write(report, tmp_path / "sr.dcm"))
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert back.InstitutionName == "Klinikum Łódź"
    assert back.PatientName == sources[0].PatientName
