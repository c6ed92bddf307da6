"""The completion sensor on the local backend: a real Dagster instance, the real job store.

Ended jobs are written to the job store the way the local worker records them (no kfp run
is needed to test what the sensor does with an ended job); the sensor is evaluated tick by
tick with its cursor carried over, as the daemon does.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef
from dagster._core.test_utils import create_run_for_test

from ml_platform import sensors
from ml_platform.definitions import build_definitions
from ml_platform.resources.alerts import Alerts
from ml_platform.resources.pipeline_runs.local import JobStore
from ml_platform.sensors import REPORTING_JOB, REPORTING_MARKER, SENSOR_NAME
from ml_platform.settings import Settings
from tests.model_metrics import TRAINING_METRICS

PNG = b"\x89PNG\r\n\x1a\nnot really a plot"


class RecordingAlerts(Alerts):
    """Stands in for Slack (an outside system): keeps what would have been posted."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def send(self, title: str, text: str, links: Mapping[str, str] | None = None) -> None:
        self.sent.append((title, text))


@dataclass
class World:
    settings: Settings
    instance: dg.DagsterInstance
    store: JobStore
    defs: dg.Definitions
    alerts: RecordingAlerts = field(default_factory=RecordingAlerts)
    cursor: str | None = None

    def add_job(
        self,
        *,
        pipeline: str = "flight-delay-prediction",
        state: str = "SUCCEEDED",
        ended: float | None = None,
        dagster_run_id: str | None = None,
        day: str = "2013-10-01",
        job_id: str | None = None,
    ) -> str:
        job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
        ended = time.time() if ended is None else ended
        asset = (
            "flight_delay_model"
            if pipeline == "flight-delay-training"
            else ("flight_delay_predictions")
        )
        labels = self.settings.job_labels(
            asset=asset, partition=None if asset == "flight_delay_model" else day,
            run_id=dagster_run_id,
        )  # fmt: skip
        if pipeline == "flight-delay-training":
            plot = self.settings.data_dir / f"{job_id}.png"
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot.write_bytes(PNG)
            parameters = {"cutoff_date": "2013-10-01", "champion_model_uri": ""}
            outputs = {
                "model": {"uri": f"/models/{job_id}", "metadata": {"version": "sha256:abc"}},
                "metrics": {"metadata": TRAINING_METRICS},
                "evaluation_plot": {"uri": str(plot), "metadata": {}},
            }
        else:
            parameters = {"flight_date": day, "model_uri": "/models/m1"}
            outputs = {"rows": 950, "mean_probability": 0.2, "model_version": "sha256:abc"}
        self.store.insert(
            {
                "job_id": job_id,
                "pipeline": pipeline,
                "display_name": job_id,
                "state": f"PIPELINE_STATE_{state}",
                "labels": json.dumps(labels),
                "create_time": ended - 60,
                "start_time": ended - 50,
                "end_time": ended,
                "update_time": ended,
                "template_uri": "/templates/x.yaml",
                "template_version": "sha256:0123",
                "template_path": "/templates/x.yaml",
                "parameters": json.dumps(parameters),
                "outputs": json.dumps(outputs if state == "SUCCEEDED" else {}),
                "error": None if state == "SUCCEEDED" else f"task score_flights: {state.lower()}",
                "pipeline_root": "/root",
                "log_path": f"/root/{job_id}/job.log",
            }
        )
        return job_id

    def tick(self, *, commit: bool = True):
        sensor = self.defs.resolve_sensor_def(SENSOR_NAME)
        # The resources the sensor asks for, as the daemon gives it (not every resource).
        resources = {
            "pipeline_runner": self.defs.resources["pipeline_runner"],
            "artifacts": self.defs.resources["artifacts"],
            "model_registry": self.defs.resources["model_registry"],
            "alerts": self.alerts,
        }
        context = dg.build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources=resources, definitions=self.defs
        )
        result = sensor.evaluate_tick(context)
        if commit:
            self.cursor = result.cursor
            for event in result.asset_events:
                self.instance.report_runless_asset_event(event)
        return result

    def dagster_run(self, status: dg.DagsterRunStatus) -> str:
        run = create_run_for_test(self.instance, job_name="score_flights", status=status)
        return run.run_id

    def finish(self, run_id: str) -> None:
        self.instance.report_run_failed(self.instance.get_run_by_id(run_id))

    def refresh_reporting(self) -> None:
        self.instance.report_runless_asset_event(dg.AssetMaterialization(REPORTING_MARKER))


def make_world(root: Path, instance: dg.DagsterInstance) -> World:
    settings = Settings.from_env(
        {"ML_PLATFORM_DATA_DIR": str(root / "data"), "DAGSTER_HOME": str(root / "home")}
    )
    return World(settings, instance, JobStore(settings.job_store_path), build_definitions(settings))


@pytest.fixture
def world(tmp_path: Path):
    with dg.instance_for_test() as instance:
        yield make_world(tmp_path, instance)


def run_keys(result) -> list[str]:
    return [request.run_key for request in result.run_requests]


def test_a_prediction_job_from_outside_dagster_is_recorded_and_refreshes_reporting(world):
    job_id = world.add_job(day="2013-12-01")
    result = world.tick()
    assert run_keys(result) == [f"projects/local/locations/local/pipelineJobs/{job_id}"]
    assert result.run_requests[0].job_name == REPORTING_JOB
    assert result.run_requests[0].tags["ml_platform/flight_date"] == "2013-12-01"
    (event,) = result.asset_events
    assert event.asset_key == dg.AssetKey("flight_delay_predictions")
    assert event.partition == "2013-12-01"
    assert event.metadata["dagster/row_count"].value == 950
    assert event.metadata["pipeline_job_id"].value == job_id
    assert "log_link" in event.metadata
    # Nothing new: nothing more, however often it ticks.
    assert run_keys(world.tick()) == [] and run_keys(world.tick()) == []


def test_failed_and_cancelled_jobs_refresh_nothing_and_are_reported(world, caplog):
    failed = world.add_job(state="FAILED")
    cancelled = world.add_job(state="CANCELLED")
    result = world.tick()
    assert run_keys(result) == [] and result.asset_events == []
    titles = [title for title, _ in world.alerts.sent]
    assert titles == [f"Pipeline job failed: {failed}", f"Pipeline job cancelled: {cancelled}"]
    assert world.alerts.sent[0][1] == "task score_flights: failed"
    assert run_keys(world.tick()) == [] and len(world.alerts.sent) == 2  # reported once


def test_a_job_it_cannot_read_is_reported_once_and_skipped(world):
    # Outputs its template did not declare (an older template): a KeyError while reading.
    unreadable = world.add_job(day="2013-12-01")
    with world.store._connect() as db:
        db.execute("UPDATE pipeline_jobs SET outputs = '{}' WHERE job_id = ?", [unreadable])
    readable = world.add_job(day="2013-12-02")
    result = world.tick()
    assert run_keys(result) == [f"projects/local/locations/local/pipelineJobs/{readable}"]
    assert world.alerts.sent == [(f"Pipeline job not recorded: {unreadable}", "KeyError: 'rows'")]
    assert run_keys(world.tick()) == [] and len(world.alerts.sent) == 1


def test_a_bug_of_ours_fails_the_tick_loudly_and_marks_nothing_handled(world, monkeypatch):
    job_id = world.add_job(day="2013-12-01")

    def broken(*_):  # a programming error in our own code, not a job we cannot read
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(sensors, "predictions_metadata", broken)
    with pytest.raises(Exception, match="unsupported operand"):
        world.tick()
    assert world.alerts.sent == [] and world.cursor is None  # no alert, nothing handled
    monkeypatch.undo()  # the bug is fixed: the same job is handled on the next tick
    assert run_keys(world.tick()) == [f"projects/local/locations/local/pipelineJobs/{job_id}"]


def test_a_job_of_a_running_dagster_run_waits_for_it(world):
    run_id = world.dagster_run(dg.DagsterRunStatus.STARTED)
    job_id = world.add_job(dagster_run_id=run_id)
    assert run_keys(world.tick()) == []  # the run may still refresh the reporting itself
    assert json.loads(world.cursor)["waiting"].keys() == {job_id}
    world.finish(run_id)  # ... it did not
    assert run_keys(world.tick()) == [f"projects/local/locations/local/pipelineJobs/{job_id}"]
    assert run_keys(world.tick()) == []
    # Its run recorded the materialization itself; the sensor adds none.


def test_a_waited_for_job_that_is_deleted_is_no_longer_waited_for(world):
    run_id = world.dagster_run(dg.DagsterRunStatus.STARTED)
    job_id = world.add_job(dagster_run_id=run_id, ended=time.time() - 3600)  # before the window
    world.add_job()  # a later one moves the window past it
    world.tick()
    assert json.loads(world.cursor)["waiting"].keys() == {job_id}
    with world.store._connect() as db:
        db.execute("DELETE FROM pipeline_jobs WHERE job_id = ?", [job_id])
    assert run_keys(world.tick()) == []
    assert json.loads(world.cursor)["waiting"] == {}


def test_a_dagster_run_that_refreshed_the_reporting_needs_nothing_more(world):
    run_id = world.dagster_run(dg.DagsterRunStatus.SUCCESS)
    world.add_job(dagster_run_id=run_id, ended=time.time() - 5)
    world.refresh_reporting()  # the same run went on to the reporting models
    result = world.tick()
    assert run_keys(result) == [] and result.asset_events == []
    assert run_keys(world.tick()) == []


def test_a_training_job_from_outside_dagster_is_recorded_on_the_model(world):
    job_id = world.add_job(pipeline="flight-delay-training")
    result = world.tick()
    assert run_keys(result) == []  # a new model does not change the reporting
    materialization, *checks = result.asset_events
    assert materialization.asset_key == dg.AssetKey("flight_delay_model")
    assert materialization.metadata["model_uri"].value == f"/models/{job_id}"
    assert materialization.metadata["beats_baseline"].value is True
    assert materialization.metadata["evaluation_plot"].value.startswith("![evaluation]")
    assert {(c.check_name, c.passed) for c in checks} == {
        ("beats_baseline", True),
        ("beats_champion", True),  # there was no champion
    }
    # It is registered and, the first model to beat the baseline, the champion: predictions
    # now score with it, as with a model trained by Dagster.
    from ml_platform.assets.predictions import champion

    registry = world.defs.resources["model_registry"]
    assert champion(registry).artifact_uri == f"/models/{job_id}"
    assert materialization.metadata["registry_version"].value == champion(registry).version
    # A tick evaluated again (it failed after registering) registers nothing new.
    world.cursor = None
    world.tick()
    assert len(registry.list_versions()) == 1


def test_a_job_whose_end_is_recorded_late_is_caught_by_the_lookback(world):
    now = time.time()
    first = world.add_job(ended=now)
    assert len(world.tick().run_requests) == 1
    late = world.add_job(ended=now - 600)  # ended before `first`, recorded after the tick
    assert run_keys(world.tick()) == [f"projects/local/locations/local/pipelineJobs/{late}"]
    assert first != late and run_keys(world.tick()) == []


def test_a_job_at_the_edge_of_the_lookback_is_not_handled_twice(world):
    # The store keeps end times as float seconds, the cursor (datetime) in microseconds and
    # Vertex in nanoseconds: a job that ended a hair after the window's start is still listed
    # after the cursor, rounding its end down, would already have forgotten it.
    lookback = world.settings.sensor_lookback_seconds
    edge = float(int(time.time()) - 3 * lookback) + 4e-7  # rounds down to a whole second
    first = world.add_job(ended=edge)
    world.add_job(ended=edge + lookback)  # the window now starts exactly at `first`'s end
    assert len(world.tick().run_requests) == 2
    assert run_keys(world.tick()) == [] and run_keys(world.tick()) == []
    assert first in json.loads(world.cursor)["handled"]


def test_a_job_of_another_deployment_or_pipeline_is_ignored(world):
    job_id = world.add_job()
    with world.store._connect() as db:  # a job another deployment recorded in a shared store
        db.execute(
            "UPDATE pipeline_jobs SET labels = json_set(labels, '$.deployment', 'prod') "
            "WHERE job_id = ?",
            [job_id],
        )
    world.add_job(pipeline="someone-elses-pipeline")
    result = world.tick()
    assert run_keys(result) == [] and result.asset_events == []


SUBPROCESS_TICK = textwrap.dedent(
    """
    import json, sys
    import dagster as dg
    from ml_platform.definitions import build_definitions
    from ml_platform.sensors import SENSOR_NAME
    from ml_platform.settings import get_settings

    defs = build_definitions(get_settings())
    with dg.DagsterInstance.get() as instance:
        context = dg.build_sensor_context(
            instance=instance, cursor=sys.argv[1] or None, resources=defs.resources,
            definitions=defs,
        )
        result = defs.resolve_sensor_def(SENSOR_NAME).evaluate_tick(context)
    print(json.dumps({"keys": [r.run_key for r in result.run_requests], "cursor": result.cursor}))
    """
)


def test_a_restarted_sensor_process_with_the_same_cursor_requests_nothing_twice(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "ML_PLATFORM_DATA_DIR": str(tmp_path / "data")}

    def tick_in_a_new_process(cursor: str) -> dict:
        done = subprocess.run(
            [sys.executable, "-c", SUBPROCESS_TICK, cursor],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return json.loads(done.stdout.strip().splitlines()[-1])

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        world = make_world(tmp_path, instance)
        first = world.add_job()
        tick = tick_in_a_new_process("")
        assert tick["keys"] == [f"projects/local/locations/local/pipelineJobs/{first}"]
        # The sensor process is restarted; a new job ended meanwhile.
        second = world.add_job()
        again = tick_in_a_new_process(tick["cursor"])
        assert again["keys"] == [f"projects/local/locations/local/pipelineJobs/{second}"]
        assert tick_in_a_new_process(again["cursor"])["keys"] == []


def test_a_thousand_ticks_of_jobs_arriving_failing_and_ending_late(world):
    """Exactly one reporting refresh per succeeded prediction job, none per failed one."""
    rng = random.Random(20131001)
    lookback = world.settings.sensor_lookback_seconds
    # Simulated time: a tick every 30 s over the last ~9 hours, so the lookback window holds
    # about 120 ticks of jobs (real time would squeeze all 1,000 ticks into one window).
    # Whole seconds plus a hair that rounds away in microseconds: jobs end exactly one
    # lookback apart, at the window's edge (test_a_job_at_the_edge_of_the_lookback...).
    now = float(int(time.time()) - 1000 * 30) + 4e-7
    succeeded, failed, by_dagster = [], [], {}
    requested: Counter[str] = Counter()
    running_runs: list[str] = []
    for _ in range(1000):
        now += 30
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            state = rng.choices(["SUCCEEDED", "FAILED", "CANCELLED"], [8, 1, 1])[0]
            # Some jobs record their end late: up to most of the lookback window ago.
            ended = now - (rng.uniform(0, lookback * 0.8) if rng.random() < 0.2 else 0)
            run_id = None
            if rng.random() < 0.4:
                status = rng.choice([dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.SUCCESS])
                run_id = world.dagster_run(status)
                if status is dg.DagsterRunStatus.STARTED:
                    running_runs.append(run_id)
            pipeline = "flight-delay-training" if rng.random() < 0.05 else "flight-delay-prediction"
            job_id = world.add_job(
                state=state, ended=ended, dagster_run_id=run_id, pipeline=pipeline
            )
            if pipeline == "flight-delay-prediction":
                (succeeded if state == "SUCCEEDED" else failed).append(job_id)
                if run_id:
                    by_dagster[job_id] = ended
        if running_runs and rng.random() < 0.3:
            world.finish(running_runs.pop(rng.randrange(len(running_runs))))
        if rng.random() < 0.05:
            world.refresh_reporting()  # some Dagster run refreshed the reporting
        if rng.random() < 0.1:
            world.tick(commit=False)  # a tick whose cursor was never stored: it repeats
        for key in run_keys(world.tick()):
            requested[key.rsplit("/", 1)[-1]] += 1
    for run_id in running_runs:  # every run ends eventually ...
        world.finish(run_id)
    for key in run_keys(world.tick()):  # ... and the sensor catches up
        requested[key.rsplit("/", 1)[-1]] += 1

    assert len(succeeded) > 800 and len(failed) > 100
    assert max(requested.values()) == 1, "a job refreshed the reporting twice"
    assert not set(requested) & set(failed), "a failed job refreshed the reporting"
    skipped = [job for job in succeeded if job not in requested]
    # The only succeeded jobs without a request of their own: started by a Dagster run, after
    # whose end the reporting had already been refreshed.
    refreshed = world.instance.get_latest_materialization_event(REPORTING_MARKER)
    for job in skipped:
        assert job in by_dagster and refreshed.timestamp > by_dagster[job]
    assert set(requested) <= set(succeeded)
    assert json.loads(world.cursor)["waiting"] == {}
