"""Runs of the local deployment: launched through the instance's queue, as the UI launches
them, and watched for run workers that died.

- ``LocalRunLauncher`` (``dagster_home/dagster.yaml``): Dagster's default run launcher, plus
  the health check its run monitoring needs. A run whose worker is gone (killed, out of
  memory, a closed terminal) is failed within the monitoring interval, instead of staying
  STARTED and holding the queue's only slot for ever.
- ``QueueDaemon``, ``launch`` and ``wait_for``: how `ml-platform materialize` runs jobs. They
  are submitted through the instance's queue, so they carry the code location's origin and
  show under their jobs in the UI, and a daemon executes them: `make dev`'s if one runs, else
  one of the command's own, for as long as the command lives.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import dagster as dg

# Private, no public API: the result of a run launcher's health check (dagster-aws's ECS run
# launcher, the one other implementation, imports the same names from here).
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

# The daemon that dequeues runs; its first heartbeat says a daemon started here is up.
QUEUE_DAEMON = "QUEUED_RUN_COORDINATOR"
DAEMON_START_SECONDS = 180.0
BIN = Path(sys.executable).parent
# On every run `ml-platform materialize` submits: "PID:START" of the command that waits for it.
SUBMITTER_TAG = "ml_platform/submitted_by"
PENDING = {
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
}
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


class LaunchError(RuntimeError):
    """A run could not be submitted (an unknown job, a bad partition or run config)."""


class LocalRunLauncher(dg.DefaultRunLauncher):
    """Dagster's default run launcher, whose run workers run monitoring can check."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        worker = run_worker(self._instance, run.run_id)
        if worker is None:  # not started yet: run monitoring's start timeout covers that
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no run worker yet")
        if worker.alive:
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        return CheckRunHealthResult(
            WorkerStatus.FAILED,
            f"its run worker (pid {worker.pid}) ended without ending the run (killed, out of "
            "memory, or its terminal closed)",
        )


@dataclass(frozen=True)
class RunWorker:
    pid: int
    started: float  # when it said it had started (the event's timestamp)
    exited: bool

    @property
    def alive(self) -> bool:
        """Whether the process is still the run's worker: it lives, and it is not another
        process given the same pid since (one started after the worker said it had)."""
        return not self.exited and _process_alive(self.pid, self.started)


def _process_alive(pid: int, started: float) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` (not a reuse)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= started + 1
    except psutil.Error:
        return False


def _this_process() -> str:
    import psutil

    return f"{psutil.Process().pid}:{psutil.Process().create_time()}"


def cancel_abandoned(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    """Cancel the queued runs of a `materialize` that is gone (killed before they started): the
    command that wanted them will never wait for them, and a rerun submits its own."""
    canceled = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED])):
        submitter = run.tags.get(SUBMITTER_TAG)
        if submitter is None:
            continue  # the UI's, a sensor's: the queue's to run
        pid, _, started = submitter.partition(":")
        if not _process_alive(int(pid), float(started)):
            instance.report_run_canceled(
                run, "the `ml-platform materialize` that submitted it is gone"
            )
            canceled.append(run)
    return canceled


def _unowned_pending(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    """Runs waiting for a daemon that no `materialize` waits for: the UI's, a sensor's."""
    pending = instance.get_runs(filters=dg.RunsFilter(statuses=list(PENDING)))
    return [run for run in pending if SUBMITTER_TAG not in run.tags]


def run_worker(instance: dg.DagsterInstance, run_id: str) -> RunWorker | None:
    """The run's worker process, from the engine events it wrote ("Started process for run
    (pid: N)", then "Process for run exited"); None before it started."""
    worker = None
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        data = entry.dagster_event.engine_event_data if entry.dagster_event else None
        pid = (data.metadata or {}).get("pid") if data else None
        if entry.message.startswith("Started process for run") and pid is not None:
            worker = RunWorker(int(pid.value), entry.timestamp, exited=False)
        elif entry.message.startswith("Process for run exited") and worker is not None:
            worker = RunWorker(worker.pid, worker.started, exited=True)
    return worker


def _daemon_serves(home: Path) -> bool:
    """Whether a Dagster daemon process serves the instance in ``home``: `dagster dev`'s (which
    runs ``python -m dagster._daemon run``) or another command's ``dagster-daemon run``.

    Not its heartbeats: a daemon stopped a moment ago still has a fresh one, and two daemons
    on one instance are not supported.
    """
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        daemon = any(part.endswith(("dagster-daemon", "dagster._daemon")) for part in command[:3])
        if not daemon or "run" not in command:
            continue
        try:
            their_home = process.environ().get("DAGSTER_HOME")
        except psutil.Error:
            continue
        if their_home and Path(their_home).resolve() == home.resolve():
            return process.status() != psutil.STATUS_ZOMBIE
    return False


def _daemon_started(instance: dg.DagsterInstance, since: float) -> bool:
    heartbeat = instance.get_daemon_heartbeats().get(QUEUE_DAEMON)
    return heartbeat is not None and heartbeat.timestamp > since


def _end_with_parent() -> None:
    # Linux: the daemon gets SIGTERM when the command that started it dies, however it dies
    # (SIGKILL included): no daemon is left running on its own.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class QueueDaemon:
    """A daemon executing the instance's queue while a command waits for its runs: the one
    that already serves it (`make dev`'s, another `make run`'s), else one of the command's
    own, which dies with it. ``ensure`` starts one again if the daemon relied on has stopped
    meanwhile (the other command ended), so no queued run is stranded."""

    def __init__(
        self, instance: dg.DagsterInstance, *, workspace: Path, env: Mapping[str, str], log: IO[str]
    ) -> None:
        self.instance = instance
        self.workspace = workspace
        self.env = dict(env)
        self.home = Path(env["DAGSTER_HOME"])
        self.log = log
        self._own: subprocess.Popen | None = None
        self._lock: int | None = None

    def __enter__(self) -> QueueDaemon:
        self.ensure()
        return self

    def __exit__(self, error_type: type | None, *_: object) -> None:
        if error_type is None:
            self.finish()
        self.stop()

    def finish(self) -> None:
        """Before this command's own daemon stops: run what else it was given to run (a
        refresh the completion sensor queued meanwhile, a run launched from the UI), which
        would otherwise wait QUEUED for the next daemon. A sensor tick can still submit while
        the daemon stops, so the queue is looked at again once it has."""
        for _ in range(3):
            if self._own is None:
                return  # another's daemon serves: it runs the queue after this command
            while pending := _unowned_pending(self.instance):
                wait_for(self.instance, pending[0].run_id, daemon=self)
            self.stop()
            if not _unowned_pending(self.instance):
                return
            self.ensure()

    def ensure(self) -> None:
        if self._own is not None and self._own.poll() is None:
            return
        self.stop()
        if _daemon_serves(self.home):
            return
        # One command at a time starts a daemon (two at once would run two: not supported);
        # it holds this lock for as long as its daemon runs.
        lock = os.open(self.home / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another command's daemon is starting: it will serve
            os.close(lock)
            return
        self._lock = lock
        self._start()

    def _start(self) -> None:
        started = time.time()
        self._own = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", str(self.workspace)],
            cwd=self.workspace.parent,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=_end_with_parent,
        )
        deadline = time.monotonic() + DAEMON_START_SECONDS
        while not _daemon_started(self.instance, since=started):
            if self._own.poll() is not None:
                raise LaunchError(f"the Dagster daemon exited at once; see {self.log.name}")
            if time.monotonic() > deadline:
                self.stop()
                raise LaunchError(f"the Dagster daemon did not start; see {self.log.name}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self._own is not None:
            self._own.terminate()
            try:
                self._own.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._own.kill()
                self._own.wait()
            self._own = None
        if self._lock is not None:
            os.close(self._lock)  # releases it
            self._lock = None


def launch(
    jobs: Sequence[tuple[str, str | tuple[str, str] | None]],
    *,
    workspace: Path,
    location: str,
    env: Mapping[str, str],
    log: IO[str],
) -> list[str]:
    """Submit runs of ``(job, partition)`` to the instance's queue, in this order, through
    Dagster's GraphQL API (`dagster-graphql`, the UI's own way); returns their run ids. A
    partition ``(first, last)`` is a range, one run for all of it, as the UI launches a
    single-run backfill."""
    document = "mutation Launch({}) {{ {} }}".format(
        ", ".join(f"$p{i}: ExecutionParams!" for i in range(len(jobs))),
        " ".join(
            f"r{i}: launchRun(executionParams: $p{i}) {{ __typename "
            "... on LaunchRunSuccess { run { runId } } ... on Error { message } }"
            for i in range(len(jobs))
        ),
    )
    variables: dict[str, Any] = {}
    for i, (job, partition) in enumerate(jobs):
        tags = [{"key": SUBMITTER_TAG, "value": _this_process()}]
        if isinstance(partition, tuple):
            tags.append({"key": "dagster/asset_partition_range_start", "value": partition[0]})
            tags.append({"key": "dagster/asset_partition_range_end", "value": partition[1]})
        elif partition:
            tags.append({"key": "dagster/partition", "value": partition})
        variables[f"p{i}"] = {
            "selector": {
                "repositoryLocationName": location,
                "repositoryName": "__repository__",
                "jobName": job,
            },
            "executionMetadata": {"tags": tags},
        }
    command = [str(BIN / "dagster-graphql"), "-w", str(workspace), "-t", document]
    done = subprocess.run(
        [*command, "-v", json.dumps(variables)],
        env=dict(env),
        cwd=workspace.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    log.write(done.stderr)
    answer = next(
        (json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"')), None
    )
    if done.returncode != 0 or answer is None or "data" not in answer:
        log.write(done.stdout)
        raise LaunchError(f"could not submit {jobs[0][0]} to the Dagster instance; see {log.name}")
    run_ids = []
    for i, (job, partition) in enumerate(jobs):
        result = answer["data"][f"r{i}"]
        if result["__typename"] != "LaunchRunSuccess":
            what = f"{job} [{'..'.join(partition) if isinstance(partition, tuple) else partition}]"
            what = what if partition else job
            raise LaunchError(f"could not launch {what}: {result.get('message', result)}")
        run_ids.append(result["run"]["runId"])
    return run_ids


def wait_for(
    instance: dg.DagsterInstance,
    run_id: str,
    *,
    daemon: QueueDaemon | None = None,
    interval: float = 0.5,
    on_step: Callable[[str], None] | None = None,
) -> dg.DagsterRun:
    """The run, once it has ended (succeeded, failed or canceled); meanwhile ``daemon`` is
    kept serving the queue, and ``on_step`` is told each step's key as the step starts."""
    checked = time.monotonic()
    cursor = None
    while True:
        run = instance.get_run_by_id(run_id)
        if on_step is not None:
            started = instance.get_records_for_run(
                run_id, cursor=cursor, of_type=dg.DagsterEventType.STEP_START
            )
            cursor = started.cursor
            for record in started.records:
                on_step(record.event_log_entry.step_key)
        if run is not None and run.status in FINISHED:
            return run
        if daemon is not None and time.monotonic() - checked > 5:
            daemon.ensure()
            checked = time.monotonic()
        time.sleep(interval)
