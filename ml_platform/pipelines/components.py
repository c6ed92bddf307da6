"""Kubeflow components: thin shells that move artifacts and call ``model.py``.

Each component runs in its own process (a subprocess under kfp.local, a container on
Vertex AI) from the same installed ``ml_platform`` package, so its body imports the
package's plain functions instead of repeating them. ``install_kfp_package=False``: the
component image already has kfp (it is the project's own image), and a uv venv has no pip.
"""

from functools import partial
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

# The image is a stand-in: ml_platform.pipelines.compile sets every executor's image to the
# deployment's component image when it compiles a template.
component = partial(dsl.component, base_image="python:3.11-slim", install_kfp_package=False)


@component
def train_and_evaluate(
    warehouse_uri: str,
    dataset: str,
    table: str,
    cutoff_date: str,
    champion_model_uri: str,
    max_iter: int,
    model: Output[Model],
    metrics: Output[Metrics],
    evaluation_plot: Output[Artifact],
) -> NamedTuple(
    "Training",
    roc_auc=float,
    baseline_roc_auc=float,
    oot_roc_auc=float,
    data_fingerprint=str,
):
    """Flights before the cutoff from the warehouse: the out-of-time window (the last weeks
    before the cutoff, never trained on), and the earlier flights split by the table's split
    column into train and test. The gradient-boosted classifier is fitted on train and
    evaluated out of time (beside the baseline and the current champion re-scored on the
    window) and on the test split, against the carrier x hour baseline.

    One component, not three: each would be a process (a container on Vertex AI) importing
    pandas and scikit-learn again and passing the data on through files."""
    from collections import namedtuple
    from datetime import date, timedelta

    import sklearn

    from ml_platform.pipelines import model as flight_model
    from ml_platform.resources.backends import open_warehouse

    cutoff = date.fromisoformat(cutoff_date)
    where = f"{dataset}.{table}"
    rows = open_warehouse(warehouse_uri).read_table(
        dataset, table, date_column=flight_model.DATE, end=cutoff
    )
    earlier, window = flight_model.hold_out_window(rows, cutoff, where=where)
    window_start = cutoff - timedelta(days=flight_model.HOLDOUT_DAYS)
    train, test = flight_model.split_training_data(earlier, window_start, where=where)

    estimator = flight_model.train_model(train, max_iter=max_iter)
    model.metadata["version"] = flight_model.save_model(estimator, model.path)
    model.metadata["framework"] = f"scikit-learn {sklearn.__version__}"
    model.metadata["features"] = list(flight_model.FEATURES)
    model.metadata["iterations"] = int(estimator[-1].n_iter_)
    for name, frame in (("train", train), ("test", test), ("validation", window)):
        model.metadata[f"{name}_rows"] = len(frame)
        delay_rate = frame[flight_model.TARGET].astype(float).mean()
        model.metadata[f"{name}_delay_rate"] = float(delay_rate)
    model.metadata["validation_window"] = f"{window_start} .. {cutoff}"

    evaluation, curves = flight_model.evaluate(estimator, train, test)
    champion = None
    if champion_model_uri:
        champion, _ = flight_model.load_model(flight_model.local_path(champion_model_uri))
    out_of_time = flight_model.evaluate_out_of_time(estimator, train, window, champion)
    for name, value in {**out_of_time, **evaluation.as_dict()}.items():
        metrics.log_metric(name, value)
    flight_model.plot_evaluation(evaluation, curves, evaluation_plot.path)
    evaluation_plot.metadata["mime_type"] = "image/png"
    fields = ["roc_auc", "baseline_roc_auc", "oot_roc_auc", "data_fingerprint"]
    return namedtuple("Training", fields)(
        evaluation.roc_auc,
        evaluation.baseline_roc_auc,
        out_of_time["oot_roc_auc"],
        flight_model.data_fingerprint(train, test, window),
    )


@component
def score_flights(
    model: Input[Model],
    warehouse_uri: str,
    features_dataset: str,
    features_table: str,
    predictions_dataset: str,
    predictions_table: str,
    flight_date: str,
    days: int,
    pipeline_job: str,
) -> NamedTuple("Scoring", rows=int, rows_by_day=dict, mean_probability=float, model_version=str):
    """Score every flight of ``days`` days from ``flight_date`` (a backfill is one job) and
    replace each day's predictions atomically, day by day."""
    from collections import namedtuple
    from datetime import date, timedelta

    from ml_platform.pipelines import model as flight_model
    from ml_platform.resources.backends import open_warehouse

    # The model is read first: an unreadable artifact fails before the warehouse is touched.
    estimator, model_version = flight_model.load_model(model.path)
    first = date.fromisoformat(flight_date)
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    warehouse = open_warehouse(warehouse_uri)
    # One read and one scoring pass for the whole range; each day's rows are its own.
    features = warehouse.read_table(
        features_dataset,
        features_table,
        date_column=flight_model.DATE,
        start=first,
        end=first + timedelta(days=days),
    )
    days_scored = [first + timedelta(days=offset) for offset in range(days)]
    parts = flight_model.score_days(estimator, model_version, features, days_scored, pipeline_job)
    # Each day's rows replaced atomically (DuckDB: all days in one transaction).
    written = warehouse.replace_partitions(
        predictions_dataset, predictions_table, flight_model.DATE, parts
    )
    rows_by_day = {day.isoformat(): rows for day, rows in written.items()}
    probabilities = [
        p for part in parts.values() for p in part.column("delay_probability").to_pylist()
    ]
    total, weighted = len(probabilities), sum(probabilities)
    mean = weighted / total if total else 0.0
    return namedtuple("Scoring", ["rows", "rows_by_day", "mean_probability", "model_version"])(
        sum(rows_by_day.values()), rows_by_day, mean, model_version
    )
