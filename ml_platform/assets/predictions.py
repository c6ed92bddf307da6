"""``flight_delay_predictions``: daily batch scoring by the prediction pipeline."""

from datetime import date
from typing import Any

import dagster as dg

from ml_platform.assets.model import BEATS_BASELINE, MODEL_KEY
from ml_platform.assets.pipeline_jobs import RETRY_POLICY, job_metadata, run_pipeline
from ml_platform.launch import PREDICTIONS_ASSET, PREDICTIONS_TABLE, prediction_parameters
from ml_platform.resources.pipeline_runs import PipelineJob, PipelineRunner
from ml_platform.resources.templates import TemplateRegistry
from ml_platform.resources.warehouse import Warehouse
from ml_platform.settings import Settings

PREDICTIONS_KEY = dg.AssetKey(PREDICTIONS_ASSET)
DAILY_2013 = dg.DailyPartitionsDefinition(start_date="2013-01-01", end_date="2014-01-01")


def current_model(instance: dg.DagsterInstance) -> dict[str, dg.MetadataValue]:
    """The latest model's metadata, refusing a model that failed its baseline check."""
    event = instance.get_latest_materialization_event(MODEL_KEY)
    if event is None or event.asset_materialization is None:
        raise dg.Failure(
            "no flight_delay_model has been materialized yet; materialize it first",
            allow_retries=False,
        )
    metadata = event.asset_materialization.metadata
    beats = metadata.get(BEATS_BASELINE)
    if beats is None or not beats.value:
        raise dg.Failure(
            f"the latest flight_delay_model (run {event.run_id}) did not beat its baseline; "
            "refusing to score with it",
            allow_retries=False,
            metadata={
                "roc_auc": metadata.get("roc_auc"),
                "baseline": metadata.get("baseline_roc_auc"),
            },
        )
    return metadata


def predictions_metadata(job: PipelineJob) -> dict[str, Any]:
    """What a succeeded prediction job records on its partition (asset and sensor alike)."""
    return {
        **job_metadata(job),
        "dagster/row_count": int(job.outputs["rows"]),
        "mean_delay_probability": float(job.outputs["mean_probability"]),
        "model_version": job.outputs["model_version"],
        "model_uri": job.parameters.get("model_uri", ""),
    }


def build_predictions_asset(settings: Settings) -> dg.AssetsDefinition:
    dataset = settings.dataset("predictions")

    @dg.asset(
        key=PREDICTIONS_KEY,
        deps=[MODEL_KEY, dg.AssetKey(["features", "flight_features"])],
        partitions_def=DAILY_2013,
        group_name="ml",
        kinds={"kubeflow", "duckdb" if settings.is_local else "bigquery"},
        retry_policy=RETRY_POLICY,
        metadata={"dagster/table_name": f"{dataset}.{PREDICTIONS_TABLE}"},
    )
    def flight_delay_predictions(
        context: dg.AssetExecutionContext,
        warehouse: dg.ResourceParam[Warehouse],
        pipeline_runner: dg.ResourceParam[PipelineRunner],
        templates: dg.ResourceParam[TemplateRegistry],
    ) -> dg.MaterializeResult:
        """The delay probability of every flight of the day, scored by the latest model that
        beat its baseline. Re-running a day replaces its rows."""
        model = current_model(context.instance)
        day = date.fromisoformat(context.partition_key)
        job = run_pipeline(
            context,
            settings,
            runner=pipeline_runner,
            templates=templates,
            parameters=prediction_parameters(
                settings, warehouse.uri, day, model["model_uri"].value
            ),
        )
        rows = int(job.outputs["rows"])
        stored = warehouse.row_count(dataset, PREDICTIONS_TABLE, column="flight_date", value=day)
        if stored != rows:
            raise dg.Failure(
                f"{dataset}.{PREDICTIONS_TABLE} holds {stored} rows for {day}, "
                f"but pipeline job {job.job_id} wrote {rows}"
            )
        return dg.MaterializeResult(metadata=predictions_metadata(job))

    return flight_delay_predictions
