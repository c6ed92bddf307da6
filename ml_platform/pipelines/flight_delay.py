"""The two Kubeflow pipelines: training (train + evaluate) and daily batch scoring."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Metrics, Model

from ml_platform.pipelines import PREDICTION_PIPELINE, TRAINING_PIPELINE
from ml_platform.pipelines.components import score_flights, train_and_evaluate
from ml_platform.pipelines.model import MAX_ITER


class TrainingOutputs(NamedTuple):
    model: Model
    metrics: Metrics
    evaluation_plot: Artifact
    roc_auc: float
    baseline_roc_auc: float
    oot_roc_auc: float
    data_fingerprint: str


class PredictionOutputs(NamedTuple):
    rows: int
    rows_by_day: dict
    mean_probability: float
    model_version: str


@dsl.pipeline(
    name=TRAINING_PIPELINE,
    description="Train a gradient-boosted flight delay classifier; evaluate it out of time (the "
    "last weeks before the cutoff, held out of training; the champion is re-scored on the same "
    "window) and on the test split, against a carrier x scheduled-hour baseline.",
)
def training_pipeline(
    warehouse_uri: str,
    features_dataset: str,
    cutoff_date: str,
    champion_model_uri: str = "",
    max_iter: int = MAX_ITER,
    training_table: str = "training_data",
) -> TrainingOutputs:
    trained = train_and_evaluate(
        warehouse_uri=warehouse_uri,
        dataset=features_dataset,
        table=training_table,
        cutoff_date=cutoff_date,
        champion_model_uri=champion_model_uri,
        max_iter=max_iter,
    )
    # It reads the warehouse, whose rows can change under the same arguments: never cached.
    trained.set_caching_options(False)
    trained.set_cpu_limit("4").set_memory_limit("16G")
    return TrainingOutputs(
        model=trained.outputs["model"],
        metrics=trained.outputs["metrics"],
        evaluation_plot=trained.outputs["evaluation_plot"],
        roc_auc=trained.outputs["roc_auc"],
        baseline_roc_auc=trained.outputs["baseline_roc_auc"],
        oot_roc_auc=trained.outputs["oot_roc_auc"],
        data_fingerprint=trained.outputs["data_fingerprint"],
    )


@dsl.pipeline(
    name=PREDICTION_PIPELINE,
    description="Score every flight of one or more consecutive days with a trained model and "
    "replace each day's rows in the predictions table.",
)
def prediction_pipeline(
    warehouse_uri: str,
    features_dataset: str,
    predictions_dataset: str,
    flight_date: str,
    model_uri: str,
    days: int = 1,
    features_table: str = "flight_features",
    predictions_table: str = "flight_delay_predictions",
) -> PredictionOutputs:
    model = dsl.importer(artifact_uri=model_uri, artifact_class=Model, reimport=False)
    scored = score_flights(
        model=model.output,
        warehouse_uri=warehouse_uri,
        features_dataset=features_dataset,
        features_table=features_table,
        predictions_dataset=predictions_dataset,
        predictions_table=predictions_table,
        flight_date=flight_date,
        days=days,
        pipeline_job=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
    )
    # It writes to the warehouse: a cached result would skip the write.
    scored.set_caching_options(False)
    return PredictionOutputs(
        rows=scored.outputs["rows"],
        rows_by_day=scored.outputs["rows_by_day"],
        mean_probability=scored.outputs["mean_probability"],
        model_version=scored.outputs["model_version"],
    )


PIPELINES = {
    TRAINING_PIPELINE: training_pipeline,
    PREDICTION_PIPELINE: prediction_pipeline,
}
