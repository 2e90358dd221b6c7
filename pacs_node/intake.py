"""What a received instance is, and whether it becomes inference work.

Every well-formed instance is stored; only single-frame CT images that are
not localizers become inference work. The decision and its reason are kept
with the instance row, so `jobs` and the logs can say why a series was or
was not classified.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from pacs_node.config import IntakeSettings
from pacs_node.errors import BadInstanceError, DatasetMismatchError
from pacs_node.header import UNDEFINED_LENGTH
from pacs_node.storage import check_uid

# Image Pixel module attributes without which pixel data cannot be read (PS3.3 C.7.6.3).
_IMAGE_PIXEL_TYPE_1 = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel")
# Image IODs whose instances are invalid without pixel data.
_IMAGE_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1."
_NON_IMAGE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration, segmentation, ...
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents
    "1.2.840.10008.5.1.4.1.1.481.",  # RT objects
)


@dataclass(frozen=True)
class InstanceInfo:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    instance_number: int | None
    images_in_acquisition: int | None
    classifiable: bool
    exclusion_reason: str | None


def describe(dataset: Dataset, settings: IntakeSettings) -> InstanceInfo:
    """Identify `dataset` and decide whether it is classified.

    Raises `BadInstanceError` when the instance is unusable as sent (missing
    or invalid identifying UIDs, an image without pixel data).
    """
    sop_class = _required_uid(dataset, "SOPClassUID")
    sop_instance = _required_uid(dataset, "SOPInstanceUID")
    study = _required_uid(dataset, "StudyInstanceUID")
    series = _required_uid(dataset, "SeriesInstanceUID")
    if _is_image(sop_class):
        _check_pixel_data(dataset)
    modality = str(dataset.get("Modality", "") or "")
    reason = _exclusion_reason(dataset, sop_class, modality, settings)
    return InstanceInfo(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=study,
        series_instance_uid=series,
        modality=modality,
        instance_number=_optional_int(dataset, "InstanceNumber"),
        images_in_acquisition=_optional_int(dataset, "ImagesInAcquisition"),
        classifiable=reason is None,
        exclusion_reason=reason,
    )


def check_complete(dataset: Dataset, file_size: int) -> None:
    """Refuse a data set whose values end beyond its file (a truncated encoding).

    Large values are left on disk when the header is read, so their announced
    lengths are checked against the file instead of by reading them.
    """
    for tag in list(dataset.keys()):
        element = dataset.get_item(tag, keep_deferred=True)
        if not isinstance(element, RawDataElement) or element.value is not None:
            continue  # read already, so complete
        if element.length != UNDEFINED_LENGTH and element.value_tell + element.length > file_size:
            raise BadInstanceError(f"data set is truncated in element {element.tag}")


def _exclusion_reason(
    dataset: Dataset, sop_class: str, modality: str, settings: IntakeSettings
) -> str | None:
    if modality not in settings.modalities:
        return f"modality {modality or '(none)'} is not classified"
    if sop_class not in settings.sop_classes:
        return f"SOP class {sop_class} is not classified"
    image_type = [str(value).upper() for value in dataset.get("ImageType", [])]
    excluded = set(image_type[2:]) & {value.upper() for value in settings.excluded_image_types}
    if excluded:
        return f"image type {'/'.join(sorted(excluded))} is not classified"
    frames = _optional_int(dataset, "NumberOfFrames")
    if frames is not None and frames > 1:
        return f"multi-frame image ({frames} frames) is not classified"
    if "PixelData" not in dataset:
        return "no integer pixel data"
    return None


def _check_pixel_data(dataset: Dataset) -> None:
    """Refuse an image whose pixel data cannot match its own description."""
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        raise DatasetMismatchError("image instance has no pixel data")
    missing = [keyword for keyword in _IMAGE_PIXEL_TYPE_1 if dataset.get(keyword) in (None, "")]
    if missing:
        raise DatasetMismatchError(f"image instance lacks {', '.join(missing)}")
    # keep_deferred: the length comes from the element's header, the value stays on disk.
    element = dataset.get_item("PixelData", keep_deferred=True)
    file_meta = getattr(dataset, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if element is None or transfer_syntax is None or transfer_syntax.is_encapsulated:
        return
    frames = _optional_int(dataset, "NumberOfFrames") or 1
    expected = (
        int(dataset.Rows)
        * int(dataset.Columns)
        * int(dataset.SamplesPerPixel)
        * frames
        * int(dataset.BitsAllocated)
        // 8
    )
    actual = element.length if isinstance(element, RawDataElement) else len(element.value or b"")
    if actual < expected:
        raise DatasetMismatchError(
            f"pixel data is {actual} bytes, Rows x Columns x samples x frames needs {expected}"
        )


def _is_image(sop_class: str) -> bool:
    return sop_class.startswith(_IMAGE_SOP_CLASS_PREFIX) and not sop_class.startswith(
        _NON_IMAGE_SOP_CLASSES
    )


def _required_uid(dataset: Dataset, keyword: str) -> str:
    value = str(dataset.get(keyword, "") or "").strip("\0 ")
    if not value:
        raise BadInstanceError(f"{keyword} is missing")
    return check_uid(value, keyword)


def _optional_int(dataset: Dataset, keyword: str) -> int | None:
    try:
        value = dataset.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None
