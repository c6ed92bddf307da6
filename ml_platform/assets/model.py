"""``flight_delay_model``: the training pipeline; every model it trains is registered as a
challenger, and becomes the champion (what predictions score with) only if it beats the
baseline and is not worse than the current champion on the same out-of-time window."""

import base64
import getpass
from dataclasses import dataclass
from datetime import date
from typing import Any

import dagster as dg

from ml_platform.assets.pipeline_jobs import RETRY_POLICY, job_metadata, run_pipeline
from ml_platform.launch import MODEL_ASSET, training_parameters
from ml_platform.pipelines.model import MAX_ITER
from ml_platform.resources.artifacts import ArtifactStore
from ml_platform.resources.model_registry import (
    CHAMPION,
    MODEL_NAME,
    ModelRegistry,
    ModelVersion,
    promote,
)
from ml_platform.resources.pipeline_runs import PipelineJob, PipelineRunner
from ml_platform.resources.templates import TemplateRegistry
from ml_platform.resources.warehouse import Warehouse
from ml_platform.settings import Settings

MODEL_KEY = dg.AssetKey(MODEL_ASSET)
BEATS_BASELINE = "beats_baseline"
BEATS_CHAMPION = "beats_champion"
CHALLENGER = "challenger"
# How much worse than the champion, on the same out-of-time window, a challenger may be and
# still be promoted, so a retrain on fresher data is not refused for noise (a chosen margin,
# not a measured one).
TOLERANCE = {"oot_roc_auc": 0.005, "oot_log_loss": 0.005}
# The figures of the side-by-side table: (label, metric name).
FIGURES = [
    ("ROC AUC", "roc_auc"),
    ("log loss", "log_loss"),
    ("Brier score", "brier_score"),
]


class TrainingConfig(dg.Config):
    cutoff_date: str | None = None  # flights before it train and evaluate; default: settings
    max_iter: int = MAX_ITER  # boosting iterations at most (early stopping may end sooner)


@dataclass(frozen=True)
class Verdict:
    """The blocking checks of a challenger: against the baseline, and against the champion
    re-scored on the challenger's own out-of-time window (None: there is no champion)."""

    beats_baseline: bool
    beats_champion: bool | None
    baseline_text: str
    champion_text: str

    @property
    def promote(self) -> bool:
        return self.beats_baseline and self.beats_champion is not False


def judge(metrics: dict[str, float], champion: ModelVersion | None, compared_uri: str) -> Verdict:
    auc, baseline = metrics["oot_roc_auc"], metrics["oot_baseline_roc_auc"]
    baseline_text = f"out-of-time ROC AUC {auc:.4f} vs baseline {baseline:.4f}"
    if champion is None:
        return Verdict(auc > baseline, None, baseline_text, "no champion yet")
    if champion.artifact_uri != compared_uri or "champion_oot_roc_auc" not in metrics:
        # The champion moved while this model trained: its figures are not on this window.
        return Verdict(
            auc > baseline,
            False,
            baseline_text,
            f"the champion is now version {champion.version}, not the model this training "
            "re-scored; train again to compare with it",
        )
    champion_auc, champion_loss = metrics["champion_oot_roc_auc"], metrics["champion_oot_log_loss"]
    holds = (
        auc >= champion_auc - TOLERANCE["oot_roc_auc"]
        and metrics["oot_log_loss"] <= champion_loss + TOLERANCE["oot_log_loss"]
    )
    champion_text = (
        f"out-of-time ROC AUC {auc:.4f} vs champion v{champion.version} {champion_auc:.4f}, "
        f"log loss {metrics['oot_log_loss']:.4f} vs {champion_loss:.4f} (tolerance "
        f"{TOLERANCE['oot_roc_auc']} / {TOLERANCE['oot_log_loss']}, same window)"
    )
    return Verdict(auc > baseline, holds, baseline_text, champion_text)


def _plot_markdown(png: bytes) -> dg.MetadataValue:
    # Embedded, so the plot shows in the UI without access to the artifact store.
    encoded = base64.b64encode(png).decode()
    return dg.MetadataValue.md(f"![evaluation](data:image/png;base64,{encoded})")


def figures_table(metrics: dict[str, float]) -> dg.MetadataValue:
    """Model vs baseline (and the champion on the same window), out of time first, rounded."""
    has_champion = "champion_oot_roc_auc" in metrics
    header = "| | model | baseline |" + (" champion |" if has_champion else "")
    lines = [header, "|---|---|---|" + ("---|" if has_champion else "")]
    for window, prefix in (("out of time", "oot_"), ("test split", "")):
        for label, name in FIGURES:
            row = f"| {label}, {window} | {metrics[prefix + name]:.4f} | "
            row += f"{metrics[prefix + 'baseline_' + name]:.4f} |"
            if has_champion:
                champion = metrics.get(f"champion_{prefix}{name}")
                row += f" {champion:.4f} |" if champion is not None else " |"
            lines.append(row)
    return dg.MetadataValue.md("\n".join(lines))


def record_training(
    job: PipelineJob,
    artifacts: ArtifactStore,
    registry: ModelRegistry,
    *,
    dagster_run: str,
    by: str,
) -> tuple[dict[str, Any], list[dg.AssetCheckResult]]:
    """Register a succeeded training job's model as a challenger, promote it if it passes its
    blocking checks, and say what a materialization of flight_delay_model records.

    Shared by the asset and by the completion sensor (training jobs started outside Dagster).
    Registering is once per model artifact, so a retried tick or step registers nothing new.
    """
    model = job.outputs["model"]
    metrics = {name: float(value) for name, value in job.outputs["metrics"]["metadata"].items()}
    plot_uri = job.outputs["evaluation_plot"]["uri"]
    plot = artifacts.read_bytes(
        plot_uri
    )  # before registering: a job we cannot read changes nothing
    champion = registry.get(CHAMPION)
    verdict = judge(metrics, champion, job.parameters.get("champion_model_uri", ""))
    version = next(
        (v for v in registry.list_versions() if v.artifact_uri == model["uri"]), None
    ) or registry.register(
        model["uri"],
        metrics=metrics,
        cutoff=job.parameters.get("cutoff_date", ""),
        data_fingerprint=str(job.outputs.get("data_fingerprint", "")),
        template_version=job.template_version,
        dagster_run=dagster_run,
        aliases=(CHALLENGER,),
    )
    promoted = verdict.promote and (champion is None or champion.version != version.version)
    if promoted:
        promote(registry, version.version)
    now_champion = version.version if promoted else (champion.version if champion else "")
    metadata = {
        **job_metadata(job),
        "registry_version": version.version,
        "champion_version": now_champion,
        "promoted": promoted,
        "decision": (
            f"version {version.version} "
            + ("promoted to champion" if promoted else "registered, not promoted")
            + f": {verdict.baseline_text}; {verdict.champion_text} (by {by})"
        ),
        "figures": figures_table(metrics),
        "model_uri": model["uri"],
        "model_version": model["metadata"].get("version", ""),
        "cutoff_date": job.parameters.get("cutoff_date", ""),
        "data_fingerprint": version.data_fingerprint,
        BEATS_BASELINE: verdict.beats_baseline,
        **{
            name: round(value, 4)
            for name, value in metrics.items()
            if not name.startswith("oot_score_q")  # the drift reference: in the registry
        },
        "evaluation_plot": _plot_markdown(plot),
        "evaluation_plot_uri": plot_uri,
    }
    checks = [
        dg.AssetCheckResult(
            asset_key=MODEL_KEY,
            check_name=BEATS_BASELINE,
            passed=verdict.beats_baseline,
            metadata={
                "oot_roc_auc": metrics["oot_roc_auc"],
                "oot_baseline_roc_auc": metrics["oot_baseline_roc_auc"],
            },
            description=verdict.baseline_text,
        ),
        dg.AssetCheckResult(
            asset_key=MODEL_KEY,
            check_name=BEATS_CHAMPION,
            passed=verdict.beats_champion is not False,
            metadata={"champion_version": champion.version if champion else ""},
            description=verdict.champion_text,
        ),
    ]
    return metadata, checks


def alias_moved(
    version: str, previous: str | None, *, alias: str, by: str, why: str
) -> dg.AssetObservation:
    """What an alias move by a person records on flight_delay_model."""
    return dg.AssetObservation(
        MODEL_KEY,
        metadata={
            "alias": alias,
            "registry_version": version,
            "previous_version": previous or "",
            "by": by,
            "reason": why,
        },
        description=f"{MODEL_NAME}@{alias}: {previous or 'none'} -> {version} by {by}: {why}",
    )


def who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in a container without a passwd entry
        return "unknown"


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
                description="Out-of-time ROC AUC (the last weeks before the cutoff, never "
                "trained on) must beat the carrier x scheduled-hour baseline's; a model that "
                "does not never becomes champion.",
            ),
            dg.AssetCheckSpec(
                BEATS_CHAMPION,
                asset=MODEL_KEY,
                blocking=True,
                description="Not worse than the current champion, re-scored on this model's "
                f"own out-of-time window (ROC AUC within {TOLERANCE['oot_roc_auc']}, log loss "
                f"within {TOLERANCE['oot_log_loss']}); passes when there is no champion yet.",
            ),
        ],
    )
    def flight_delay_model(
        context: dg.AssetExecutionContext,
        config: TrainingConfig,
        warehouse: dg.ResourceParam[Warehouse],
        pipeline_runner: dg.ResourceParam[PipelineRunner],
        templates: dg.ResourceParam[TemplateRegistry],
        artifacts: dg.ResourceParam[ArtifactStore],
        model_registry: dg.ResourceParam[ModelRegistry],
    ) -> dg.MaterializeResult:
        """A gradient-boosted classifier of departure delay >= 15 min, trained by the Kubeflow
        training pipeline on flights before the cutoff, evaluated out of time and on the test
        split, registered as a challenger and promoted to champion if it passes its checks."""
        cutoff = (
            date.fromisoformat(config.cutoff_date)
            if config.cutoff_date
            else settings.training_cutoff
        )
        champion = model_registry.get(CHAMPION)
        job = run_pipeline(
            context,
            settings,
            runner=pipeline_runner,
            templates=templates,
            parameters=training_parameters(
                settings,
                warehouse.uri,
                cutoff,
                champion.artifact_uri if champion else "",
                max_iter=config.max_iter,
            ),
        )
        metadata, checks = record_training(
            job,
            artifacts,
            model_registry,
            dagster_run=context.run.run_id,
            by=f"run {context.run.run_id}",
        )
        context.log.info(metadata["decision"])
        return dg.MaterializeResult(
            metadata={**metadata, "cutoff_date": cutoff.isoformat()}, check_results=checks
        )

    return flight_delay_model
