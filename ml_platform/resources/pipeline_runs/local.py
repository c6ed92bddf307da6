"""The local pipeline backend: kfp.local in a worker subprocess, jobs in a SQLite store.

kfp.local keeps global state and patches ``print`` and logging, so it is neither
re-entrant nor thread-safe: every job runs in its own worker process
(``python -m ml_platform.resources.pipeline_runs.local_worker``), started in a session of its
own so that cancelling kills the worker and the component processes under it.

The store outlives every process and keeps Vertex-like records, so the completion sensor
sees jobs started by Dagster, by the CLI or by anyone else on this machine.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing, contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ml_platform.resources.pipeline_runs import (
    TERMINAL_STATES,
    JobAlreadyExistsError,
    JobRequest,
    JobState,
    PipelineJob,
    PipelineRunner,
    PollPolicy,
)
from ml_platform.resources.templates import TemplateRegistry

LOCAL_JOB_PREFIX = "projects/local/locations/local/pipelineJobs/"
# Local jobs take seconds to minutes and polling is a SQLite read: poll often.
LOCAL_POLL = PollPolicy(initial_interval=0.5, max_interval=5.0, deadline=6 * 3600)
# A submit records the job, then starts its worker within milliseconds: a job still without
# a worker after this long never gets one.
UNSTARTED_WORKER_SECONDS = 60

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pipeline_jobs (
    job_id TEXT PRIMARY KEY,
    pipeline TEXT NOT NULL,
    display_name TEXT NOT NULL,
    state TEXT NOT NULL,
    labels TEXT NOT NULL,
    create_time REAL NOT NULL,
    start_time REAL,
    end_time REAL,
    update_time REAL NOT NULL,
    template_uri TEXT NOT NULL,
    template_version TEXT NOT NULL,
    template_path TEXT NOT NULL,
    parameters TEXT NOT NULL,
    outputs TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    pipeline_root TEXT NOT NULL,
    log_path TEXT NOT NULL,
    pid INTEGER
);
CREATE INDEX IF NOT EXISTS pipeline_jobs_end_time ON pipeline_jobs (end_time);
"""


def _now() -> float:
    return time.time()


def _to_datetime(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


class JobStore:
    """Vertex-like job records in one SQLite file, safe for several processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._ready = False

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # Created on first use, so building the Definitions touches no files.
        if not self._ready:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path, timeout=60, isolation_level=None)) as db:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=60000")
            if not self._ready:
                db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
                db.executescript(_SCHEMA)
                self._ready = True
            yield db

    def insert(self, row: Mapping[str, Any]) -> None:
        columns = ", ".join(row)
        marks = ", ".join(f":{c}" for c in row)
        try:
            with self._connect() as db:
                db.execute(f"INSERT INTO pipeline_jobs ({columns}) VALUES ({marks})", dict(row))
        except sqlite3.IntegrityError as error:
            raise JobAlreadyExistsError(f"pipeline job {row['job_id']} already exists") from error

    def update(
        self, job_id: str, *, only_from: Iterable[JobState] | None = None, **values: Any
    ) -> bool:
        """Update a record; with ``only_from``, only while its state is one of those."""
        values["update_time"] = _now()
        assignments = ", ".join(f"{c} = :{c}" for c in values)
        where = "job_id = :job_id"
        params = {**values, "job_id": job_id}
        if only_from is not None:
            states = [str(s) for s in only_from]
            where += f" AND state IN ({', '.join(f':s{i}' for i in range(len(states)))})"
            params.update({f"s{i}": s for i, s in enumerate(states)})
        with self._connect() as db:
            return (
                db.execute(f"UPDATE pipeline_jobs SET {assignments} WHERE {where}", params).rowcount
                == 1
            )

    def row(self, job_id: str) -> sqlite3.Row | None:
        with self._connect() as db:
            return db.execute("SELECT * FROM pipeline_jobs WHERE job_id = ?", [job_id]).fetchone()

    def query(
        self,
        *,
        labels: Mapping[str, str] | None,
        states: Iterable[JobState] | None,
        ended_after: datetime | None,
        page_size: int,
    ) -> Iterator[sqlite3.Row]:
        conditions, params = [], []
        if states is not None:
            states = [str(s) for s in states]
            conditions.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(states)
        if ended_after is not None:
            conditions.append("end_time > ?")
            params.append(ended_after.timestamp())
        for key, value in (labels or {}).items():
            conditions.append("json_extract(labels, ?) = ?")
            params.extend([f'$."{key}"', value])
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        # Keyset paging on (end_time, job_id) keeps every page one indexed query.
        after: tuple[float, str] | None = None
        while True:
            page_where, page_params = where, list(params)
            if after is not None:
                page_where += (
                    " AND " if page_where else "WHERE "
                ) + "(coalesce(end_time, 0), job_id) > (?, ?)"
                page_params.extend(after)
            with self._connect() as db:
                rows = db.execute(
                    f"SELECT * FROM pipeline_jobs {page_where} "
                    "ORDER BY coalesce(end_time, 0), job_id LIMIT ?",
                    [*page_params, page_size],
                ).fetchall()
            yield from rows
            if len(rows) < page_size:
                return
            last = rows[-1]
            after = (last["end_time"] or 0, last["job_id"])


def to_pipeline_job(row: sqlite3.Row) -> PipelineJob:
    return PipelineJob(
        name=LOCAL_JOB_PREFIX + row["job_id"],
        job_id=row["job_id"],
        pipeline=row["pipeline"],
        state=JobState(row["state"]),
        labels=json.loads(row["labels"]),
        create_time=_to_datetime(row["create_time"]),
        start_time=_to_datetime(row["start_time"]),
        end_time=_to_datetime(row["end_time"]),
        template_uri=row["template_uri"],
        template_version=row["template_version"],
        parameters=json.loads(row["parameters"]),
        outputs=json.loads(row["outputs"]),
        error=row["error"],
        links={"log": Path(row["log_path"]).as_uri()},
    )


def _worker_alive(pid: int | None, job_id: str) -> bool:
    """Is the worker for ``job_id`` still running? (The pid alone could have been reused.)"""
    if pid is None:
        return False
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            status = (proc / "status").read_text()
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
        # The worker's last argument is its job id (not just a part of it: nap-1-retry1).
        return cmdline.split("\0")[-2:-1] == [job_id] and "State:\tZ" not in status
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


class LocalPipelineRunner(PipelineRunner):
    """Runs compiled pipeline templates with kfp.local, one worker process per job."""

    def __init__(
        self,
        store_path: str | Path,
        pipeline_root: str | Path,
        registry: TemplateRegistry,
        poll: PollPolicy = LOCAL_POLL,
    ) -> None:
        self.store = JobStore(store_path)
        self.pipeline_root = Path(pipeline_root)
        self.registry = registry
        self.poll = poll
        self._children: dict[str, subprocess.Popen] = {}

    def submit(self, request: JobRequest) -> PipelineJob:
        job_dir = self.pipeline_root / request.job_id
        job_dir.mkdir(parents=True, exist_ok=True)
        # The worker runs exactly the version that was resolved, from a copy in the job's folder.
        template_path = job_dir / "pipeline.yaml"
        template_path.write_bytes(self.registry.fetch(request.template))
        log_path = job_dir / "job.log"
        now = _now()
        self.store.insert(
            {
                "job_id": request.job_id,
                "pipeline": request.pipeline,
                "display_name": request.display_name or request.job_id,
                "state": str(JobState.QUEUED),
                "labels": json.dumps(dict(request.labels), sort_keys=True),
                "create_time": now,
                "update_time": now,
                "template_uri": request.template.uri,
                "template_version": request.template.version,
                "template_path": str(template_path),
                "parameters": json.dumps(dict(request.parameters), sort_keys=True),
                "pipeline_root": str(job_dir),
                "log_path": str(log_path),
            }
        )
        try:
            with log_path.open("ab") as log:
                child = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "ml_platform.resources.pipeline_runs.local_worker",
                        str(self.store.path),
                        request.job_id,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Its own session: a Ctrl-C or SIGTERM for the Dagster step does not
                    # reach it, so an interrupted wait can cancel it, or a retry reattach.
                    start_new_session=True,
                )
        except BaseException as error:
            # No worker will ever run it: record that, or a retry would reattach and wait.
            self._fail(request.job_id, f"could not start the local worker: {error}")
            raise
        self._children[request.job_id] = child
        self.store.update(request.job_id, pid=child.pid)
        return self.get(request.job_id)

    def _fail(self, job_id: str, error: str) -> None:
        """Record that no worker will end the job (unless it ended meanwhile)."""
        self.store.update(
            job_id,
            only_from=[JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING],
            state=str(JobState.FAILED),
            end_time=_now(),
            error=error,
        )

    def get(self, job_id: str) -> PipelineJob | None:
        row = self.store.row(job_id)
        if row is None:
            return None
        child = self._children.get(job_id)
        if child is not None and child.poll() is not None:
            del self._children[job_id]  # reaped, so it cannot linger as a zombie
        running = JobState(row["state"]) not in TERMINAL_STATES
        # No pid yet means the submit is still under way, not that the worker died; unless
        # it has been so for long (the submitting process died before starting the worker).
        if (
            running
            and row["pid"] is None
            and _now() - row["create_time"] > UNSTARTED_WORKER_SECONDS
        ):
            self._fail(
                job_id,
                f"no local worker was started within {UNSTARTED_WORKER_SECONDS} s of its "
                "submission (the submitting process died?)",
            )
            row = self.store.row(job_id)
        elif running and row["pid"] is not None and not _worker_alive(row["pid"], job_id):
            # The worker died without recording an end (killed, out of memory).
            self._fail(
                job_id,
                f"the local worker (pid {row['pid']}) exited without recording a result; "
                f"see {row['log_path']}",
            )
            row = self.store.row(job_id)
        return to_pipeline_job(row)

    def cancel(self, job_id: str) -> None:
        row = self.store.row(job_id)
        if row is None or JobState(row["state"]) in TERMINAL_STATES:
            return
        active = [JobState.QUEUED, JobState.PENDING, JobState.RUNNING]
        self.store.update(job_id, only_from=active, state=str(JobState.CANCELLING))
        pid = row["pid"]
        if pid is not None and _worker_alive(pid, job_id):
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while _worker_alive(pid, job_id) and time.monotonic() < deadline:
                child = self._children.get(job_id)
                if child is not None:
                    child.poll()
                time.sleep(0.1)
            if _worker_alive(pid, job_id):
                with suppress(ProcessLookupError):  # it may have ended just now
                    os.killpg(pid, signal.SIGKILL)
        self.store.update(
            job_id,
            only_from=[JobState.CANCELLING],
            state=str(JobState.CANCELLED),
            end_time=_now(),
            error="cancelled",
        )

    def list_jobs(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        states: Iterable[JobState] | None = None,
        ended_after: datetime | None = None,
        page_size: int = 100,
    ) -> Iterator[PipelineJob]:
        for row in self.store.query(
            labels=labels, states=states, ended_after=ended_after, page_size=page_size
        ):
            yield to_pipeline_job(row)
