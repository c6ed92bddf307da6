"""The local pipeline backend: kfp.local in a worker subprocess, jobs in a SQLite store.

kfp.local keeps global state and patches ``print`` and logging, so it is neither
re-entrant nor thread-safe: every job runs in its own worker process
(``python -m ml_platform.resources.pipeline_runs.local_worker``), started in a session of its
own so that cancelling kills the worker and the component processes under it.

The store outlives every process and keeps Vertex-like records, so the completion sensor
sees jobs started by Dagster, by the CLI or by anyone else on this machine.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from ml_platform.resources.local_files import SqliteFile, write_atomically
from ml_platform.resources.pipeline_runs import (
    TERMINAL_STATES,
    JobAlreadyExistsError,
    JobRequest,
    JobState,
    PipelineJob,
    PipelineJobError,
    PipelineRunner,
    PollPolicy,
)
from ml_platform.resources.templates import TemplateRegistry

LOCAL_JOB_PREFIX = "projects/local/locations/local/pipelineJobs/"
# A local wait ends when the worker does (LocalPipelineRunner.pause); the schedule only bounds
# each wait, so that state changes on the way and the deadline are still seen.
LOCAL_POLL = PollPolicy(initial_interval=0.5, max_interval=5.0, deadline=6 * 3600)
# In each job's folder: the lock its worker holds for as long as it lives.
WORKER_LOCK = "worker.lock"
# How often a wait probes the lock of a worker another process started (a flock: cheap).
_LOCK_PROBE_INTERVAL = 0.05

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
CREATE INDEX IF NOT EXISTS pipeline_jobs_state ON pipeline_jobs (state);
"""


def _now() -> float:
    return time.time()


def _to_datetime(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


class JobStoreError(PipelineJobError):
    """The job store cannot be read or written (a full disk, a read-only data folder)."""


class JobStore:
    """Vertex-like job records in one SQLite file, safe for several processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = SqliteFile(self.path, _SCHEMA, JobStoreError, "pipeline job store")

    def _connect(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._file.connect()

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

    def unfinished(self) -> list[sqlite3.Row]:
        """Jobs that have not ended (a handful at any time: the state is indexed)."""
        with self._connect() as db:
            return db.execute(
                "SELECT * FROM pipeline_jobs WHERE state NOT IN (?, ?, ?)",
                [str(s) for s in TERMINAL_STATES],
            ).fetchall()

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
        links=job_links(json.loads(row["labels"]), row["log_path"]),
    )


def job_links(labels: Mapping[str, str], log_path: str) -> dict[str, str]:
    """Where a person reads a local job's log (the ``log`` link of its materialization).

    A job a Dagster run started: that run's page in the Dagster UI that shows the link, on
    the stderr its step wrote (the step selected as a click on it selects it, ``name:"…"``,
    which makes the page open the step's captured output): the Dagster webserver serves no
    file but its compute logs, and a browser does not follow a ``file://`` link from an http
    page. Relative to the webserver, so it is right on whatever host and port ``dagster dev``
    listens. A job started outside Dagster (the CLI): no Dagster page shows it, so its file,
    for the terminal that started it.
    """
    run_id = labels.get("dagster_run_id")
    if not run_id:
        return {"log": Path(log_path).as_uri()}
    query = {"logType": "stderr"}
    if labels.get("asset"):
        # The asset label is the asset key, sanitized: "/" between its parts became "-";
        # its step (op) joins them with "__".
        step = labels["asset"].replace("-", "__")
        query["selection"] = f'name:"{step}"'
    return {"log": f"/runs/{quote(run_id)}?{urlencode(query)}"}


def hold_worker_lock(job_dir: Path) -> int:
    """Take the job's worker lock; returns its file descriptor. Taken by ``submit`` before the
    job is recorded and handed to the worker, which holds it for as long as it lives: the
    kernel releases it when the worker ends, however it ends (SIGKILL, out of memory)."""
    fd = os.open(job_dir / WORKER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    return fd


def worker_alive(job_dir: str | Path) -> bool:
    """Whether the job's worker still lives: whether anyone holds its lock. Never a guess
    from a pid, which the system may have given to another process since."""
    try:
        fd = os.open(Path(job_dir) / WORKER_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the probe's own lock at once
    return False


def _nothing() -> None:
    pass


def _boot_time() -> float:
    """When this machine booted (processes recorded before then are gone for sure)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def stop_process_group(
    pgid: int, *, grace: float = 0.0, timeout: float = 15.0, reap: Callable[[], None] = _nothing
) -> None:
    """Stop every process of a worker's group (the worker leads it; the components it starts
    belong to it) and return once none is left, so that nothing of the job writes after its
    record says it ended. With ``grace``: SIGTERM, and SIGKILL what is left after it.
    ``reap`` collects the worker if it is this process's child (a zombie still counts)."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, timeout)):
        if wait <= 0:
            continue
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            return
        until = time.monotonic() + wait
        while time.monotonic() < until:
            reap()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


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
        try:
            # Held from before the job is recorded until its worker ends: whoever reads the
            # record can tell at once whether a worker lives for it.
            lock = hold_worker_lock(job_dir)
        except BlockingIOError as error:  # another process is submitting or running it
            raise JobAlreadyExistsError(f"pipeline job {request.job_id} already exists") from error
        try:
            # The worker runs exactly the version that was resolved, from a copy in its folder.
            template_path = job_dir / "pipeline.yaml"
            write_atomically(template_path, self.registry.fetch(request.template))
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
                        pass_fds=(lock,),  # the worker holds the lock from here on
                        # Its own session and process group: a Ctrl-C or SIGTERM for the
                        # Dagster step does not reach it (an interrupted wait cancels it, or a
                        # retry reattaches), and stopping the group stops its components too.
                        start_new_session=True,
                    )
            except BaseException as error:
                # No worker will ever run it: record that, or a retry would reattach and wait.
                self._fail(request.job_id, f"could not start the local worker: {error}")
                raise
        finally:
            os.close(lock)
        self._children[request.job_id] = child
        self.store.update(request.job_id, pid=child.pid)
        return self.get(request.job_id)

    def _fail(self, job_id: str, error: str) -> None:
        """Record that no worker will end the job (unless it ended meanwhile)."""
        self.store.update(
            job_id,
            only_from=[JobState.QUEUED, JobState.PENDING, JobState.RUNNING, JobState.CANCELLING],
            state=str(JobState.FAILED),
            end_time=_now(),
            error=error,
        )

    def _reap(self, job_id: str) -> None:
        child = self._children.get(job_id)
        if child is not None and child.poll() is not None:
            del self._children[job_id]  # reaped, so it cannot linger as a zombie

    def worker_alive(self, job_id: str) -> bool:
        row = self.store.row(job_id)
        self._reap(job_id)
        return row is not None and worker_alive(row["pipeline_root"])

    def _check_worker(self, row: sqlite3.Row) -> sqlite3.Row:
        """A job that has not ended but whose worker is gone is failed, after every process
        of its worker's group (components it started) was stopped."""
        if JobState(row["state"]) in TERMINAL_STATES or worker_alive(row["pipeline_root"]):
            return row
        job_id = row["job_id"]
        self._reap(job_id)
        if row["pid"] is None:
            error = "no local worker was started for it (the submitting process died first)"
        else:
            # Not after a reboot: the system may have given the pid to another process group.
            if row["create_time"] > _boot_time():
                stop_process_group(row["pid"], reap=lambda: self._reap(job_id))
            error = (
                f"the local worker (pid {row['pid']}) exited without recording a result; "
                f"see {row['log_path']}"
            )
        self._fail(job_id, error)
        return self.store.row(job_id)

    def get(self, job_id: str) -> PipelineJob | None:
        row = self.store.row(job_id)
        if row is None:
            return None
        self._reap(job_id)
        return to_pipeline_job(self._check_worker(row))

    def pause(self, job_id: str, seconds: float, sleep: Callable[[float], None]) -> None:
        """Wait on the worker, not on the clock: it records the job's end before it exits,
        so its exit (this process's child) or the release of its lock (a worker another
        process started: a retry reattaching) is the moment to look. ``seconds`` only bounds
        the wait, so that the deadline and state changes along the way are still seen."""
        child = self._children.get(job_id)
        if child is not None:
            with suppress(subprocess.TimeoutExpired):
                child.wait(timeout=seconds)
            return
        row = self.store.row(job_id)
        until = time.monotonic() + seconds
        while row is not None and worker_alive(row["pipeline_root"]):
            if time.monotonic() >= until:
                return
            time.sleep(_LOCK_PROBE_INTERVAL)

    def job_log(self, job_id: str) -> str | None:
        row = self.store.row(job_id)
        if row is None:
            return None
        try:
            return Path(row["log_path"]).read_text(errors="replace")
        except OSError:
            return None

    def cancel(self, job_id: str) -> None:
        row = self.store.row(job_id)
        if row is None or JobState(row["state"]) in TERMINAL_STATES:
            return
        active = [JobState.QUEUED, JobState.PENDING, JobState.RUNNING]
        self.store.update(job_id, only_from=active, state=str(JobState.CANCELLING))
        row = self.store.row(job_id)
        if row["pid"] is not None and row["create_time"] > _boot_time():
            # The worker and its components: SIGTERM, then SIGKILL what is left after 15 s.
            stop_process_group(row["pid"], grace=15.0, reap=lambda: self._reap(job_id))
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
        # Whoever looks fails the jobs whose worker is gone (the sensor every tick, `pipelines
        # list`): a worker killed while nobody waited for it does not stay RUNNING for ever.
        for row in self.store.unfinished():
            self._check_worker(row)
        for row in self.store.query(
            labels=labels, states=states, ended_after=ended_after, page_size=page_size
        ):
            yield to_pipeline_job(row)
