"""``model_performance``: how the model that scored a day did, once the day's outcomes are
known; three non-blocking drift checks against the champion's out-of-time validation.

Each daily partition joins the day's predictions with its actual outcomes (flight_features'
``is_delayed``; cancelled flights have none and are left out), records the day's metrics,
the score distribution's PSI against the validation deciles, the figures it is compared with
and a plot of every day measured so far. The checks warn and never block: a drifting day is
worth a look (and, three in a row, a retrain: ``ml_platform/retraining.py``), not a failed run.
"""

import base64
import io
from collections.abc import Mapping
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import dagster as dg

from ml_platform import monitoring
from ml_platform.assets.ingest import RAW_ASSET_KEYS
from ml_platform.assets.predictions import DAILY_2013, PREDICTIONS_KEY
from ml_platform.launch import PREDICTIONS_TABLE
from ml_platform.pipelines.model import DATE, KEY, TARGET
from ml_platform.resources.model_registry import CHAMPION, ModelRegistry, ModelVersion
from ml_platform.resources.warehouse import Warehouse
from ml_platform.settings import Settings

if TYPE_CHECKING:
    import pandas as pd

PERFORMANCE_KEY = dg.AssetKey("model_performance")
FEATURES_KEY = dg.AssetKey(["features", "flight_features"])
FEATURES_TABLE = "flight_features"
PROBABILITY = "delay_probability"

# The day's metrics, as model_performance records them (rounded to 4 digits).
METRICS = (
    "roc_auc",
    "log_loss",
    "brier_score",
    "predicted_delay_rate",
    "actual_delay_rate",
    "calibration_error",
)
PSI = "psi"
# The names of the checks that warned on a day (a JSON list, empty on a good day). The
# retrain sensor reads them here: Dagster has no public API to read check evaluations.
DRIFT_WARNINGS = "drift_warnings"
REGISTRY_VERSION = "registry_version"
# The version whose out-of-time validation the day is compared with (the one that scored it,
# or the champion if the predictions recorded none); its figures as validation_<metric>.
COMPARED_WITH = "compared_with_version"
PLOT = "performance_plot"

AUC_CHECK = "auc_holds"
CALIBRATION_CHECK = "calibration_holds"
PSI_CHECK = "scores_stable"
CHECK_DESCRIPTIONS = {
    AUC_CHECK: (
        "The day's ROC AUC (flights with known outcomes) is at least the out-of-time validation "
        f"AUC of the model that scored it minus {monitoring.AUC_DROP} (some 2.5 standard "
        "errors of one day's AUC). Warns, never blocks."
    ),
    CALIBRATION_CHECK: (
        "The day's expected calibration error (10 equal-count bins) is at most "
        f"max({monitoring.CALIBRATION_FACTOR:g} x the model's out-of-time calibration error, "
        f"{monitoring.CALIBRATION_FLOOR}): worse than its validation, beyond one day's noise. "
        "Warns, never blocks."
    ),
    PSI_CHECK: (
        "The population stability index of the day's scores against the deciles of the "
        f"model's out-of-time validation scores is at most {monitoring.PSI_LIMIT} (above it, a "
        "significant shift of what the model sees). Warns, never blocks."
    ),
}


def latest_per_day(instance: dg.DagsterInstance) -> dict[str, dict[str, Any]]:
    """The metadata values of each partition's latest model_performance materialization."""
    days: dict[str, dict[str, Any]] = {}
    cursor = None
    while True:
        # Newest first: the first record of a partition is its latest.
        page = instance.fetch_materializations(PERFORMANCE_KEY, limit=1000, cursor=cursor)
        for record in page.records:
            materialization = record.asset_materialization
            if materialization is None or materialization.partition is None:
                continue
            if materialization.partition not in days:
                days[materialization.partition] = {
                    name: value.value for name, value in materialization.metadata.items()
                }
        if not page.has_more:
            return days
        cursor = page.cursor


def _scoring_version(instance: dg.DagsterInstance, day: str) -> str | None:
    """The registry version the day's predictions scored with, from their latest
    materialization; None if they recorded none."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=PREDICTIONS_KEY, asset_partitions=[day]), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    value = records[0].asset_materialization.metadata.get(REGISTRY_VERSION)
    return str(value.value) if value is not None and value.value else None


def _reference(
    context: dg.AssetExecutionContext, registry: ModelRegistry, day: str
) -> tuple[str | None, ModelVersion]:
    """The model version the day is compared with: the one that scored it, or the champion
    when its predictions recorded no version (scored before versions were recorded)."""
    version = _scoring_version(context.instance, day)
    if version is None:
        context.log.warning(
            f"the predictions for {day} recorded no {REGISTRY_VERSION}; comparing with the "
            "current champion"
        )
        model = registry.get(CHAMPION)
        if model is None:
            raise dg.Failure(
                f"no {CHAMPION} in the model registry to compare {day} with", allow_retries=False
            )
        return None, model
    model = registry.get(version)
    if model is None:
        raise dg.Failure(
            f"the model registry has no version {version!r} (which scored {day})",
            allow_retries=False,
        )
    return version, model


def _frame(data: Any) -> "pd.DataFrame":
    # The warehouse contract returns a DataFrame; a pyarrow table converts the same way.
    return data.to_pandas() if hasattr(data, "to_pandas") else data


def _scored_outcomes(
    warehouse: Warehouse, settings: Settings, day: date
) -> tuple["pd.DataFrame", int]:
    """The day's scored flights with known outcomes (probability, 0/1), and how many scored
    flights have none (cancelled). Refuses a day without predictions or without outcomes."""
    predictions_dataset = settings.dataset("predictions")
    features_dataset = settings.dataset("features")
    window = {"date_column": DATE, "start": day, "end": day + timedelta(days=1)}
    predictions = (
        _frame(warehouse.read_table(predictions_dataset, PREDICTIONS_TABLE, **window))
        if warehouse.table_exists(predictions_dataset, PREDICTIONS_TABLE)
        else None
    )
    if predictions is None or predictions.empty:
        raise dg.Failure(
            f"no predictions for {day} in {predictions_dataset}.{PREDICTIONS_TABLE}: "
            f"materialize flight_delay_predictions for {day} first",
            allow_retries=False,
        )
    outcomes = (
        _frame(warehouse.read_table(features_dataset, FEATURES_TABLE, **window))
        if warehouse.table_exists(features_dataset, FEATURES_TABLE)
        else None
    )
    joined = (
        predictions[[KEY, PROBABILITY]].merge(outcomes[[KEY, TARGET]], on=KEY, how="left")
        if outcomes is not None
        else predictions[[KEY, PROBABILITY]].assign(**{TARGET: None})
    )
    known = joined[joined[TARGET].notna()]
    if known.empty:
        raise dg.Failure(
            f"the outcomes of {day} are not known yet: {features_dataset}.{FEATURES_TABLE} has "
            f"no {TARGET} for any of its {len(joined)} scored flights",
            allow_retries=False,
        )
    scored = known.assign(**{TARGET: known[TARGET].astype(bool).astype(int)})
    return scored, len(joined) - len(known)


def performance_plot(
    days: Mapping[str, Mapping[str, Any]],
    reference: Mapping[str, float],
    thresholds: Mapping[str, float],
) -> bytes:
    """Every measured day's metrics over date (a PNG): one panel per metric, the reference
    model's validation level dashed and the warning level dotted."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import dates as mdates
    from matplotlib import pyplot as plt

    dates = [date.fromisoformat(day) for day in sorted(days)]

    def series(name: str) -> list[float]:
        return [float(days[day].get(name, float("nan"))) for day in sorted(days)]

    panels = [
        ("ROC AUC", ["roc_auc"], reference.get("oot_roc_auc"), thresholds["min_roc_auc"]),
        ("log loss", ["log_loss"], reference.get("oot_log_loss"), None),
        ("Brier score", ["brier_score"], reference.get("oot_brier_score"), None),
        (
            "calibration error",
            ["calibration_error"],
            reference.get("oot_calibration_error"),
            thresholds["max_calibration_error"],
        ),
        (
            "delay rate",
            ["actual_delay_rate", "predicted_delay_rate"],
            reference.get("oot_delay_rate"),
            None,
        ),
        ("PSI of the scores", [PSI], 0.0, thresholds["max_psi"]),
    ]
    figure, axes = plt.subplots(2, 3, figsize=(12, 6), dpi=80, sharex=True)
    for axis, (title, names, level, threshold) in zip(axes.flat, panels, strict=True):
        for name in names:
            axis.plot(dates, series(name), marker="o", markersize=3, label=name)
        if level is not None:
            axis.axhline(level, color="grey", linestyle="--", linewidth=1, label="validation")
        if threshold is not None:
            axis.axhline(threshold, color="red", linestyle=":", linewidth=1, label="warns beyond")
        axis.set_title(title)
        axis.legend(fontsize="x-small", loc="best")
        locator = mdates.AutoDateLocator(minticks=3, maxticks=8)
        axis.xaxis.set_major_locator(locator)
        axis.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    figure.suptitle("model_performance by day (dashed: out-of-time validation)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _plot_markdown(png: bytes) -> dg.MetadataValue:
    # Embedded, so the plot shows in the UI with nothing else to read.
    encoded = base64.b64encode(png).decode()
    return dg.MetadataValue.md(f"![model performance](data:image/png;base64,{encoded})")


def _check(name: str, passed: bool, value: float, threshold: float, text: str):
    return dg.AssetCheckResult(
        check_name=name,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"value": round(value, 4), "threshold": round(threshold, 4)},
        description=text,
    )


def build_performance_asset(settings: Settings) -> dg.AssetsDefinition:
    @dg.asset(
        key=PERFORMANCE_KEY,
        deps=[PREDICTIONS_KEY, RAW_ASSET_KEYS["flights"], FEATURES_KEY],
        partitions_def=DAILY_2013,
        group_name="ml",
        check_specs=[
            dg.AssetCheckSpec(name, asset=PERFORMANCE_KEY, blocking=False, description=text)
            for name, text in CHECK_DESCRIPTIONS.items()
        ],
    )
    def model_performance(
        context: dg.AssetExecutionContext,
        warehouse: dg.ResourceParam[Warehouse],
        model_registry: dg.ResourceParam[ModelRegistry],
    ) -> dg.MaterializeResult:
        """How the model that scored the day did once its outcomes are known: ROC AUC, log
        loss, Brier score, calibration and the drift of its scores, against its out-of-time
        validation."""
        day = context.partition_key
        scored, without_outcome = _scored_outcomes(warehouse, settings, date.fromisoformat(day))
        version, model = _reference(context, model_registry, day)
        missing = [name for name in monitoring.VALIDATION_METRICS if name not in model.metrics]
        try:
            if missing:
                raise ValueError(f"its metrics lack {', '.join(missing)}")
            thresholds = monitoring.drift_thresholds(model.metrics)
            deciles = monitoring.reference_deciles(model.metrics)
        except ValueError as error:
            raise dg.Failure(
                f"cannot compare {day} with model version {model.version}: {error}",
                allow_retries=False,
            ) from error
        probabilities = scored[PROBABILITY].to_numpy()
        outcomes = scored[TARGET].to_numpy()
        try:
            performance = monitoring.day_performance(probabilities, outcomes)
        except ValueError as error:  # e.g. a day on which every flight was on time
            raise dg.Failure(f"cannot measure {day}: {error}", allow_retries=False) from error
        # The scores of the flights that flew: the population the validation deciles are of.
        stability = monitoring.psi(probabilities, deciles)

        auc, ece = performance["roc_auc"], performance["calibration_error"]
        checks = [
            _check(
                AUC_CHECK,
                auc >= thresholds["min_roc_auc"],
                auc,
                thresholds["min_roc_auc"],
                f"ROC AUC {auc:.4f}, warns below {thresholds['min_roc_auc']:.4f}",
            ),
            _check(
                CALIBRATION_CHECK,
                ece <= thresholds["max_calibration_error"],
                ece,
                thresholds["max_calibration_error"],
                f"calibration error {ece:.4f}, warns above "
                f"{thresholds['max_calibration_error']:.4f}",
            ),
            _check(
                PSI_CHECK,
                stability <= thresholds["max_psi"],
                stability,
                thresholds["max_psi"],
                f"PSI {stability:.4f}, warns above {thresholds['max_psi']:.4f}",
            ),
        ]
        warnings = [check.check_name for check in checks if not check.passed]
        for check in checks:
            (context.log.info if check.passed else context.log.warning)(
                f"{check.check_name}: {check.description}"
            )

        today = {name: round(float(performance[name]), 4) for name in METRICS}
        today[PSI] = round(stability, 4)
        days = {**latest_per_day(context.instance), day: today}
        plot = performance_plot(days, model.metrics, thresholds)
        return dg.MaterializeResult(
            metadata={
                **today,
                "flights": int(performance["flights"]),
                "flights_without_outcome": without_outcome,
                REGISTRY_VERSION: version or "",
                COMPARED_WITH: model.version,
                **{
                    f"validation_{name.removeprefix('oot_')}": round(float(model.metrics[name]), 4)
                    for name in monitoring.VALIDATION_METRICS
                },
                DRIFT_WARNINGS: dg.MetadataValue.json(warnings),
                PLOT: _plot_markdown(plot),
            },
            check_results=checks,
        )

    return model_performance
