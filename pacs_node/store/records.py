"""What the job store hands out and takes in: enums and frozen dataclasses.

ORM rows never leave the store; callers see only these immutable records.
All datetimes are timezone-aware UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any


class TextEnum(str, Enum):
    """A string enum that prints as its value (`enum.StrEnum` needs Python 3.11)."""

    def __str__(self) -> str:
        return str(self.value)


class JobKind(TextEnum):
    # In pipeline order: classify a series revision, write its SR, send the SR.
    INFER = "infer"
    REPORT = "report"
    SEND = "send"


class JobStatus(TextEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    DEAD = "dead"


class SeriesState(TextEnum):
    OPEN = "open"
    # Handed to inference for its current revision.
    COMPLETE = "complete"
    # Completed with no classifiable instance: nothing to infer.
    SKIPPED = "skipped"


class InstanceOutcome(TextEnum):
    NEW = "new"
    IDENTICAL = "identical"
    CHANGED = "changed"


@dataclass(frozen=True)
class RecordedInstance:
    outcome: InstanceOutcome
    # A file no row keeps, for the caller to delete once this is committed: for
    # CHANGED the replaced object's; for IDENTICAL the copy just written of an
    # instance whose file retention removed (its series was reported long ago).
    replaced_path: str | None = None
    # Classifiable instances of the instance's series after this one was recorded;
    # None when the series did not change (IDENTICAL).
    classifiable_in_series: int | None = None


@dataclass(frozen=True)
class NewInstance:
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    transfer_syntax_uid: str
    # Relative to the storage root.
    path: str
    size: int
    sha256: str
    calling_ae: str
    received_at: datetime
    instance_number: int | None
    images_in_acquisition: int | None
    classifiable: bool
    exclusion_reason: str | None
    # Where its uncompressed words lie (models.preprocessing.PixelLayout.to_text);
    # None where the infer stage must parse the file.
    pixel_layout: str | None = None


@dataclass(frozen=True)
class Instance(NewInstance):
    """A stored instance: what was recorded, and whether its file is still kept."""

    # When retention deleted the file (the row stays); None while it is there.
    removed_at: datetime | None = None


@dataclass(frozen=True)
class Series:
    series_instance_uid: str
    study_instance_uid: str
    # The AE that sent the first instance; it selects the quiet period.
    calling_ae: str
    state: SeriesState
    # 0 until the first completion; +1 at each completion.
    revision: int
    instance_count: int
    classifiable_count: int
    first_received_at: datetime
    last_received_at: datetime
    # None while open.
    completed_at: datetime | None
    skip_reason: str | None


@dataclass(frozen=True)
class Job:
    id: int
    kind: JobKind
    status: JobStatus
    series_instance_uid: str
    revision: int
    # REPORT jobs: the result to write the SR of; SEND jobs: the result to send and where to.
    result_id: int | None
    destination: str | None
    attempts: int
    max_attempts: int
    run_after: datetime
    lease_until: datetime | None
    # The worker that claimed it last.
    worker_id: str | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class JobEvent:
    id: int
    job_id: int
    at: datetime
    event: str
    detail: str | None


@dataclass(frozen=True)
class NewResult:
    series_instance_uid: str
    study_instance_uid: str
    revision: int
    model_name: str
    model_version: str
    model_hash: str
    label: str
    probabilities: dict[str, float]
    # JSON-able per-slice evidence.
    slices: list[dict[str, Any]]
    # SOP Instance UIDs of the slices that drove the decision.
    evidence: list[str]
    # The SR's UIDs and file are known before it is written (derived from the
    # series, model version and revision); the REPORT job writes it there.
    sr_sop_instance_uid: str
    sr_series_instance_uid: str
    # Relative to the storage root.
    sr_path: str


@dataclass(frozen=True)
class Result(NewResult):
    """A stored result: what was recorded, its id and when."""

    id: int
    created_at: datetime
