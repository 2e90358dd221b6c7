"""What every job-driven stage does around its own work.

Claim one job; run the stage's `process`; translate the outcome into job
state: done, retried later with backoff (any unexpected error), dead at once
(`PermanentError`), or left alone when the lease was lost to another worker.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pacs_node.backoff import next_attempt_at
from pacs_node.errors import LeaseLostError, PermanentError
from pacs_node.store import Job, JobKind, JobStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Worker:
    """Who claims jobs and on what terms."""

    worker_id: str
    lease_seconds: float
    retry_base_seconds: float
    retry_max_seconds: float


@dataclass(frozen=True)
class Done:
    """A job's work finished: the line to log, and where its seconds went."""

    message: str
    # Log field name -> seconds, e.g. {"forward_seconds": 3.1}; see pacs_node.logs.
    timings: Mapping[str, float] = field(default_factory=dict)


class JobStage(ABC):
    kind: JobKind

    def __init__(self, store: JobStore, worker: Worker) -> None:
        self.store = store
        self.worker = worker

    @abstractmethod
    def process(self, job: Job) -> Done:
        """Do the job's work; return what to log on success."""

    def run_once(self) -> bool:
        """Process one queued job; False when there was none."""
        worker = self.worker
        job = self.store.claim(self.kind, worker.worker_id, worker.lease_seconds)
        if job is None:
            return False
        started = time.monotonic()
        context: dict[str, Any] = {
            "action": str(self.kind),
            "job_id": job.id,
            "series_uid": job.series_instance_uid,
        }
        if job.destination:
            context["destination"] = job.destination
        try:
            done = self.process(job)
        except LeaseLostError:
            log.warning("lease lost; another worker owns the job now", extra=context)
        except PermanentError as error:
            self.store.fail(job.id, worker.worker_id, str(error), retry_at=None)
            log.error(
                f"{self.kind} job failed permanently", extra={"reason": str(error), **context}
            )
        except Exception as error:  # anything else may pass: retry with backoff
            retry_at = next_attempt_at(
                datetime.now(timezone.utc),
                job.attempts,
                worker.retry_base_seconds,
                worker.retry_max_seconds,
            )
            reason = f"{type(error).__name__}: {error}"
            failed = self.store.fail(job.id, worker.worker_id, reason, retry_at)
            log.warning(
                f"{self.kind} job failed (attempt {job.attempts} of {job.max_attempts}), "
                f"now {failed.status}",
                exc_info=not isinstance(error, OSError),
                extra={"reason": reason, **context},
            )
        else:
            # How long the job sat due in the queue (claim time - due time,
            # both the store's clock), then how long its work took.
            seconds = {
                "wait_seconds": (job.updated_at - job.run_after).total_seconds(),
                **done.timings,
                "seconds": time.monotonic() - started,
            }
            timings = {name: f"{value:.2f}" for name, value in seconds.items()}
            log.info(done.message, extra={**timings, **context})
        return True

    def renew(self, job: Job) -> None:
        """Extend the lease during long work; raise if another worker took the job."""
        if not self.store.heartbeat(job.id, self.worker.worker_id, self.worker.lease_seconds):
            raise LeaseLostError(f"lease on job {job.id} expired")


def first_with_work(*stages: JobStage) -> Callable[[], bool]:
    """One step of stages that share a thread: the first of them with a job due runs
    it; False when none had one."""
    return lambda: any(stage.run_once() for stage in stages)
