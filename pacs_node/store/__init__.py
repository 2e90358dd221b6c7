"""The job store: instances, series, jobs and results in SQLite or PostgreSQL.

The only code that opens SQLAlchemy sessions; it hands out frozen records.
"""

from pacs_node.store.jobstore import JobStore
from pacs_node.store.records import (
    Instance,
    InstanceOutcome,
    Job,
    JobEvent,
    JobKind,
    JobStatus,
    NewInstance,
    NewResult,
    RecordedInstance,
    Result,
    Series,
    SeriesState,
)

__all__ = [
    "Instance",
    "InstanceOutcome",
    "Job",
    "JobEvent",
    "JobKind",
    "JobStatus",
    "JobStore",
    "NewInstance",
    "NewResult",
    "RecordedInstance",
    "Result",
    "Series",
    "SeriesState",
]
