"""A backfill of a range of days is one Dagster run and one pipeline job (the predictions'
single-run backfill policy), on the real data slice, with real kfp.local jobs and DuckDB:
each day's rows are replaced on their own and each partition records its own row count;
the completion sensor then asks for one reporting refresh for the whole range."""

from datetime import date
from pathlib import Path

import dagster as dg
import pytest

from ml_platform.assets.predictions import PREDICTIONS_KEY
from ml_platform.definitions import build_definitions
from ml_platform.resources.pipeline_runs import JobState
from ml_platform.resources.pipeline_runs.local import JobStore
from ml_platform.resources.warehouse.duckdb import DuckDBWarehouse
from ml_platform.settings import Settings

SLICE = {"start_date": "2013-08-01", "end_date": "2013-10-08"}
RANGE = ("2013-10-01", "2013-10-07")
DAYS = [f"2013-10-0{i}" for i in range(1, 8)]


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("backfill")
    settings = Settings.from_env(
        {"ML_PLATFORM_DATA_DIR": str(root / "data"), "DAGSTER_HOME": str(root / "home")}
    )
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    ingest = {"ops": {"ingest_nycflights13": {"config": SLICE}}}
    trained = defs.resolve_job_def("train_flight_delay_model").execute_in_process(
        instance=instance, run_config=ingest, raise_on_error=False
    )
    assert trained.success
    return settings, defs, instance


def test_a_range_is_one_run_and_one_job_with_a_count_per_day(place):
    settings, defs, instance = place
    tags = {
        "dagster/asset_partition_range_start": RANGE[0],
        "dagster/asset_partition_range_end": RANGE[1],
    }
    result = defs.resolve_job_def("score_flights").execute_in_process(
        instance=instance, tags=tags, raise_on_error=False
    )
    assert result.success
    jobs = [
        job for job in JobStore(settings.job_store_path).unfinished() or []
    ]  # none left running
    assert jobs == []
    runner = defs.resources["pipeline_runner"]
    scoring = runner.list_jobs(
        labels={**settings.labels, "asset": "flight_delay_predictions"},
        states=[JobState.SUCCEEDED],
    )
    (job,) = scoring
    assert job.labels["partition"] == "2013-10-01-2013-10-07"
    assert job.parameters["days"] == 7 and job.parameters["flight_date"] == RANGE[0]

    warehouse = DuckDBWarehouse(settings.duckdb_path)
    materializations = {
        m.partition: m.metadata["dagster/row_count"].value
        for m in result.asset_materializations_for_node("flight_delay_predictions")
    }
    stored = {
        day: warehouse.row_count(
            settings.dataset("predictions"),
            "flight_delay_predictions",
            column="flight_date",
            value=date.fromisoformat(day),
        )
        for day in DAYS
    }
    assert materializations == stored and all(500 < rows < 1100 for rows in stored.values())
    recorded = instance.fetch_materializations(PREDICTIONS_KEY, limit=20).records
    assert sorted(r.partition_key for r in recorded) == DAYS

    # The same range again replaces each day: no duplicates, same counts.
    again = defs.resolve_job_def("score_flights").execute_in_process(
        instance=instance, tags=tags, raise_on_error=False
    )
    assert again.success
    with warehouse.connect(read_only=True) as db:
        (duplicates,) = db.execute(
            "select count(*) - count(distinct flight_key) "
            "from flights_predictions.flight_delay_predictions"
        ).fetchone()
    assert duplicates == 0
    assert {
        day: warehouse.row_count(
            settings.dataset("predictions"),
            "flight_delay_predictions",
            column="flight_date",
            value=date.fromisoformat(day),
        )
        for day in DAYS
    } == stored
