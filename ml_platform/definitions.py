"""The code location: every asset, check, job and resource, assembled from the settings.

Importing this module must stay cheap (every run, step and code server imports it): no
Google SDK, kfp, scikit-learn or pandas at module top anywhere it reaches.
"""

from __future__ import annotations

import atexit
import gc
import sys

import dagster as dg

from ml_platform.alerting import build_alerting
from ml_platform.assets.dbt import build_dbt_assets
from ml_platform.assets.ingest import build_ingest_assets
from ml_platform.assets.model import build_model_asset
from ml_platform.assets.performance import build_performance_asset
from ml_platform.assets.predictions import build_predictions_asset
from ml_platform.launch import EVERYTHING_JOB
from ml_platform.resources.backends import build_resources
from ml_platform.retraining import build_retrain_sensor
from ml_platform.schedules import build_schedules
from ml_platform.sensors import REPORTING_JOB, build_completion_sensor
from ml_platform.settings import Settings, get_settings


def _freeze() -> None:
    """``gc.freeze()`` what this process holds so far (see the end of this module).

    Frozen objects are never collected, not even at exit. When DuckDB is already imported
    (parsing the dbt project at load, when its manifest is missing, stale or made for another
    data folder, starts dbt-duckdb, hence duckdb, in this process; tests import it first),
    its module's types, functions and constants are frozen with the rest, are still alive
    when its extension unloads, and its bindings (nanobind) print some 45 lines of
    "nanobind: leaked ..." at exit. Such a process unfreezes at exit: the interpreter's own
    last collections then free them, at the cost the exit has without the freeze. A process
    that imports DuckDB after the freeze (the CLI, run workers, steps) keeps the whole saving.
    """
    gc.freeze()
    if "_duckdb" in sys.modules:
        atexit.unregister(gc.unfreeze)  # once, however often this runs
        atexit.register(gc.unfreeze)


# Frozen once here too, so that the full collections that building the dbt assets triggers
# (dagster-dbt imports dbt's graph selection) skip Dagster.
_freeze()


def build_definitions(settings: Settings) -> dg.Definitions:
    settings.check_code_location()
    ingest = build_ingest_assets(settings)
    dbt_features, dbt_reporting = build_dbt_assets(settings)
    model = build_model_asset(settings)
    predictions = build_predictions_asset(settings)
    performance = build_performance_asset(settings)

    training_job = dg.define_asset_job(
        "train_flight_delay_model",
        selection=dg.AssetSelection.assets(ingest, dbt_features, model),
        description="Ingest, build the features and train + evaluate the model.",
    )
    predictions_job = dg.define_asset_job(
        "score_flights",
        selection=dg.AssetSelection.assets(predictions),
        description="Score one day of flights with the latest model.",
    )
    performance_job = dg.define_asset_job(
        "measure_model_performance",
        selection=dg.AssetSelection.assets(performance),
        description="Measure a day's predictions against its outcomes, with drift checks.",
    )
    reporting_job = dg.define_asset_job(
        REPORTING_JOB,
        selection=dg.AssetSelection.assets(dbt_reporting),
        description="Rebuild (and test) the dbt reporting models over the predictions.",
    )
    everything_job = dg.define_asset_job(
        EVERYTHING_JOB,
        selection=dg.AssetSelection.assets(ingest, dbt_features, model, predictions, dbt_reporting),
        description="The whole graph in one run: ingest, features, the model, the predictions "
        "of a range of days (one pipeline job) and the reporting (what `make run` launches).",
    )
    alert_sensors, alerts = build_alerting(settings)
    return dg.Definitions(
        assets=[ingest, dbt_features, model, predictions, performance, dbt_reporting],
        jobs=[everything_job, training_job, predictions_job, performance_job, reporting_job],
        schedules=build_schedules(predictions_job.name),
        sensors=[
            build_completion_sensor(settings),
            build_retrain_sensor(settings, training_job.name),
            *alert_sensors,
        ],
        resources={**build_resources(settings), "alerts": alerts},
        # Locally, steps run one after another in the run's own process: the warehouse
        # takes one writer at a time anyway, and each step process would pay the code
        # location's import again.
        executor=dg.in_process_executor if settings.is_local else dg.multiprocess_executor,
    )


defs = build_definitions(get_settings())

# What was imported and built so far (Dagster, dbt, these definitions: some 240,000 objects
# the cyclic garbage collector tracks, a few dozen of them garbage) lives as long as the
# process. Frozen, it is no longer walked by every full collection (0.1 s each), nor by the
# collections at interpreter exit (0.6 s for every run worker and step process that
# imports this module and then ends). bench/p1_import_cost.py measures it.
_freeze()
