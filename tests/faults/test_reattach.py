"""A Dagster run killed in the middle of a pipeline job, then run again: the rerun finds the
job the first run submitted and waits for it instead of running the work twice; a new
materialization after success runs a new job. Real runs in processes of their own, killed
with SIGKILL while their job runs, on a slice of the real data."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ml_platform.resources.pipeline_runs import JobState
from ml_platform.resources.pipeline_runs.local import JobStore
from ml_platform.settings import Settings

PROJECT = Path(__file__).resolve().parents[2]
DAY = "2013-10-01"

RUN = textwrap.dedent(
    """
    import sys
    import dagster as dg
    from ml_platform.definitions import defs

    job, partition = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    config = {"ops": {"ingest_nycflights13": {"config": {
        "start_date": "2013-09-01", "end_date": "2013-10-02"}}}}
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def(job).execute_in_process(
            instance=instance,
            partition_key=partition,
            run_config=config if job == "train_flight_delay_model" else None,
            raise_on_error=False,
        )
    print("SUCCESS" if result.success else "FAILED", result.run_id, flush=True)
    """
)


class Place:
    """A local deployment of its own (data folder, Dagster instance), where runs are real."""

    def __init__(self, root: Path) -> None:
        self.env = {
            **os.environ,
            "ML_PLATFORM_DATA_DIR": str(root / "data"),
            "DAGSTER_HOME": str(root / "home"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
        (root / "home").mkdir(parents=True)
        self.settings = Settings.from_env(self.env)
        self.store = JobStore(self.settings.job_store_path)

    def start(self, job: str, partition: str | None = None) -> subprocess.Popen:
        args = [sys.executable, "-c", RUN, job, *([partition] if partition else [])]
        return subprocess.Popen(
            args, env=self.env, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip

    def run(self, job: str, partition: str | None = None) -> str:
        out, _ = self.start(job, partition).communicate(timeout=600)
        status, run_id = out.strip().splitlines()[-1].split()  # dbt prints above it
        assert status == "SUCCESS", out[-3000:]
        return run_id

    def jobs(self, pipeline: str) -> list[dict]:
        with self.store._connect() as db:
            rows = db.execute(
                "SELECT job_id, state, labels FROM pipeline_jobs WHERE pipeline = ? "
                "ORDER BY create_time",
                [pipeline],
            ).fetchall()
        return [dict(row) | {"labels": json.loads(row["labels"])} for row in rows]


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Place:
    place = Place(tmp_path_factory.mktemp("reattach"))
    place.run("train_flight_delay_model")
    return place


def wait_for(predicate, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_rerun_after_a_killed_run_waits_for_its_job_instead_of_scoring_again(place: Place):
    before = len(place.jobs("flight-delay-prediction"))
    first = place.start("score_flights", DAY)
    wait_for(lambda: len(place.jobs("flight-delay-prediction")) > before)
    first.send_signal(signal.SIGKILL)  # the run's process dies; its job's worker lives on
    first.wait()
    (job,) = place.jobs("flight-delay-prediction")[before:]
    place.run("score_flights", DAY)  # a rerun: `make run` again, or the UI

    jobs = place.jobs("flight-delay-prediction")[before:]
    assert [j["job_id"] for j in jobs] == [job["job_id"]]  # no second job for the same work
    assert jobs[0]["state"] == JobState.SUCCEEDED.value


def test_a_new_materialization_after_success_runs_a_new_job(place: Place):
    place.run("score_flights", DAY)
    before = place.jobs("flight-delay-prediction")
    place.run("score_flights", DAY)
    after = place.jobs("flight-delay-prediction")
    assert len(after) == len(before) + 1
    assert after[-1]["state"] == JobState.SUCCEEDED.value
    # Same work (same inputs label), a new job: what ended is never waited for again.
    assert after[-1]["labels"]["inputs"] == before[-1]["labels"]["inputs"]
