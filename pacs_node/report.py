"""The node's DICOM Structured Report: one Comprehensive 3D SR per classified series.

This is the only module of pacs_node that imports highdicom. `build_report`
turns a `SeriesResult` into a TID 1500 Measurement Report; `read_report`
parses such a report back into a `ReportSummary`.

Document layout (as `dsrdump` shows it)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")          TID 1500
      HAS CONCEPT MOD  Language of Content Item and Descendants = English
      HAS OBS CONTEXT  Observer Type = Device                       TID 1002/1004
                       Device Observer UID  (derived from the AE title)
                       Device Observer Name = <AE title>
                       Device Observer Manufacturer = "pacs-node"
                       Device Observer Model Name = "pacs-node"
      HAS CONCEPT MOD  Procedure reported = (169069000, SCT, "CT of chest")
      CONTAINS CONTAINER Imaging Measurements
        CONTAINS CONTAINER Measurement Group                        TID 1501
          Tracking Identifier = "pacs-node series classification"
          Tracking Unique Identifier (derived from series + model version)
          Finding = <class code of the label>        (the classification)
          Finding Site = (39607008, SCT, "Lung")
          Algorithm Name / Version / Parameters                     TID 4019
            parameters: "content_hash=sha256:...", "aggregation=..."
          NUM "Probability of <class>" = p (1, UCUM, "no units")    TID 300
            Finding = <class code>; Derivation = Mean; TID 4019 again
          ... one NUM per class, in the manifest's class order
          IMAGE Source of Measurement  (each evidence slice, most suspicious first)
      CONTAINS CONTAINER Qualitative Evaluations
        TEXT Comment = "Research use only, not a medical device. ..."
        TEXT Comment = the aggregation rule in plain words

Codes. The classification is a CODE content item with the concept name
(121071, DCM, "Finding"), the TID 1501 row for what was found; its value is
the class code. Default class codes: "normal" -> (17621005, SCT, "Normal"),
"benign" -> (3898006, SCT, "Neoplasm, benign"), "malignant" ->
(363346000, SCT, "Malignant neoplastic disease") (3898006 is a SNOMED
morphology, 363346000 a disorder; a site that wants one hierarchy overrides
them). A manifest overrides or adds codes with `details["class_codes"] =
{"<class>": {"value", "scheme", "meaning"}}`; any other class gets a code
of the node's private scheme (`PRIVATE_SCHEME`, code value = class name).
Per-class probabilities have no
standard concept ("probability of X" for an arbitrary X), so their concept
names are private codes too: value "P-<class>", meaning "Probability of
<class>"; a HAS CONCEPT MOD "Finding" child on each carries the class's code,
so the link to standard codes stays machine-readable. The private scheme is
declared in the Coding Scheme Identification Sequence.

Unit. Probabilities use the UCUM unity code (1, UCUM, "no units"): a
probability is a dimensionless ratio in [0, 1], "1" is UCUM's canonical code
for such a quantity, and it is the code DICOM lists for it (CID 7181). The
UCUM annotation "{probability}" would read better but is not in any DICOM
context group and means exactly the same to a UCUM parser.

Identity. The report copies the Patient and General Study modules and the
Specific Character Set of the first source header (switching to ISO_IR 192
only if text the node adds does not fit the source's set), so it joins the
source's study, and gets its own series: SeriesInstanceUID is derived from
(source series, model version), SOPInstanceUID from (source series, model
version, revision), both as 2.25 UIDs, so a resend can never create a second
object.
SeriesNumber is `SR_SERIES_NUMBER` (9901), InstanceNumber the revision.
"""

from __future__ import annotations

import copy
import json
import math
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.charset import convert_encodings
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, CTImageStorage
from pydicom.valuerep import DA, DT, TM

from models.aggregation import SeriesResult
from models.manifest import Manifest
from pacs_node import __version__
from pacs_node.config import Settings
from pacs_node.errors import PermanentError

__all__ = [
    "DEFAULT_CLASS_CODES",
    "MANUFACTURER",
    "PRIVATE_SCHEME",
    "SR_SERIES_NUMBER",
    "PredecessorReport",
    "ReportError",
    "ReportSummary",
    "ReportingNode",
    "build_report",
    "class_codes",
    "read_report",
    "sr_series_uid",
    "sr_sop_instance_uid",
]

MANUFACTURER = "pacs-node"
MODEL_NAME = "pacs-node"
# The node's reports form series 9901 of the study: a fixed, high number keeps
# them apart from the modality's series (which count up from 1) and stable
# across revisions and resends.
SR_SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "pacs-node AI classification (research use only)"
TRACKING_IDENTIFIER = "pacs-node series classification"
DISCLAIMER = (
    "Research use only, not a medical device. This result was produced by an automated "
    "classifier without review by a physician and must not be used for diagnosis."
)

# The one private coding scheme of the node (PS3.16 8.2: designators beginning
# with "99" are private).
PRIVATE_SCHEME = "99PACSNODE"
PRIVATE_SCHEME_NAME = "pacs-node local codes"
PROBABILITY_PREFIX = "P-"
HASH_PARAMETER = "content_hash="
AGGREGATION_PARAMETER = "aggregation="

DEFAULT_CLASS_CODES: Mapping[str, Code] = {
    "normal": Code("17621005", "SCT", "Normal"),
    "benign": Code("3898006", "SCT", "Neoplasm, benign"),
    "malignant": Code("363346000", "SCT", "Malignant neoplastic disease"),
}

PROCEDURE_CT_CHEST = Code("169069000", "SCT", "CT of chest")
LUNG = Code("39607008", "SCT", "Lung")
FINDING = Code("121071", "DCM", "Finding")
MEAN = Code("373098007", "SCT", "Mean")
NO_UNITS = Code("1", "UCUM", "no units")
COMMENT = Code("121106", "DCM", "Comment")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")

# Type 2 attributes highdicom reads from the first source; absent ones become empty.
_IDENTITY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_MAX_MEANING = 64


class ReportError(PermanentError, ValueError):
    """An argument of `build_report` cannot make a valid report (names the argument)."""


@dataclass(frozen=True)
class ReportingNode:
    """Who wrote the report: the node, as the SR's device observer."""

    ae_title: str
    institution_name: str | None = None
    station_name: str | None = None


def reporting_node(settings: Settings) -> ReportingNode:
    """The node as its settings describe it to the reports it writes."""
    return ReportingNode(
        ae_title=settings.dicom.ae_title,
        institution_name=settings.results.institution_name or None,
        station_name=socket.gethostname()[:16] or None,
    )


@dataclass(frozen=True)
class PredecessorReport:
    """An earlier revision that the new report supersedes."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class ReportSummary:
    """What `read_report` finds in one of the node's reports."""

    label: str
    probabilities: dict[str, float]
    model_name: str
    model_version: str
    model_hash: str
    source_series_uid: str
    evidence_sop_uids: tuple[str, ...]
    predecessor_sop_uids: tuple[str, ...]


# Name-based (SHA-1, version 5) UUIDs under one fixed namespace, written as
# 2.25 UIDs (PS3.5 B.2, ISO/IEC 9834-8): the same names always give the same
# UID and no registered root is needed. (pydicom's generate_uid ignores
# entropy_srcs when prefix is None, so it cannot make deterministic 2.25 UIDs.)
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "pacs-node")


def _derived_uid(*names: str) -> str:
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, json.dumps(names)).int}"


def sr_series_uid(source_series_uid: str, model_version: str) -> str:
    """The SR series of one source series and model version (a 2.25 UID)."""
    return _derived_uid("sr-series", source_series_uid, model_version)


def sr_sop_instance_uid(source_series_uid: str, model_version: str, revision: int) -> str:
    """The SR instance of one source series, model version and revision (a 2.25 UID)."""
    return _derived_uid("sr-instance", source_series_uid, model_version, str(revision))


def _device_uid(ae_title: str) -> str:
    return _derived_uid("device-observer", ae_title)


def _tracking_uid(source_series_uid: str, model_version: str) -> str:
    # The same finding across revisions: revisions of one series and model
    # version share the tracking UID.
    return _derived_uid("tracking", source_series_uid, model_version)


def _meaning(text: str) -> str:
    return text if len(text) <= _MAX_MEANING else text[: _MAX_MEANING - 3] + "..."


def class_codes(manifest: Manifest) -> dict[str, Code]:
    """The code of each class of `manifest`, in class order (see the module docstring)."""
    overrides = manifest.details.get("class_codes", {})
    where = "manifest.details['class_codes']"
    if not isinstance(overrides, Mapping):
        raise ReportError(f"{where} must be a mapping of class name to code, got {overrides!r}")
    unknown = sorted(set(overrides) - set(manifest.classes))
    if unknown:
        raise ReportError(f"{where} names class(es) the manifest lacks: {', '.join(unknown)}")
    codes: dict[str, Code] = {}
    for name in manifest.classes:
        _check_class_name(name)
        if name in overrides:
            entry = overrides[name]
            if not isinstance(entry, Mapping) or not all(
                isinstance(entry.get(key), str) and entry.get(key)
                for key in ("value", "scheme", "meaning")
            ):
                raise ReportError(
                    f"{where}[{name!r}] must have non-empty string 'value', 'scheme' and "
                    f"'meaning', got {entry!r}"
                )
            if len(entry["meaning"]) > _MAX_MEANING:
                raise ReportError(f"{where}[{name!r}]['meaning'] is longer than 64 characters")
            codes[name] = Code(entry["value"], entry["scheme"], entry["meaning"])
        elif name in DEFAULT_CLASS_CODES:
            codes[name] = DEFAULT_CLASS_CODES[name]
        else:
            codes[name] = Code(name, PRIVATE_SCHEME, _meaning(name))
    seen: dict[tuple[str, str], str] = {}
    for name, code in codes.items():
        key = (code.scheme_designator, code.value)
        if key in seen:
            raise ReportError(
                f"manifest.classes {seen[key]!r} and {name!r} have the same code "
                f"({code.value}, {code.scheme_designator})"
            )
        seen[key] = name
    return codes


def _check_class_name(name: str) -> None:
    if not name or name != name.strip() or "\\" in name or not name.isprintable():
        raise ReportError(
            f"manifest.classes: {name!r} cannot be written as a code value "
            "(empty, surrounding spaces, a backslash or a control character)"
        )


def _probability_concept(name: str) -> CodedConcept:
    return CodedConcept(
        value=PROBABILITY_PREFIX + name,
        scheme_designator=PRIVATE_SCHEME,
        meaning=_meaning(f"Probability of {name}"),
    )


def _validate(
    sources: Sequence[Dataset],
    result: SeriesResult,
    manifest: Manifest,
    revision: int,
    node: ReportingNode,
    predecessor: PredecessorReport | None,
) -> None:
    if len(sources) == 0:
        raise ReportError(
            "sources is empty: a report needs the headers of its classified instances"
        )
    for index, source in enumerate(sources):
        missing = [
            keyword
            for keyword in (
                "StudyInstanceUID",
                "SeriesInstanceUID",
                "SOPInstanceUID",
                "SOPClassUID",
            )
            if not source.get(keyword)
        ]
        if missing:
            raise ReportError(f"sources[{index}] lacks {', '.join(missing)}")
    series = {str(source.SeriesInstanceUID) for source in sources}
    if len(series) > 1:
        raise ReportError(
            f"sources come from {len(series)} different series ({', '.join(sorted(series))}); "
            "a report covers one series"
        )
    studies = {str(source.StudyInstanceUID) for source in sources}
    if len(studies) > 1:
        raise ReportError(f"sources name {len(studies)} different StudyInstanceUIDs for one series")
    sop_uids = [str(source.SOPInstanceUID) for source in sources]
    if len(set(sop_uids)) != len(sop_uids):
        raise ReportError("sources contain the same SOPInstanceUID more than once")
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
        raise ReportError(f"revision must be an integer >= 1, got {revision!r}")
    if not node.ae_title or not node.ae_title.strip():
        raise ReportError("node.ae_title is empty")
    # LO and SH value lengths (PS3.5 6.2): the header attributes they fill.
    if node.institution_name is not None and len(node.institution_name) > 64:
        raise ReportError("node.institution_name is longer than 64 characters")
    if node.station_name is not None and len(node.station_name) > 16:
        raise ReportError("node.station_name is longer than 16 characters")
    if tuple(result.classes) != tuple(manifest.classes):
        raise ReportError(
            f"result.classes {list(result.classes)} do not match manifest.classes "
            f"{list(manifest.classes)}"
        )
    if len(result.probabilities) != len(result.classes):
        raise ReportError(
            f"result.probabilities has {len(result.probabilities)} values for "
            f"{len(result.classes)} classes"
        )
    for name, value in zip(result.classes, result.probabilities, strict=True):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ReportError(f"result.probabilities[{name!r}] must be in [0, 1], got {value!r}")
    if result.label not in result.classes:
        raise ReportError(f"result.label {result.label!r} is not one of result.classes")
    if len(result.evidence) == 0:
        raise ReportError("result.evidence is empty: at least one slice drove the decision")
    for index in result.evidence:
        if not 0 <= index < len(sources):
            raise ReportError(
                f"result.evidence index {index} is out of range for {len(sources)} sources"
            )
    if len(set(result.evidence)) != len(result.evidence):
        raise ReportError("result.evidence names the same slice more than once")
    if predecessor is not None:
        own = sr_sop_instance_uid(str(sources[0].SeriesInstanceUID), manifest.version, revision)
        if predecessor.sop_instance_uid == own:
            raise ReportError("predecessor is the report being built (same SOPInstanceUID)")
        empty = [
            name
            for name in (
                "study_instance_uid",
                "series_instance_uid",
                "sop_instance_uid",
                "sop_class_uid",
            )
            if not getattr(predecessor, name)
        ]
        if empty:
            raise ReportError(f"predecessor.{empty[0]} is empty")


def _identity_source(source: Dataset) -> Dataset:
    """A copy of the first source for highdicom to take the patient and study from.

    A deep copy, because highdicom puts the source's data elements themselves
    into the report; absent type 2 identity attributes become present and
    empty. The patient name is left empty here and set on the report
    afterwards: highdicom would otherwise warn about unusual names, printing
    the name (PHI) to the node's log.
    """
    patched = copy.deepcopy(source)
    for keyword in _IDENTITY_TYPE2:
        if keyword not in patched:
            setattr(patched, keyword, None)
    patched.PatientName = None
    return patched


def _character_set(source: Dataset, texts: Iterable[str]) -> str | list[str] | None:
    """The source's Specific Character Set, or ISO_IR 192 if the node's own text needs it.

    Keeping the source's character set keeps its patient name byte-for-byte
    meaningful; only text the node adds (AE title, model name, class codes)
    that the source's set cannot hold switches the report to UTF-8, in which
    every value pydicom decoded from the source can be re-encoded.
    """
    value = source.get("SpecificCharacterSet")
    original: str | list[str] | None = (
        value if value is None or isinstance(value, str) else [str(term) for term in value]
    )
    wide = [text for text in texts if not text.isascii()]
    if not wide:
        return original
    encodings = convert_encodings(original)
    if len(encodings) == 1:
        try:
            for text in wide:
                text.encode(encodings[0])
        except (UnicodeEncodeError, LookupError):
            return "ISO_IR 192"
        return original
    return "ISO_IR 192"


def _algorithm(manifest: Manifest, parameters: Sequence[str]) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=manifest.name, version=manifest.version, parameters=list(parameters)
    )


def _aggregation_text(manifest: Manifest, evidence: int, slices: int) -> tuple[str, str]:
    """The aggregation rule as an algorithm parameter and in plain words."""
    rule = manifest.aggregation
    parameter = (
        f"{AGGREGATION_PARAMETER}mean of evidence slices; negative_class={rule.negative_class}; "
        f"fraction={rule.fraction:g}; evidence={evidence}/{slices}"
    )
    if rule.negative_class is None:
        words = (
            f"Series probabilities are the mean of the class probabilities of all {slices} "
            "classified slices; the finding is the most probable class."
        )
    else:
        words = (
            f"Series probabilities are the mean of the class probabilities of the {evidence} "
            f"evidence slice(s) out of {slices} classified, chosen as the fraction "
            f"{rule.fraction:g} (at least one) with the lowest probability of "
            f"'{rule.negative_class}'; the finding is the most probable class."
        )
    return parameter, words


def build_report(
    *,
    sources: Sequence[Dataset],
    result: SeriesResult,
    manifest: Manifest,
    revision: int,
    node: ReportingNode,
    predecessor: PredecessorReport | None = None,
    content_datetime: datetime | None = None,
) -> Dataset:
    """The Comprehensive 3D SR for one classified series (see the module docstring).

    `sources` are the headers (pixel data may be absent) of all classified
    instances of the series, in the order `result.evidence` indexes them.
    Raises `ReportError` (a `ValueError`) naming the bad argument.
    """
    _validate(sources, result, manifest, revision, node, predecessor)
    codes_by_class = class_codes(manifest)
    first = sources[0]
    source_series = str(first.SeriesInstanceUID)
    when = content_datetime if content_datetime is not None else datetime.now()

    aggregation_parameter, aggregation_words = _aggregation_text(
        manifest, len(result.evidence), len(sources)
    )
    algorithm_parameters = [HASH_PARAMETER + manifest.content_hash, aggregation_parameter]

    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(Code("121007", "DCM", "Device")),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_device_uid(node.ae_title),
            name=node.ae_title,
            manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
        ),
    )
    measurements = []
    for name, probability in zip(result.classes, result.probabilities, strict=True):
        measurement = hd.sr.Measurement(
            name=_probability_concept(name),
            value=float(probability),
            unit=NO_UNITS,
            derivation=MEAN,
            algorithm_id=_algorithm(manifest, algorithm_parameters),
        )
        # The class this probability is about, as a code (first, to read well).
        measurement[0].ContentSequence.insert(
            0,
            hd.sr.CodeContentItem(
                name=FINDING,
                value=codes_by_class[name],
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            ),
        )
        measurements.append(measurement)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_tracking_uid(source_series, manifest.version),
            identifier=TRACKING_IDENTIFIER,
        ),
        finding_type=codes_by_class[result.label],
        finding_sites=[hd.sr.FindingSite(LUNG)],
        algorithm_id=_algorithm(manifest, algorithm_parameters),
        measurements=measurements,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(sources[index].SOPClassUID),
                referenced_sop_instance_uid=str(sources[index].SOPInstanceUID),
            )
            for index in result.evidence
        ],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_CT_CHEST,
        imaging_measurements=[group],
    )
    evaluations = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    evaluations.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=COMMENT,
                value=text,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for text in (DISCLAIMER, aggregation_words)
        ]
    )
    report[0].ContentSequence.append(evaluations)

    own_texts = [
        node.ae_title,
        node.institution_name or "",
        node.station_name or "",
        manifest.name,
        manifest.version,
        *manifest.classes,
        *(code.meaning for code in codes_by_class.values()),
    ]
    previous = None
    if predecessor is not None:
        item = Dataset()
        item.StudyInstanceUID = predecessor.study_instance_uid
        item.SeriesInstanceUID = predecessor.series_instance_uid
        item.SOPInstanceUID = predecessor.sop_instance_uid
        item.SOPClassUID = predecessor.sop_class_uid
        previous = [item]

    evidence = [_identity_source(first), *sources[1:]]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=sr_series_uid(source_series, manifest.version),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sr_sop_instance_uid(source_series, manifest.version, revision),
        instance_number=revision,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=node.institution_name or None,
        previous_versions=previous,
        manufacturer_model_name=MODEL_NAME,
        software_versions=__version__,
        series_description=SERIES_DESCRIPTION,
        content_date=DA(when.date()),
        content_time=TM(when.time()),
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME,
                name=PRIVATE_SCHEME_NAME,
                responsible_organization=MANUFACTURER,
            )
        ],
        specific_character_set=_character_set(first, own_texts),
    )
    sr.add_new("PatientName", "PN", first.get("PatientName"))
    # Same inputs, same bytes: the creation time is the content time.
    sr.InstanceCreationDate = sr.ContentDate
    sr.InstanceCreationTime = sr.ContentTime
    for equipment in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in equipment:
            equipment.ContributionDateTime = DT(when)
    if node.station_name:
        sr.StationName = node.station_name
    return sr


def rehearse_report(manifest: Manifest, node: ReportingNode) -> None:
    """Build a report for a made-up one-slice series, and drop it.

    Run at start-up, it shows that this model's classes and this node's settings
    make a valid report (raises `ReportError` naming the problem), where a bad
    one would fail every job later. It also has highdicom read its tables of the
    standard, ~200 000 objects on first use, so that the infer process can
    freeze them with its other long-lived objects instead of scanning them in
    every full garbage collection (~50 ms each, measured during the stage).
    """
    source = Dataset()
    source.SOPClassUID = CTImageStorage
    source.StudyInstanceUID = _derived_uid("rehearsal", "study")
    source.SeriesInstanceUID = _derived_uid("rehearsal", "series")
    source.SOPInstanceUID = _derived_uid("rehearsal", "instance")
    source.Modality = "CT"
    count = len(manifest.classes)
    result = SeriesResult(
        classes=manifest.classes,
        label=manifest.classes[0],
        probabilities=(1.0 / count,) * count,
        evidence=(0,),
    )
    build_report(sources=[source], result=result, manifest=manifest, revision=1, node=node)


def read_report(dataset: Dataset) -> ReportSummary:
    """Parse one of the node's reports; `ValueError` names what is missing if it is not one."""
    if str(dataset.get("SOPClassUID", "")) != Comprehensive3DSRStorage:
        raise ValueError(
            f"not a Comprehensive 3D SR: SOPClassUID is {dataset.get('SOPClassUID')!r}"
        )
    templates = dataset.get("ContentTemplateSequence") or []
    if not templates or str(templates[0].get("TemplateIdentifier", "")) != "1500":
        raise ValueError(
            "not a TID 1500 Measurement Report: ContentTemplateSequence lacks TID 1500"
        )
    try:
        content = hd.sr.Comprehensive3DSR.from_dataset(dataset, copy=True).content
        if not isinstance(content, hd.sr.MeasurementReport):
            raise ValueError("the root content is not a Measurement Report")
        groups = content.get_image_measurement_groups()
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as error:
        raise ValueError(f"the SR content cannot be parsed as TID 1500: {error}") from error
    ours = [group for group in groups if group.tracking_identifier == TRACKING_IDENTIFIER]
    if len(ours) != 1:
        raise ValueError(
            f"expected one measurement group with tracking identifier {TRACKING_IDENTIFIER!r}, "
            f"found {len(ours)}"
        )
    group = ours[0]
    label_code = group.finding_type
    if label_code is None:
        raise ValueError("the measurement group lacks its Finding (the classification)")

    probabilities: dict[str, float] = {}
    label: str | None = None
    for measurement in group.get_measurements():
        concept = measurement.name
        if concept.scheme_designator != PRIVATE_SCHEME or not concept.value.startswith(
            PROBABILITY_PREFIX
        ):
            continue
        name = concept.value[len(PROBABILITY_PREFIX) :]
        probabilities[name] = float(measurement.value)
        class_items = hd.sr.utils.find_content_items(
            measurement[0], name=FINDING, value_type="CODE"
        )
        if class_items and class_items[0].value == label_code:
            label = name
    if not probabilities:
        raise ValueError(
            f"the measurement group has no probability measurements ({PRIVATE_SCHEME} "
            f"{PROBABILITY_PREFIX}<class>)"
        )
    if label is None:
        raise ValueError(
            f"the Finding ({label_code.value}, {label_code.scheme_designator}) matches no "
            "probability measurement's class"
        )

    model_name = _group_text(group, ALGORITHM_NAME)
    model_version = _group_text(group, ALGORITHM_VERSION)
    parameters = _group_texts(group, ALGORITHM_PARAMETERS)
    hashes = [text[len(HASH_PARAMETER) :] for text in parameters if text.startswith(HASH_PARAMETER)]
    if model_name is None or model_version is None or not hashes:
        missing = [
            what
            for what, value in (
                ("Algorithm Name", model_name),
                ("Algorithm Version", model_version),
                (f"Algorithm Parameters {HASH_PARAMETER}...", hashes or None),
            )
            if value is None
        ]
        raise ValueError(f"the measurement group lacks {', '.join(missing)}")

    evidence = tuple(str(image.referenced_sop_instance_uid) for image in group.source_images)
    if not evidence:
        raise ValueError("the measurement group references no evidence images")
    source_series = _evidence_series(dataset, set(evidence))
    predecessors = tuple(
        str(instance.ReferencedSOPInstanceUID)
        for study in dataset.get("PredecessorDocumentsSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedSOPSequence", [])
    )
    return ReportSummary(
        label=label,
        probabilities=probabilities,
        model_name=model_name,
        model_version=model_version,
        model_hash=hashes[0],
        source_series_uid=source_series,
        evidence_sop_uids=evidence,
        predecessor_sop_uids=predecessors,
    )


def _group_texts(group: Any, name: Code) -> list[str]:
    items = hd.sr.utils.find_content_items(group[0], name=name, value_type="TEXT")
    return [str(item.TextValue) for item in items]


def _group_text(group: Any, name: Code) -> str | None:
    texts = _group_texts(group, name)
    return texts[0] if texts else None


def _evidence_series(dataset: Dataset, evidence: set[str]) -> str:
    """The series of the evidence images, from the Current Requested Procedure Evidence."""
    found: set[str] = set()
    for study in dataset.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            uids = {
                str(item.ReferencedSOPInstanceUID)
                for item in series.get("ReferencedSOPSequence", [])
            }
            if uids & evidence:
                found.add(str(series.SeriesInstanceUID))
    if len(found) != 1:
        raise ValueError(
            "CurrentRequestedProcedureEvidenceSequence does not place the evidence images "
            f"in exactly one series (found {len(found)})"
        )
    return found.pop()
