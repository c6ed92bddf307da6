"""``flight_delay_predictions``: daily batch scoring by the prediction pipeline."""

from datetime import date
from typing import Any

import dagster as dg

from ml_platform.assets.model import MODEL_KEY
from ml_platform.assets.pipeline_jobs import RETRY_POLICY, job_metadata, run_pipeline
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


def predictions_metadata(job: PipelineJob, registry_version: str) -> dict[str, Any]:
    """What a succeeded prediction job records on its partition (asset and sensor alike)."""
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
        model_registry: dg.ResourceParam[ModelRegistry],
    ) -> dg.MaterializeResult:
        """The delay probability of every flight of the day, scored by the model registry's
        champion (resolved when the run starts, and recorded). Re-running a day replaces its
        rows."""
        model = champion(model_registry)
        context.log.info(f"scoring with {MODEL_NAME} version {model.version} ({CHAMPION})")
        day = date.fromisoformat(context.partition_key)
        job = run_pipeline(
            context,
            settings,
            runner=pipeline_runner,
            templates=templates,
            parameters=prediction_parameters(settings, warehouse.uri, day, model.artifact_uri),
        )
        rows = int(job.outputs["rows"])
        stored = warehouse.row_count(dataset, PREDICTIONS_TABLE, column="flight_date", value=day)
        if stored != rows:
            raise dg.Failure(
                f"{dataset}.{PREDICTIONS_TABLE} holds {stored} rows for {day}, "
                f"but pipeline job {job.job_id} wrote {rows}"
            )
        return dg.MaterializeResult(metadata=predictions_metadata(job, model.version))

    return flight_delay_predictions
