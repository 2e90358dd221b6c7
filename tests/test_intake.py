"""Which instances become inference work, and which are refused outright."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, SegmentationStorage

from pacs_node.config import IntakeSettings
from pacs_node.errors import BadInstanceError, DatasetMismatchError
from pacs_node.intake import describe
from tests.peers import chest_ct


@pytest.fixture
def ct_slice() -> Dataset:
    return pydicom.dcmread(sorted(chest_ct().glob("*.dcm"))[0])


def test_real_ct_slice_is_classifiable(ct_slice: Dataset) -> None:
    info = describe(ct_slice, IntakeSettings())
    assert info.classifiable and info.exclusion_reason is None
    assert info.series_instance_uid == ct_slice.SeriesInstanceUID
    assert info.instance_number == int(ct_slice.InstanceNumber)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"Modality": "MR", "SOPClassUID": MRImageStorage}, "modality MR"),
        ({"SOPClassUID": SegmentationStorage}, "SOP class"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "LOCALIZER"),
        ({"ImageType": ["DERIVED", "SECONDARY", "scout"]}, "SCOUT"),
        ({"NumberOfFrames": 3}, "multi-frame"),
    ],
)
def test_other_instances_are_stored_but_not_classified(
    ct_slice: Dataset, changes: dict[str, object], reason: str
) -> None:
    for keyword, value in changes.items():
        setattr(ct_slice, keyword, value)
    if "NumberOfFrames" in changes:
        ct_slice.PixelData = ct_slice.PixelData * int(ct_slice.NumberOfFrames)
    info = describe(ct_slice, IntakeSettings())
    assert not info.classifiable
    assert info.exclusion_reason is not None and reason in info.exclusion_reason


def test_image_without_pixel_data_contradicts_its_sop_class(ct_slice: Dataset) -> None:
    del ct_slice.PixelData
    with pytest.raises(DatasetMismatchError, match="no pixel data"):
        describe(ct_slice, IntakeSettings())


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"])
def test_missing_or_hostile_uids_are_refused(ct_slice: Dataset, keyword: str) -> None:
    setattr(ct_slice, keyword, "../../x")
    with pytest.raises(BadInstanceError, match=keyword):
        describe(ct_slice, IntakeSettings())
    delattr(ct_slice, keyword)
    with pytest.raises(BadInstanceError, match=f"{keyword} is missing"):
        describe(ct_slice, IntakeSettings())


def test_intake_rules_are_configurable(ct_slice: Dataset) -> None:
    ct_slice.Modality = "PT"
    settings = IntakeSettings(modalities=["CT", "PT"])
    assert describe(ct_slice, settings).classifiable


def test_pixel_data_shorter_than_its_description_is_refused(ct_slice: Dataset) -> None:
    ct_slice.PixelData = ct_slice.PixelData[:-2]
    with pytest.raises(DatasetMismatchError, match="pixel data is 524286 bytes"):
        describe(ct_slice, IntakeSettings())


def test_pixel_data_longer_than_its_description_is_accepted(ct_slice: Dataset) -> None:
    ct_slice.PixelData = ct_slice.PixelData + b"\0\0"
    assert describe(ct_slice, IntakeSettings()).classifiable


@pytest.mark.parametrize("keyword", ["Rows", "Columns", "BitsAllocated", "SamplesPerPixel"])
def test_image_without_its_pixel_description_is_refused(ct_slice: Dataset, keyword: str) -> None:
    delattr(ct_slice, keyword)
    with pytest.raises(DatasetMismatchError, match=f"lacks {keyword}"):
        describe(ct_slice, IntakeSettings())
