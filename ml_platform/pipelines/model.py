"""The flight delay model as plain functions: what the Kubeflow components call.

No Kubeflow and no Dagster here, so every step is unit-testable on a DataFrame. Heavy
libraries are imported inside the functions: this module is also imported by the
Dagster code location (for the feature list), which must stay quick to import.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

TARGET = "is_delayed"
KEY = "flight_key"
DATE = "flight_date"
CATEGORICAL_FEATURES = ("carrier", "origin", "dest")
NUMERIC_FEATURES = (
    "sched_dep_hour", "month", "day_of_week", "distance",
    "temp", "dewp", "humid", "wind_speed", "wind_gust", "precip", "pressure", "visib",
    "plane_year", "plane_seats",
)  # fmt: skip
FEATURES = CATEGORICAL_FEATURES + NUMERIC_FEATURES
# The baseline: the historical delay rate of the flight's carrier at its scheduled hour.
BASELINE_KEYS = ("carrier", "sched_dep_hour")
# Boosting iterations at most (early stopping usually ends sooner): a training parameter.
MAX_ITER = 300
# The out-of-time window: the last weeks before the cutoff, held out of training entirely and
# scored as the days after the cutoff will be. A random per-flight split (the test split)
# shares days, weather and schedules with training, so it flatters the model.
HOLDOUT_DAYS = 21
# A model file starts with this line, so a wrong or truncated file is named as such.
_MODEL_MAGIC = b"ml-platform flight-delay model v1\n"


class DataError(ValueError):
    """Input rows that a step cannot use; the message names the table and the problem."""


class ModelArtifactError(ValueError):
    """A model artifact that cannot be read."""


def check_columns(frame: pd.DataFrame, required: Sequence[str], where: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{where} lacks columns {missing} (has {list(frame.columns)})")


def split_training_data(
    frame: pd.DataFrame, cutoff: date, where: str = "training data"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Flights before ``cutoff``, split by the warehouse's deterministic ``split`` column."""
    import pandas as pd

    check_columns(frame, [KEY, DATE, TARGET, "split", *FEATURES], where)
    before = frame[pd.to_datetime(frame[DATE]) < pd.Timestamp(cutoff)]
    if before[TARGET].isna().any():
        raise DataError(f"{where} has rows without {TARGET} (cancelled flights must be excluded)")
    unknown = set(before["split"].unique()) - {"train", "test"}
    if unknown:
        raise DataError(f"{where} has split values {sorted(unknown)}; expected train/test")
    # Sorted by key: a warehouse returns rows in any order, and the same rows in the same
    # order make the same model (early stopping holds out a slice of the rows by position).
    before = before.sort_values(KEY, kind="stable")
    train = before[before["split"] == "train"].reset_index(drop=True)
    test = before[before["split"] == "test"].reset_index(drop=True)
    for name, part in (("train", train), ("test", test)):
        if part.empty or part[TARGET].nunique() < 2:
            raise DataError(
                f"{where} before {cutoff} has no usable {name} rows "
                f"({len(part)} rows, both classes needed)"
            )
    return train, test


def hold_out_window(
    frame: pd.DataFrame, cutoff: date, where: str = "training data", days: int = HOLDOUT_DAYS
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Flights before ``cutoff`` as (earlier, window): the window is the last ``days`` days
    before the cutoff, all of its flights whatever their split; the rest trains and tests."""
    import pandas as pd

    check_columns(frame, [KEY, DATE, TARGET], where)
    start = cutoff - timedelta(days=days)
    dates = pd.to_datetime(frame[DATE])
    earlier = frame[dates < pd.Timestamp(start)]
    window = frame[(dates >= pd.Timestamp(start)) & (dates < pd.Timestamp(cutoff))]
    window = window[window[TARGET].notna()].sort_values(KEY, kind="stable")
    if window.empty or window[TARGET].nunique() < 2:
        raise DataError(
            f"{where} has no usable out-of-time rows from {start} to {cutoff} "
            f"({len(window)} rows, both classes needed)"
        )
    return earlier, window.reset_index(drop=True)


def data_fingerprint(*frames: pd.DataFrame) -> str:
    """What the rows a model learns from and is judged on hash to (their keys, target and
    features, in key order): two trainings on the same rows have the same fingerprint."""
    import pandas as pd

    digest = hashlib.sha256()
    for frame in frames:
        rows = frame.sort_values(KEY, kind="stable")[[KEY, TARGET, *FEATURES]]
        digest.update(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def _feature_frame(frame: pd.DataFrame) -> pd.DataFrame:
    features = frame[list(FEATURES)].copy()
    for column in CATEGORICAL_FEATURES:
        features[column] = features[column].astype("string").astype(object)
    for column in NUMERIC_FEATURES:
        features[column] = features[column].astype("float64")
    return features


def train_model(train: pd.DataFrame, *, random_state: int = 0, max_iter: int = MAX_ITER):
    """A gradient-boosted classifier; categorical columns are encoded inside the pipeline."""
    import numpy as np
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OrdinalEncoder

    check_columns(train, [*FEATURES, TARGET], "training rows")
    encoder = ColumnTransformer(
        [
            (
                "categorical",
                # Unknown carriers/airports at scoring time become "missing", not an error.
                OrdinalEncoder(
                    handle_unknown="use_encoded_value",
                    unknown_value=np.nan,
                    encoded_missing_value=np.nan,
                ),
                list(CATEGORICAL_FEATURES),
            )
        ],
        remainder="passthrough",
        verbose_feature_names_out=False,
    ).set_output(transform="pandas")
    classifier = HistGradientBoostingClassifier(
        max_iter=max_iter,
        learning_rate=0.1,
        max_leaf_nodes=63,
        categorical_features=list(CATEGORICAL_FEATURES),
        early_stopping=True,
        validation_fraction=0.1,
        n_iter_no_change=20,
        random_state=random_state,
    )
    model = Pipeline([("encode", encoder), ("classify", classifier)])
    model.fit(_feature_frame(train), train[TARGET].astype(int))
    return model


def predict_proba(model, frame: pd.DataFrame):
    check_columns(frame, FEATURES, "rows to score")
    return model.predict_proba(_feature_frame(frame))[:, 1]


def baseline_rates(train: pd.DataFrame, smoothing: float = 20.0) -> pd.DataFrame:
    """Delay rate by carrier x scheduled hour, shrunk toward the overall rate for rare cells."""
    overall = float(train[TARGET].astype(float).mean())
    grouped = train.groupby(list(BASELINE_KEYS))[TARGET].agg(["sum", "count"]).reset_index()
    grouped["rate"] = (grouped["sum"] + smoothing * overall) / (grouped["count"] + smoothing)
    return grouped[[*BASELINE_KEYS, "rate"]].assign(overall=overall)


def baseline_proba(rates: pd.DataFrame, frame: pd.DataFrame):
    merged = frame[list(BASELINE_KEYS)].merge(rates, on=list(BASELINE_KEYS), how="left")
    return merged["rate"].fillna(rates["overall"].iloc[0]).to_numpy()


@dataclass(frozen=True)
class Evaluation:
    test_rows: int
    train_rows: int
    delay_rate: float
    roc_auc: float
    log_loss: float
    brier_score: float
    baseline_roc_auc: float
    baseline_log_loss: float
    baseline_brier_score: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @property
    def beats_baseline(self) -> bool:
        return self.roc_auc > self.baseline_roc_auc


def evaluate(model, train: pd.DataFrame, test: pd.DataFrame) -> tuple[Evaluation, dict]:
    """Test-split metrics for the model and the baseline, plus the curves for the plot."""
    import numpy as np
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score, roc_curve

    actual = test[TARGET].astype(int).to_numpy()
    predicted = np.clip(predict_proba(model, test), 1e-6, 1 - 1e-6)
    baseline = np.clip(baseline_proba(baseline_rates(train), test), 1e-6, 1 - 1e-6)
    evaluation = Evaluation(
        test_rows=len(test),
        train_rows=len(train),
        delay_rate=float(actual.mean()),
        roc_auc=float(roc_auc_score(actual, predicted)),
        log_loss=float(log_loss(actual, predicted)),
        brier_score=float(brier_score_loss(actual, predicted)),
        baseline_roc_auc=float(roc_auc_score(actual, baseline)),
        baseline_log_loss=float(log_loss(actual, baseline)),
        baseline_brier_score=float(brier_score_loss(actual, baseline)),
    )
    curves = {
        "model_roc": roc_curve(actual, predicted)[:2],
        "baseline_roc": roc_curve(actual, baseline)[:2],
        "calibration": calibration_curve(actual, predicted, n_bins=10, strategy="quantile"),
    }
    return evaluation, curves


def evaluate_out_of_time(
    model, train: pd.DataFrame, window: pd.DataFrame, champion=None
) -> dict[str, float]:
    """The model on the out-of-time window, beside the baseline and, if given, the champion
    re-scored on the same window (two models' figures on different windows do not compare).
    Also the window's score deciles: the reference distribution drift is measured against."""
    import numpy as np
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    from ml_platform.monitoring import calibration_error, window_days

    actual = window[TARGET].astype(int).to_numpy()

    def scores(prefix: str, predicted) -> dict[str, float]:
        predicted = np.clip(predicted, 1e-6, 1 - 1e-6)
        return {
            f"{prefix}roc_auc": float(roc_auc_score(actual, predicted)),
            f"{prefix}log_loss": float(log_loss(actual, predicted, labels=[0, 1])),
            f"{prefix}brier_score": float(brier_score_loss(actual, predicted)),
        }

    predicted = predict_proba(model, window)
    metrics = {
        "oot_rows": float(len(window)),
        "oot_delay_rate": float(actual.mean()),
        "oot_mean_probability": float(predicted.mean()),
        "oot_calibration_error": float(calibration_error(predicted, actual)),
        **scores("oot_", predicted),
        **scores("oot_baseline_", baseline_proba(baseline_rates(train), window)),
    }
    metrics.update(window_days(predicted, actual, window[DATE].astype(str).to_numpy()))
    deciles = np.quantile(predicted, np.linspace(0.1, 0.9, 9))
    metrics.update({f"oot_score_q{i}": float(q) for i, q in enumerate(deciles, start=1)})
    if champion is not None:
        metrics.update(scores("champion_oot_", predict_proba(champion, window)))
    return metrics


def plot_evaluation(evaluation: Evaluation, curves: dict, path: Path) -> None:
    """ROC curves (model vs baseline) and the model's calibration, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (roc, calibration) = plt.subplots(1, 2, figsize=(9, 4), dpi=80)
    fpr, tpr = curves["model_roc"]
    roc.plot(fpr, tpr, label=f"model (AUC {evaluation.roc_auc:.3f})")
    fpr, tpr = curves["baseline_roc"]
    roc.plot(fpr, tpr, label=f"carrier x hour (AUC {evaluation.baseline_roc_auc:.3f})")
    roc.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    roc.set(title="ROC, test split", xlabel="false positive rate", ylabel="true positive rate")
    roc.legend(loc="lower right")
    observed, predicted = curves["calibration"]
    calibration.plot(predicted, observed, marker="o", label="model")
    calibration.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    calibration.set(
        title="Calibration (deciles)", xlabel="predicted delay rate", ylabel="observed delay rate"
    )
    calibration.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def save_model(model, path: Path) -> str:
    """Write the model; returns its version, the sha256 of the file's content."""
    payload = _MODEL_MAGIC + pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
    Path(path).write_bytes(payload)
    return f"sha256:{hashlib.sha256(payload).hexdigest()}"


def local_path(uri: str) -> str:
    """A model URI as a path a component can open: on Vertex AI, Cloud Storage is mounted
    at /gcs (Cloud Storage FUSE), so gs://BUCKET/NAME is /gcs/BUCKET/NAME."""
    return "/gcs/" + uri.removeprefix("gs://") if uri.startswith("gs://") else uri


def load_model(path: str | Path):
    """Read a model written by ``save_model``; anything else is a ``ModelArtifactError``."""
    try:
        payload = Path(path).read_bytes()
    except OSError as error:
        raise ModelArtifactError(f"cannot read model artifact {path}: {error}") from error
    if not payload.startswith(_MODEL_MAGIC):
        raise ModelArtifactError(
            f"model artifact {path} is not a flight-delay model (wrong header, "
            f"{len(payload)} bytes)"
        )
    try:
        model = pickle.load(io.BytesIO(payload[len(_MODEL_MAGIC) :]))
    except Exception as error:
        raise ModelArtifactError(f"model artifact {path} is corrupt: {error}") from error
    if not hasattr(model, "predict_proba"):
        raise ModelArtifactError(f"model artifact {path} holds no classifier")
    return model, f"sha256:{hashlib.sha256(payload).hexdigest()}"


def score_flights(
    model, model_version: str, features: pd.DataFrame, flight_date: date, pipeline_job: str
) -> pa.Table:
    """One row per flight of the day, in the predictions table's schema."""
    return score_days(model, model_version, features, [flight_date], pipeline_job)[flight_date]


def score_days(
    model, model_version: str, features: pd.DataFrame, days: Sequence[date], pipeline_job: str
) -> dict[date, pa.Table]:
    """One table per day (one row per flight of it, in the predictions table's schema), the
    flights of every day scored in one pass: a prediction call has a fixed cost (92 days
    one by one take three times as long)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    check_columns(features, [KEY, DATE, *FEATURES], "flight features")
    flight_days = pd.to_datetime(features[DATE]).dt.date
    wanted = features[flight_days.isin(set(days))]
    probabilities = predict_proba(model, wanted) if len(wanted) else []
    scored_at = pd.Timestamp.now("UTC").tz_localize(None).floor("s").to_pydatetime()
    rows = len(wanted)
    scored = pa.table(
        {
            KEY: wanted[KEY].astype(str).tolist(),
            DATE: flight_days[wanted.index].tolist(),
            "delay_probability": [float(p) for p in probabilities],
            "model_version": [model_version] * rows,
            "pipeline_job": [pipeline_job] * rows,
            "scored_at": [scored_at] * rows,
        },
        schema=predictions_schema(),
    )
    return {day: scored.filter(pc.equal(scored[DATE], pa.scalar(day, pa.date32()))) for day in days}


def predictions_schema():
    """The predictions table's columns (built on call: pyarrow stays out of imports)."""
    import pyarrow as pa

    return pa.schema(
        [
            (KEY, pa.string()),
            (DATE, pa.date32()),
            ("delay_probability", pa.float64()),
            ("model_version", pa.string()),
            ("pipeline_job", pa.string()),
            ("scored_at", pa.timestamp("us")),
        ]
    )
