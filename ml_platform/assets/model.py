"""``flight_delay_model``: the training pipeline, with a blocking check against the baseline."""

import base64
from datetime import date
from typing import Any

import dagster as dg

from ml_platform.assets.pipeline_jobs import RETRY_POLICY, job_metadata, run_pipeline
from ml_platform.launch import MODEL_ASSET, beats_baseline, training_parameters
from ml_platform.resources.artifacts import ArtifactStore
from ml_platform.resources.pipeline_runs import PipelineJob, PipelineRunner
from ml_platform.resources.templates import TemplateRegistry
from ml_platform.resources.warehouse import Warehouse
from ml_platform.settings import Settings

MODEL_KEY = dg.AssetKey(MODEL_ASSET)
BEATS_BASELINE = "beats_baseline"


class TrainingConfig(dg.Config):
    cutoff_date: str | None = None  # flights before it train and evaluate; default: settings


def _plot_markdown(png: bytes) -> dg.MetadataValue:
    # Embedded, so the plot shows in the UI without access to the artifact store.
    encoded = base64.b64encode(png).decode()
    return dg.MetadataValue.md(f"![evaluation](data:image/png;base64,{encoded})")


def model_materialization(
    job: PipelineJob, artifacts: ArtifactStore
) -> tuple[dict[str, Any], dg.AssetCheckResult]:
    """What a succeeded training job records on flight_delay_model, and its baseline check.

    Shared by the asset and by the completion sensor, which records training jobs started
    outside Dagster the same way.
    """
    model = job.outputs["model"]
    metrics = job.outputs["metrics"]["metadata"]
    roc_auc, baseline_auc = metrics["roc_auc"], metrics["baseline_roc_auc"]
    passed = beats_baseline(job)
    plot_uri = job.outputs["evaluation_plot"]["uri"]
    metadata = {
        **job_metadata(job),
        "model_uri": model["uri"],
        "model_version": model["metadata"].get("version", ""),
        "cutoff_date": job.parameters.get("cutoff_date", ""),
        BEATS_BASELINE: passed,
        **{name: float(value) for name, value in metrics.items()},
        "evaluation_plot": _plot_markdown(artifacts.read_bytes(plot_uri)),
        "evaluation_plot_uri": plot_uri,
    }
    check = dg.AssetCheckResult(
        asset_key=MODEL_KEY,
        check_name=BEATS_BASELINE,
        passed=passed,
        metadata={"roc_auc": roc_auc, "baseline_roc_auc": baseline_auc},
        description=f"test ROC AUC {roc_auc:.4f} vs baseline {baseline_auc:.4f}",
    )
    return metadata, check


def build_model_asset(settings: Settings) -> dg.AssetsDefinition:
    @dg.asset(
        key=MODEL_KEY,
        deps=[dg.AssetKey(["features", "training_data"])],
        group_name="ml",
        kinds={"kubeflow", "scikitlearn"},
        retry_policy=RETRY_POLICY,
        check_specs=[
            dg.AssetCheckSpec(
                BEATS_BASELINE,
                asset=MODEL_KEY,
                blocking=True,
                description="Test ROC AUC must beat the carrier x scheduled-hour baseline; "
                "a model that does not is never used for predictions.",
            )
        ],
    )
    def flight_delay_model(
        context: dg.AssetExecutionContext,
        config: TrainingConfig,
        warehouse: dg.ResourceParam[Warehouse],
        pipeline_runner: dg.ResourceParam[PipelineRunner],
        templates: dg.ResourceParam[TemplateRegistry],
        artifacts: dg.ResourceParam[ArtifactStore],
    ) -> dg.MaterializeResult:
        """A gradient-boosted classifier of departure delay >= 15 min, trained by the Kubeflow
        training pipeline on flights before the cutoff and evaluated on the test split."""
        cutoff = (
            date.fromisoformat(config.cutoff_date)
            if config.cutoff_date
            else settings.training_cutoff
        )
        job = run_pipeline(
            context,
            settings,
            runner=pipeline_runner,
            templates=templates,
            parameters=training_parameters(settings, warehouse.uri, cutoff),
        )
        metadata, check = model_materialization(job, artifacts)
        context.log.info(check.description)
        return dg.MaterializeResult(
            metadata={**metadata, "cutoff_date": cutoff.isoformat()}, check_results=[check]
        )

    return flight_delay_model
