"""``flight_delay_predictions``: daily batch scoring by the prediction pipeline."""

import warnings
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import dagster as dg

from ml_platform.assets.model import MODEL_KEY
from ml_platform.assets.pipeline_jobs import (
    RETRY_POLICY,
    job_metadata,
    partitions_of,
    run_pipeline,
)
from ml_platform.launch import PREDICTIONS_ASSET, PREDICTIONS_TABLE, prediction_parameters
from ml_platform.resources.model_registry import (
    CHAMPION,
    MODEL_NAME,
    ModelRegistry,
    ModelVersion,
)
from ml_platform.resources.pipeline_runs import PipelineJob, PipelineRunner
from ml_platform.resources.templates import TemplateRegistry
from ml_platform.resources.warehouse import Warehouse
from ml_platform.settings import Settings

if TYPE_CHECKING:
    import pandas as pd

PREDICTIONS_KEY = dg.AssetKey(PREDICTIONS_ASSET)
DAILY_2013 = dg.DailyPartitionsDefinition(start_date="2013-01-01", end_date="2014-01-01")


def champion(registry: ModelRegistry) -> ModelVersion:
    """The version the ``champion`` alias resolves to now: what a prediction run scores with."""
    version = registry.get(CHAMPION)
    if version is None:
        raise dg.Failure(
            f"model {MODEL_NAME} has no champion yet: materialize flight_delay_model (a model "
            "that beats the baseline becomes champion), or `ml-platform models promote VERSION`",
            allow_retries=False,
        )
    return version


def registry_version_of(registry: ModelRegistry, model_uri: str) -> str:
    """The registry version whose artifact a job scored with ("" if it is not registered: a
    job given a model URI by hand)."""
    return next((v.version for v in registry.list_versions() if v.artifact_uri == model_uri), "")


CHECKS = {
    "one_row_per_flight": "Every flight of each scored day in features.flight_features has "
    "exactly one prediction, and there is no other.",
    "no_missing_probability": "No prediction of the scored days lacks its delay probability.",
    "probability_in_unit_interval": "Every delay probability of the scored days is in [0, 1].",
}


def rows_per_day(
    warehouse: Warehouse, dataset: str, table: str, days: list[str]
) -> tuple["pd.DataFrame", dict[str, int]]:
    """The rows of ``days`` (one read for the range, however long) and their count by day."""
    first, last = date.fromisoformat(days[0]), date.fromisoformat(days[-1])
    rows = warehouse.read_table(
        dataset, table, date_column="flight_date", start=first, end=last + timedelta(days=1)
    )
    counts = rows.groupby(rows["flight_date"].astype(str)).size().to_dict()
    return rows, {day: int(counts.get(day, 0)) for day in days}


def check_predictions(
    rows: "pd.DataFrame", per_day: dict[str, int], flights: dict[str, int]
) -> list[dg.AssetCheckResult]:
    """The three checks over the scored days, on the rows read back from the warehouse (not
    on what the job said it wrote), against the days' flights in the features."""
    days = list(per_day)
    probability = rows["delay_probability"]
    off = {
        day: (per_day.get(day, 0), flights[day])
        for day in days
        if per_day.get(day, 0) != flights[day]
    }
    duplicates = int(rows["flight_key"].duplicated().sum())
    missing = int(probability.isna().sum())
    outside = int(((probability < 0) | (probability > 1)).sum())
    where = f"{days[0]}..{days[-1]}" if len(days) > 1 else days[0]
    return [
        dg.AssetCheckResult(
            check_name="one_row_per_flight",
            passed=not off and not duplicates,
            metadata={"days": len(days), "duplicates": duplicates, "days_off": str(off or "")},
            description=f"{where}: {len(rows)} predictions for {sum(flights.values())} flights"
            + (f"; days off (predictions, flights): {off}" if off else ""),
        ),
        dg.AssetCheckResult(
            check_name="no_missing_probability",
            passed=missing == 0,
            metadata={"missing": missing},
            description=f"{where}: {missing} predictions without a probability",
        ),
        dg.AssetCheckResult(
            check_name="probability_in_unit_interval",
            passed=outside == 0,
            metadata={
                "outside": outside,
                "min": round(float(probability.min()), 4) if len(rows) else 0.0,
                "max": round(float(probability.max()), 4) if len(rows) else 0.0,
            },
            description=f"{where}: {outside} probabilities outside [0, 1]",
        ),
    ]


def rows_by_day(job: PipelineJob) -> dict[str, int]:
    """The rows a prediction job wrote, by day (a job from before ranges wrote one day)."""
    if "rows_by_day" in job.outputs:
        return {day: int(rows) for day, rows in job.outputs["rows_by_day"].items()}
    return {job.parameters["flight_date"]: int(job.outputs["rows"])}


def predictions_metadata(job: PipelineJob, registry_version: str) -> dict[str, Any]:
    """What a succeeded prediction job records on its partitions (asset and sensor alike);
    ``dagster/row_count`` is the whole job's."""
    return {
        **job_metadata(job),
        "dagster/row_count": int(job.outputs["rows"]),
        "mean_delay_probability": round(float(job.outputs["mean_probability"]), 4),
        "registry_version": registry_version,
        "model_version": job.outputs["model_version"],
        "model_uri": job.parameters.get("model_uri", ""),
    }


def build_predictions_asset(settings: Settings) -> dg.AssetsDefinition:
    dataset = settings.dataset("predictions")

    # BackfillPolicy is in beta (dagster 1.13): chosen knowingly, so its warning is silenced
    # here only, and not printed by every process that loads the code location.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return _predictions_asset(settings, dataset)


def _predictions_asset(settings: Settings, dataset: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=PREDICTIONS_KEY,
        deps=[MODEL_KEY, dg.AssetKey(["features", "flight_features"])],
        partitions_def=DAILY_2013,
        group_name="ml",
        kinds={"kubeflow", "duckdb" if settings.is_local else "bigquery"},
        retry_policy=RETRY_POLICY,
        # A backfill of any range of days is one run and one pipeline job, not one per day.
        backfill_policy=dg.BackfillPolicy.single_run(),
        check_specs=[
            dg.AssetCheckSpec(name, asset=PREDICTIONS_KEY, description=description)
            for name, description in CHECKS.items()
        ],
        metadata={"dagster/table_name": f"{dataset}.{PREDICTIONS_TABLE}"},
    )
    def flight_delay_predictions(
        context: dg.AssetExecutionContext,
        warehouse: dg.ResourceParam[Warehouse],
        pipeline_runner: dg.ResourceParam[PipelineRunner],
        templates: dg.ResourceParam[TemplateRegistry],
        model_registry: dg.ResourceParam[ModelRegistry],
    ) -> dg.MaterializeResult:
        """The delay probability of every flight of the day, scored by the model registry's
        champion (resolved when the run starts, and recorded). Re-running a day replaces its
        rows. A backfill of any range of days is one run and one pipeline job; each day's
        rows are still replaced on their own, and each partition records its own count."""
        model = champion(model_registry)
        context.log.info(f"scoring with {MODEL_NAME} version {model.version} ({CHAMPION})")
        days = partitions_of(context)
        job = run_pipeline(
            context,
            settings,
            runner=pipeline_runner,
            templates=templates,
            parameters=prediction_parameters(
                settings, warehouse.uri, date.fromisoformat(days[0]), model.artifact_uri, len(days)
            ),
        )
        written = rows_by_day(job)
        rows, stored = rows_per_day(warehouse, dataset, PREDICTIONS_TABLE, days)
        for day in days:
            if stored[day] != written.get(day):
                raise dg.Failure(
                    f"{dataset}.{PREDICTIONS_TABLE} holds {stored[day]} rows for {day}, "
                    f"but pipeline job {job.job_id} wrote {written.get(day)}"
                )
            context.add_asset_metadata({"dagster/row_count": stored[day]}, partition_key=day)
        _, flights = rows_per_day(warehouse, settings.dataset("features"), "flight_features", days)
        metadata = predictions_metadata(job, model.version)
        del metadata["dagster/row_count"]  # each partition's own, above
        return dg.MaterializeResult(
            metadata=metadata, check_results=check_predictions(rows, stored, flights)
        )

    return flight_delay_predictions
