"""`pacs-node classify`: the node's pipeline on files, with no network.

Files are grouped by series and filtered by the same intake rules as received
instances; each series is classified by the same `SeriesClassifier` and, with
`--sr`, reported by the same SR builder (revision 1, no predecessor).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from pacs_node.config import Settings
from pacs_node.errors import BadInstanceError, ConfigurationError, PermanentError
from pacs_node.inference import SeriesClassification, load_classifier
from pacs_node.intake import describe
from pacs_node.report import build_report, reporting_node


@dataclass(frozen=True)
class _Slice:
    path: Path
    instance_number: int | None
    sop_instance_uid: str


def slice_order(item: _Slice) -> tuple[bool, int, str]:
    """Instance number (missing last), then SOP Instance UID: the store's order."""
    return (item.instance_number is None, item.instance_number or 0, item.sop_instance_uid)


def run_classify(
    settings: Settings, paths: Sequence[Path], sr_out: Path | None, as_json: bool
) -> int:
    series, ignored = _collect(settings, paths)
    for path, reason in ignored:
        print(f"ignored {path}: {reason}", file=sys.stderr)
    if not series:
        raise PermanentError("no classifiable CT instance found in the given paths")
    if sr_out is not None and len(series) > 1 and not sr_out.is_dir():
        raise ConfigurationError(
            f"--sr {sr_out}: {len(series)} series found; give an existing folder"
        )
    classifier = load_classifier(settings)
    manifest = classifier.predictor.manifest
    documents: list[dict[str, Any]] = []
    for series_uid, slices in series.items():
        ordered = sorted(slices, key=slice_order)
        classification = classifier.classify([item.path for item in ordered])
        document = _document(series_uid, classification, manifest.model_id, manifest.content_hash)
        if sr_out is not None:
            report = build_report(
                sources=classification.sources_for_report(),
                result=classification.result,
                manifest=manifest,
                revision=1,
                node=reporting_node(settings),
            )
            target = sr_out / f"{report.SOPInstanceUID}.dcm" if sr_out.is_dir() else sr_out
            report.save_as(target, enforce_file_format=True)
            document["sr"] = str(target)
        documents.append(document)
    if as_json:
        print(json.dumps({"model": manifest.model_id, "series": documents}, indent=2))
    else:
        for document in documents:
            _print_summary(document)
    return 0


def _collect(
    settings: Settings, paths: Iterable[Path]
) -> tuple[dict[str, list[_Slice]], list[tuple[Path, str]]]:
    series: dict[str, list[_Slice]] = defaultdict(list)
    ignored: list[tuple[Path, str]] = []
    for path in _files(paths):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=False, defer_size="1 KB")
            info = describe(header, settings.intake)
        except (InvalidDicomError, BadInstanceError, OSError) as error:
            ignored.append((path, str(error)))
            continue
        if not info.classifiable:
            ignored.append((path, info.exclusion_reason or "not classified"))
            continue
        series[info.series_instance_uid].append(
            _Slice(path, info.instance_number, info.sop_instance_uid)
        )
    return dict(series), ignored


def _files(paths: Iterable[Path]) -> Iterable[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(candidate for candidate in path.rglob("*") if candidate.is_file())
        elif path.is_file():
            yield path
        else:
            raise ConfigurationError(f"{path} does not exist")


def _document(
    series_uid: str, classification: SeriesClassification, model_id: str, model_hash: str
) -> dict[str, Any]:
    result = classification.result
    return {
        "series_instance_uid": series_uid,
        "label": result.label,
        "probabilities": dict(zip(result.classes, result.probabilities, strict=True)),
        "evidence": classification.evidence_uids,
        "slices": classification.slices,
        "skipped": [{"file": name, "reason": reason} for name, reason in classification.skipped],
        "model": model_id,
        "model_hash": model_hash,
    }


def _print_summary(document: dict[str, Any]) -> None:
    probabilities = ", ".join(
        f"{name} {value:.3f}" for name, value in document["probabilities"].items()
    )
    print(f"series {document['series_instance_uid']}")
    print(f"  class: {document['label']}  ({probabilities})")
    print(
        f"  slices: {len(document['slices'])} classified, {len(document['skipped'])} skipped; "
        f"evidence: {len(document['evidence'])} slice(s)"
    )
    if "sr" in document:
        print(f"  SR: {document['sr']}")
