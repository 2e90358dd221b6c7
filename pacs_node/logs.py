"""Stdlib logging with structured fields.

Call sites pass fields with `extra={"action": ..., "series_uid": ...}`; the
formatter appends the known ones as `key=value`, so lines stay greppable.
Patient names, IDs and birth dates are never among the fields: the code logs
UIDs, AE titles, job ids and counts only.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys

FIELDS = (
    "action",
    "peer_ae",
    "peer",
    "job_id",
    "series_uid",
    "sop_uid",
    "status",
    "destination",
    "reason",
    "count",
    # Where a series' time went: waiting (for its last instance, or in the
    # queue), decoding, the model's forward passes, the SR, giving way to
    # C-STOREs between batches, and the whole job.
    "wait_seconds",
    "decode_seconds",
    "forward_seconds",
    "report_seconds",
    "receiving_wait_seconds",
    "seconds",
)


class FieldFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{name}={getattr(record, name)}" for name in FIELDS if hasattr(record, name)]
        return " ".join([line, *fields]) if fields else line


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FieldFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO, and at DEBUG it dumps datasets with
    # patient identity: keep it at WARNING whatever the node's level is.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # highdicom narrates every module it copies into a report at INFO.
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def enable_stack_dumps() -> None:
    """A `serve` process writes every thread's stack to the log on SIGUSR1, and on a
    crash in native code (torch, ONNX Runtime). Why: a node that hangs or dies must
    say where; stacks name code, never data."""
    faulthandler.enable(sys.stderr)
    faulthandler.register(signal.SIGUSR1, sys.stderr, all_threads=True)
