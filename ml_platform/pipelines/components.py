"""Kubeflow components: thin shells that move artifacts and call ``model.py``.

Each component runs in its own process (a subprocess under kfp.local, a container on
Vertex AI) from the same installed ``ml_platform`` package, so its body imports the
package's plain functions instead of repeating them. ``install_kfp_package=False``: the
component image already has kfp (it is the project's own image), and a uv venv has no pip.
"""

from functools import partial
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

# The image is a stand-in: ml_platform.pipelines.compile sets every executor's image to the
# deployment's component image when it compiles a template.
component = partial(dsl.component, base_image="python:3.11-slim", install_kfp_package=False)


@component
def load_training_data(
    warehouse_uri: str,
    dataset: str,
    table: str,
    cutoff_date: str,
    train: Output[Dataset],
    test: Output[Dataset],
    validation: Output[Dataset],
) -> NamedTuple("Loaded", data_fingerprint=str):
    """Flights before the cutoff from the warehouse: the out-of-time window (the last weeks
    before the cutoff, never trained on), and the earlier flights split by the table's split
    column into train and test."""
    from collections import namedtuple
    from datetime import date, timedelta

    from ml_platform.pipelines import model
    from ml_platform.resources.backends import open_warehouse

    cutoff = date.fromisoformat(cutoff_date)
    where = f"{dataset}.{table}"
    rows = open_warehouse(warehouse_uri).read_table(
        dataset, table, date_column=model.DATE, end=cutoff
    )
    earlier, window = model.hold_out_window(rows, cutoff, where=where)
    window_start = cutoff - timedelta(days=model.HOLDOUT_DAYS)
    train_rows, test_rows = model.split_training_data(earlier, window_start, where=where)
    for artifact, frame in ((train, train_rows), (test, test_rows), (validation, window)):
        frame.to_parquet(artifact.path, index=False)
        artifact.metadata["rows"] = len(frame)
        artifact.metadata["delay_rate"] = float(frame[model.TARGET].astype(float).mean())
    validation.metadata["window"] = f"{window_start} .. {cutoff}"
    fingerprint = model.data_fingerprint(train_rows, test_rows, window)
    return namedtuple("Loaded", ["data_fingerprint"])(fingerprint)


@component
def train_model(train: Input[Dataset], max_iter: int, model: Output[Model]):
    """Fit the gradient-boosted classifier on the train split."""
    import pandas as pd
    import sklearn

    from ml_platform.pipelines import model as flight_model

    rows = pd.read_parquet(train.path)
    estimator = flight_model.train_model(rows, max_iter=max_iter)
    model.metadata["version"] = flight_model.save_model(estimator, model.path)
    model.metadata["framework"] = f"scikit-learn {sklearn.__version__}"
    model.metadata["features"] = list(flight_model.FEATURES)
    model.metadata["train_rows"] = len(rows)
    model.metadata["iterations"] = int(estimator[-1].n_iter_)


@component
def evaluate_model(
    model: Input[Model],
    train: Input[Dataset],
    test: Input[Dataset],
    validation: Input[Dataset],
    champion_model_uri: str,
    metrics: Output[Metrics],
    evaluation_plot: Output[Artifact],
) -> NamedTuple("Evaluation", roc_auc=float, baseline_roc_auc=float, oot_roc_auc=float):
    """The model out of time (the held-out window, beside the baseline and the current
    champion re-scored on it) and on the test split, against the carrier x hour baseline."""
    from collections import namedtuple

    import pandas as pd

    from ml_platform.pipelines import model as flight_model

    estimator, _ = flight_model.load_model(model.path)
    train_rows = pd.read_parquet(train.path)
    evaluation, curves = flight_model.evaluate(estimator, train_rows, pd.read_parquet(test.path))
    champion = None
    if champion_model_uri:
        champion, _ = flight_model.load_model(flight_model.local_path(champion_model_uri))
    out_of_time = flight_model.evaluate_out_of_time(
        estimator, train_rows, pd.read_parquet(validation.path), champion
    )
    for name, value in {**out_of_time, **evaluation.as_dict()}.items():
        metrics.log_metric(name, value)
    flight_model.plot_evaluation(evaluation, curves, evaluation_plot.path)
    evaluation_plot.metadata["mime_type"] = "image/png"
    return namedtuple("Evaluation", ["roc_auc", "baseline_roc_auc", "oot_roc_auc"])(
        evaluation.roc_auc, evaluation.baseline_roc_auc, out_of_time["oot_roc_auc"]
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

    import pandas as pd

    from ml_platform.pipelines import model as flight_model
    from ml_platform.resources.backends import open_warehouse

    # The model is read first: an unreadable artifact fails before the warehouse is touched.
    estimator, model_version = flight_model.load_model(model.path)
    first = date.fromisoformat(flight_date)
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    warehouse = open_warehouse(warehouse_uri)
    # One read for the whole range; each day is then scored and written on its own.
    features = warehouse.read_table(
        features_dataset,
        features_table,
        date_column=flight_model.DATE,
        start=first,
        end=first + timedelta(days=days),
    )
    by_day = {
        day: rows
        for day, rows in features.groupby(pd.to_datetime(features[flight_model.DATE]).dt.date)
    }
    parts = {}
    for offset in range(days):
        day = first + timedelta(days=offset)
        day_features = by_day.get(day, features.iloc[0:0])
        parts[day] = flight_model.score_flights(
            estimator, model_version, day_features, day, pipeline_job
        )
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
