"""From the UI to the reporting, in a real browser against `dagster dev`.

A user opens flight_delay_predictions, backfills three days from the launch dialog, and
later finds the reporting models rebuilt: the backfill is one run and one pipeline job (the
predictions' single-run backfill policy), each day recorded as its own partition with its
own row count; the completion sensor saw the job, waited for the run to finish, and
requested one refresh_reporting run (run_key = the job's name). The browser shows each
step; Dagster's GraphQL API is polled to wait (bounded) for the runs, and the instance, the
job store and the warehouse are checked at the end.
"""

from __future__ import annotations

import re
import time
from datetime import date
from typing import Any

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef
from playwright.sync_api import Page, expect

from ml_platform.assets.predictions import PREDICTIONS_KEY
from ml_platform.resources.pipeline_runs import JobState
from ml_platform.resources.pipeline_runs.local import JobStore, to_pipeline_job
from ml_platform.resources.warehouse.duckdb import DuckDBWarehouse
from ml_platform.sensors import REPORTING_JOB, REPORTING_MARKER, SENSOR_NAME
from ml_platform.settings import Settings, sanitize_label_value
from tests.e2e.conftest import LOCATION, DagsterDev

pytestmark = pytest.mark.e2e

DAYS = ["2013-10-01", "2013-10-02", "2013-10-03"]
RANGE = f"{DAYS[0]}..{DAYS[-1]}"  # how the job and the refresh name the range
PREDICTION_PIPELINE = "flight-delay-prediction"
# Bounds on the waits. Measured on two cores: the UI's run takes 35-45 s from launch to
# success, the sensor's refresh 25-35 s more (5 s sensor interval); the bounds leave room
# for a machine busy with other work (both roughly double under a load average of 5).
UI_RUN_TIMEOUT = 240
REFRESH_TIMEOUT = 240
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}

RUNS = """query Runs($filter: RunsFilter) { runsOrError(filter: $filter) {
    __typename ... on Runs { results { runId jobName status startTime endTime
    tags { key value } } } ... on PythonError { message } } }"""
SENSOR_TICKS = """query Ticks($selector: SensorSelector!) {
    sensorOrError(sensorSelector: $selector) { __typename ... on Sensor {
    minIntervalSeconds sensorState { status ticks(limit: 1) { timestamp status } } } } }"""
FAILURES = """query Failures($runId: ID!) { logsForRun(runId: $runId) { __typename
    ... on EventConnection { events { __typename
    ... on ExecutionStepFailureEvent { stepKey error { message } }
    ... on RunFailureEvent { message } } } } }"""
SENSOR = {
    "repositoryLocationName": LOCATION,
    "repositoryName": "__repository__",  # the name Dagster gives a bare Definitions
    "sensorName": SENSOR_NAME,
}


def runs(server: DagsterDev, **run_filter: Any) -> list[dict[str, Any]]:
    result = server.graphql(RUNS, filter=run_filter)["runsOrError"]
    assert result["__typename"] == "Runs", result
    for run in result["results"]:
        run["tags"] = {tag["key"]: tag["value"] for tag in run["tags"]}
    return result["results"]


def wait_for_run(server: DagsterDev, run_id: str, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        (run,) = runs(server, runIds=[run_id])
        if run["status"] in FINISHED:
            if run["status"] != "SUCCESS":
                pytest.fail(
                    f"{what} (run {run_id}) ended {run['status']}:\n{failures(server, run_id)}"
                )
            return run
        if time.monotonic() > deadline:
            pytest.fail(f"{what} (run {run_id}) still {run['status']} after {timeout:.0f} s")
        time.sleep(2)


def failures(server: DagsterDev, run_id: str) -> str:
    """What went wrong in a run, from its event log (the server is gone once pytest reports)."""
    events = server.graphql(FAILURES, runId=run_id)["logsForRun"].get("events", [])
    lines = [
        f"{event.get('stepKey', 'run')}: {(event.get('error') or event)['message']}"
        for event in events
        if event["__typename"] in ("ExecutionStepFailureEvent", "RunFailureEvent")
    ]
    return "\n".join(lines) or "(no failure event)"


def wait_for_refresh(server: DagsterDev, timeout: float) -> dict[str, Any]:
    """The sensor's refresh_reporting run, once it has finished."""
    deadline = time.monotonic() + timeout
    while True:
        refreshes = runs(server, pipelineName=REPORTING_JOB)
        if refreshes and all(run["status"] in FINISHED for run in refreshes):
            assert len(refreshes) == 1, f"more than one {REPORTING_JOB} run: {refreshes}"
            return wait_for_run(server, refreshes[0]["runId"], 0, f"the sensor's {REPORTING_JOB}")
        if time.monotonic() > deadline:
            state = server.graphql(SENSOR_TICKS, selector=SENSOR)["sensorOrError"]
            raise AssertionError(
                f"no finished {REPORTING_JOB} run {timeout:.0f} s after the UI's run "
                f"succeeded; runs: {refreshes}; sensor: {state}"
            )
        time.sleep(2)


def wait_for_sensor_tick_after(server: DagsterDev, moment: float, timeout: float) -> None:
    """Until the sensor has finished a tick that began after ``moment`` (so any second
    request for the same job would have been made by then)."""
    deadline = time.monotonic() + timeout
    while True:
        sensor = server.graphql(SENSOR_TICKS, selector=SENSOR)["sensorOrError"]
        assert sensor["__typename"] == "Sensor", sensor
        ticks = sensor["sensorState"]["ticks"]
        if ticks and ticks[0]["timestamp"] > moment and ticks[0]["status"] != "STARTED":
            return
        if time.monotonic() > deadline:
            pytest.fail(f"no sensor tick finished {timeout:.0f} s after the refresh: {sensor}")
        time.sleep(1)


def launch_a_backfill_from_the_ui(page: Page, server: DagsterDev) -> str:
    """Backfill DAYS of flight_delay_predictions from its asset page; the backfill's id."""
    page.goto(f"{server.url}/assets/flight_delay_predictions")
    # "Materialize…", with an ellipsis: it opens the launch dialog of a partitioned asset.
    # A substring match: Dagster's icons put their names into accessible names
    # ("materialization Materialize…").
    page.get_by_role("button", name="Materialize…").click()
    dialog = page.get_by_role("dialog").filter(
        has_text="Launch runs to materialize flight_delay_predictions"
    )
    # The partition range appears once the dialog has loaded the partitions; text typed
    # before that is not matched against them.
    expect(dialog.get_by_text("2013-12-31", exact=True)).to_be_visible()
    dialog.get_by_role("button", name="Custom", exact=True).click()
    partitions = dialog.get_by_placeholder(re.compile(r"^ex: "))
    partitions.fill(f"[{DAYS[0]}...{DAYS[-1]}]")
    partitions.press("Enter")
    expect(dialog.get_by_text(f"{len(DAYS)} partitions", exact=True)).to_be_visible()
    dialog.get_by_role("button", name="Launch backfill", exact=True).click()
    # The toast "Created backfill abcdefgh [View]" links to the backfill.
    view = page.get_by_role("link", name="View", exact=True)
    expect(view).to_have_attribute("href", re.compile(r"^/runs/b/[a-z]+"))
    return re.match(r"^/runs/b/([a-z]+)", view.get_attribute("href")).group(1)


def the_backfill_run(server: DagsterDev, backfill_id: str, timeout: float) -> dict[str, Any]:
    """The run the backfill daemon launched for the backfill, once it has (there must be one,
    and only one: the single-run policy)."""
    deadline = time.monotonic() + timeout
    while True:
        launched = runs(server, tags=[{"key": "dagster/backfill", "value": backfill_id}])
        if launched:
            assert len(launched) == 1, f"the backfill launched {len(launched)} runs: {launched}"
            return launched[0]
        if time.monotonic() > deadline:
            pytest.fail(f"backfill {backfill_id} launched no run within {timeout:.0f} s")
        time.sleep(1)


def test_a_backfill_in_the_ui_is_one_run_and_refreshes_the_reporting_once(
    browser_page: Page, dagster_dev: DagsterDev
) -> None:
    page, server = browser_page, dagster_dev
    sensor = server.graphql(SENSOR_TICKS, selector=SENSOR)["sensorOrError"]
    assert sensor["__typename"] == "Sensor", sensor
    assert sensor["sensorState"]["status"] == "RUNNING", f"{SENSOR_NAME} is not running"

    # 1. The user backfills three days of predictions from the UI: one run for all three.
    started = time.monotonic()
    backfill_id = launch_a_backfill_from_the_ui(page, server)
    ui_run_id = the_backfill_run(server, backfill_id, UI_RUN_TIMEOUT)["runId"]

    # 2. The run succeeds, and the run page says so.
    ui_run = wait_for_run(server, ui_run_id, UI_RUN_TIMEOUT, f"the backfill's run of {RANGE}")
    assert ui_run["tags"]["dagster/asset_partition_range_start"] == DAYS[0]
    assert ui_run["tags"]["dagster/asset_partition_range_end"] == DAYS[-1]
    ui_run_seconds = time.monotonic() - started
    page.goto(f"{server.url}/runs/{ui_run_id}")
    expect(page.get_by_text("Success", exact=True)).to_be_visible()

    # 3. The sensor requests one refresh_reporting run, which succeeds; one more tick of
    # the sensor after it ended requests nothing more.
    refresh = wait_for_refresh(server, REFRESH_TIMEOUT)
    refresh_seconds = time.monotonic() - started - ui_run_seconds
    wait_for_sensor_tick_after(server, refresh["endTime"], timeout=120)
    assert [run["runId"] for run in runs(server, pipelineName=REPORTING_JOB)] == [refresh["runId"]]
    refresh_id = refresh["runId"]
    # The sensor waited for the UI's run to finish before it asked for the refresh.
    assert refresh["startTime"] > ui_run["endTime"]
    print(
        f"UI run {ui_run_id}: {ui_run_seconds:.0f} s to success; {REPORTING_JOB} run "
        f"{refresh_id} {refresh_seconds:.0f} s later (sensor interval "
        f"{sensor['minIntervalSeconds']} s)"
    )

    # 4. What the user sees. The refresh run was launched by the sensor and succeeded.
    page.goto(f"{server.url}/runs/{refresh_id}")
    expect(page.get_by_text("Success", exact=True)).to_be_visible()
    expect(page.get_by_text("Launched by")).to_be_visible()
    expect(page.get_by_title(SENSOR_NAME)).to_be_visible()
    expect(page.get_by_role("link", name=REPORTING_JOB, exact=True)).to_be_visible()
    # The reporting's latest materialization is the refresh run's...
    page.goto(f"{server.url}/assets/{'/'.join(REPORTING_MARKER.path)}")
    expect(page.get_by_text("Latest materialization", exact=True)).to_be_visible()
    expect(page.locator(f'a[href^="/runs/{refresh_id}"]').first).to_be_visible()
    page.goto(f"{server.url}/assets/{'/'.join(REPORTING_MARKER.path)}?view=events")
    expect(page.get_by_text(re.compile(r"^Materialized in run ")).first).to_have_text(
        f"Materialized in run {refresh_id[:8]}"
    )
    # ... and the predictions' latest materialization is the last day, by the backfill's run.
    page.goto(f"{server.url}/assets/flight_delay_predictions")
    expect(page.get_by_text("Latest materialization", exact=True)).to_be_visible()
    expect(page.get_by_text(DAYS[-1], exact=True).first).to_be_visible()
    expect(page.locator(f'a[href^="/runs/{ui_run_id}"]').first).to_be_visible()

    # 5. Cross-checks, straight from the instance, the job store and the warehouse.
    project = server.project
    settings = Settings.from_env(project.env)
    jobs = [
        to_pipeline_job(row)
        for row in JobStore(settings.job_store_path).query(
            labels=None, states=None, ended_after=None, page_size=100
        )
        if row["pipeline"] == PREDICTION_PIPELINE
    ]
    assert len(jobs) == 1, [job.job_id for job in jobs]
    (job,) = jobs
    assert job.state is JobState.SUCCEEDED
    assert job.labels["dagster_run_id"] == sanitize_label_value(ui_run_id)
    assert job.labels["partition"] == sanitize_label_value(RANGE)
    assert job.parameters["flight_date"] == DAYS[0] and job.parameters["days"] == len(DAYS)

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(project.home))) as instance:
        (refresh_run,) = instance.get_runs(dg.RunsFilter(job_name=REPORTING_JOB))
        assert refresh_run.run_id == refresh_id
        assert refresh_run.status is dg.DagsterRunStatus.SUCCESS
        assert refresh_run.tags["ml_platform/pipeline_job"] == job.job_id
        assert refresh_run.tags["dagster/run_key"] == job.name
        assert refresh_run.tags["dagster/sensor_name"] == SENSOR_NAME
        assert refresh_run.tags["ml_platform/flight_date"] == RANGE
        assert instance.get_materialized_partitions(PREDICTIONS_KEY) == set(DAYS)
        # Each day its own materialization, by the one run, with its own row count.
        rows = {}
        for day in DAYS:
            (event,) = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=PREDICTIONS_KEY, asset_partitions=[day]), limit=2
            ).records
            assert event.run_id == ui_run_id
            rows[day] = event.asset_materialization.metadata["dagster/row_count"].value
        predicted = instance.get_latest_materialization_event(PREDICTIONS_KEY)
        reported = instance.get_latest_materialization_event(REPORTING_MARKER)
        assert reported.run_id == refresh_id
        assert reported.timestamp > max(predicted.timestamp, job.end_time.timestamp())
    assert job.outputs["rows_by_day"] == rows

    with DuckDBWarehouse(settings.duckdb_path).connect(read_only=True) as connection:
        report = connection.execute(
            f"select flight_date, flights_scored from {settings.dataset('reporting')}"
            ".daily_delay_report order by flight_date"
        ).fetchall()
    assert report == [(date.fromisoformat(day), rows[day]) for day in DAYS], report
