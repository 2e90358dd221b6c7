"""`pacs-node`: serve, classify files, inspect and retry jobs, migrate the database."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pacs_node import __version__
from pacs_node.config import DEFAULT_CONFIG, Settings, load_settings
from pacs_node.errors import ConfigurationError, PacsNodeError
from pacs_node.logs import configure_logging, enable_stack_dumps
from pacs_node.service import STAGES, Node, open_store
from pacs_node.stage_process import StartCancelledError
from pacs_node.stop_signals import StopSignals
from pacs_node.store import Job, JobKind, JobStatus, JobStore

log = logging.getLogger("pacs_node")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIGURATION = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-node",
        description="DICOM node that classifies lung CT series and returns a Structured Report.",
    )
    parser.add_argument("--version", action="version", version=f"pacs-node {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"TOML settings file (default {DEFAULT_CONFIG} when present); "
        "PACS_NODE_<SECTION>__<KEY> environment variables override it",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the node until SIGINT/SIGTERM")
    serve.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated stages to run in this process (default {','.join(STAGES)})",
    )

    classify = commands.add_parser(
        "classify", help="classify DICOM files or folders offline, with the node's own pipeline"
    )
    classify.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    classify.add_argument(
        "--sr", type=Path, metavar="OUT", help="write the SR here (a folder if several series)"
    )
    classify.add_argument("--json", action="store_true", help="print the results as JSON")

    jobs = commands.add_parser("jobs", help="inspect and retry jobs")
    job_commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    listing = job_commands.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--status", choices=["queued", "running", "done", "dead"])
    listing.add_argument("--kind", choices=[str(kind) for kind in JobKind])
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true")
    show = job_commands.add_parser("show", help="one job and its history")
    show.add_argument("job_id", type=int)
    show.add_argument("--json", action="store_true")
    retry = job_commands.add_parser("retry", help="queue a dead job again")
    retry.add_argument("job_id", type=int)

    database = commands.add_parser("db", help="database maintenance")
    db_commands = database.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser("upgrade", help="apply all schema migrations")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    # Received instances, reports and the database hold patient data: whatever
    # the node creates is readable by the service user only.
    os.umask(0o077)
    try:
        settings = load_settings(arguments.config)
    except PacsNodeError as error:
        print(f"pacs-node: {error}", file=sys.stderr)
        return EXIT_CONFIGURATION
    configure_logging(settings.logging.level)
    try:
        if arguments.command == "serve":
            return _serve(
                settings, [stage.strip() for stage in arguments.stages.split(",") if stage.strip()]
            )
        if arguments.command == "classify":
            # Imported on demand: it loads the model, which the other commands never need.
            from pacs_node.classify import run_classify

            return run_classify(settings, arguments.paths, arguments.sr, arguments.json)
        if arguments.command == "jobs":
            return _jobs(settings, arguments)
        return _db(settings)
    except PacsNodeError as error:
        print(f"pacs-node: {error}", file=sys.stderr)
        return EXIT_CONFIGURATION if isinstance(error, ConfigurationError) else EXIT_FAILURE


def _serve(settings: Settings, stages: list[str]) -> int:
    node = Node(settings, stages)
    stop_signals = StopSignals([signal.SIGTERM, signal.SIGINT])
    enable_stack_dumps()
    received: signal.Signals | None = None

    def stop_asked() -> bool:
        nonlocal received
        received = received or stop_signals.wait(0)
        return received is not None

    try:
        node.start(cancelled=stop_asked)
    except StartCancelledError:
        name = received.name if received else "a stop signal"
        log.info(f"received {name} while starting; stopped", extra={"action": "stop"})
        return EXIT_OK
    log.info(f"pacs-node {__version__} ready: {node.describe()}", extra={"action": "ready"})
    try:
        while received is None:
            received = stop_signals.wait()
        log.info(f"received {received.name}, stopping", extra={"action": "stop"})
    finally:
        node.stop()
    return EXIT_OK


def _jobs(settings: Settings, arguments: argparse.Namespace) -> int:
    store = open_store(settings)
    try:
        if arguments.jobs_command == "list":
            jobs = store.list_jobs(
                status=JobStatus(arguments.status) if arguments.status else None,
                kind=JobKind(arguments.kind) if arguments.kind else None,
                limit=arguments.limit,
            )
            if arguments.json:
                print(json.dumps([_job_json(job) for job in jobs], indent=2))
            else:
                _print_job_table(jobs)
            return EXIT_OK
        if arguments.jobs_command == "show":
            job = store.get_job(arguments.job_id)
            if job is None:
                print(f"pacs-node: no job {arguments.job_id}", file=sys.stderr)
                return EXIT_FAILURE
            events = store.job_events(job.id)
            if arguments.json:
                document = _job_json(job)
                document["events"] = [
                    {"at": event.at.isoformat(), "event": event.event, "detail": event.detail}
                    for event in events
                ]
                print(json.dumps(document, indent=2))
            else:
                for key, value in _job_json(job).items():
                    print(f"{key:>20}: {value}")
                print("history:")
                for event in events:
                    print(f"  {event.at.isoformat()}  {event.event}  {event.detail or ''}")
            return EXIT_OK
        job = store.retry(arguments.job_id)
        print(f"job {job.id} ({job.kind}) queued again")
        return EXIT_OK
    finally:
        store.close()


def _job_json(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": str(job.kind),
        "status": str(job.status),
        "series_instance_uid": job.series_instance_uid,
        "revision": job.revision,
        "destination": job.destination,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "run_after": job.run_after.isoformat(),
        "last_error": job.last_error,
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
    }


def _print_job_table(jobs: Sequence[Job]) -> None:
    target = "series / destination"
    print(f"{'id':>6} {'kind':<6} {'status':<8} {'rev':>3} {'tries':>5}  {target:<40} last error")
    for job in jobs:
        target = job.destination or job.series_instance_uid
        print(
            f"{job.id:>6} {job.kind!s:<6} {job.status!s:<8} {job.revision:>3} "
            f"{job.attempts:>2}/{job.max_attempts:<2}  {target[-40:]:<40} {job.last_error or ''}"
        )


def _db(settings: Settings) -> int:
    store = JobStore(settings.database_url)
    try:
        store.upgrade()
    finally:
        store.close()
    print("database schema is up to date")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
