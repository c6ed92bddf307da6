"""Kubeflow (kfp v2) pipelines in plain Python, with no Dagster import.

The names live here, apart from the kfp code, so the Dagster code location can name a
pipeline without importing kfp.
"""

TRAINING_PIPELINE = "flight-delay-training"
PREDICTION_PIPELINE = "flight-delay-prediction"
