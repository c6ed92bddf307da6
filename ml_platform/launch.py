"""Launching the two pipelines, the same way from an asset, the CLI or a test.

One place decides a job's template version, id, labels and parameters, so a job started
by `ml-platform pipelines run` looks exactly like one a Dagster run started (the
completion sensor tells them apart by the `dagster_run_id` label only).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from ml_platform.pipelines import PREDICTION_PIPELINE, TRAINING_PIPELINE
from ml_platform.pipelines.model import MAX_ITER
from ml_platform.resources.pipeline_runs import (
    JobRequest,
    make_job_id,
)
from ml_platform.resources.templates import TemplateRegistry, TemplateVersion
from ml_platform.settings import Settings

MODEL_ASSET = "flight_delay_model"
PREDICTIONS_ASSET = "flight_delay_predictions"
PREDICTIONS_TABLE = "flight_delay_predictions"
# The job of the whole graph in one run (`ml-platform materialize`).
EVERYTHING_JOB = "materialize_all"
PIPELINE_OF_ASSET = {MODEL_ASSET: TRAINING_PIPELINE, PREDICTIONS_ASSET: PREDICTION_PIPELINE}


def template_for_run(
    settings: Settings, templates: TemplateRegistry, pipeline: str
) -> TemplateVersion:
    """The template version to submit, resolved from the deployment's tag.

    On Google Cloud, CD publishes templates; locally the code as it is now is compiled and
    published under the tag first, so `dagster dev` always runs what is on disk. Either
    way the job is submitted by the sha256 version the tag resolves to.
    """
    if settings.is_local:
        publish(settings, templates, pipeline, [settings.template_tag])
    return templates.resolve(pipeline, settings.template_tag)


def publish(
    settings: Settings, templates: TemplateRegistry, pipeline: str, tags: list[str]
) -> TemplateVersion:
    """Compile the pipeline as the code is now and upload it under ``tags``."""
    from ml_platform.pipelines.compile import compile_pipeline

    with tempfile.TemporaryDirectory() as scratch:
        compiled = compile_pipeline(
            pipeline, Path(scratch) / f"{pipeline}.yaml", image=settings.component_image
        )
        return templates.upload(pipeline, compiled, tags=tags)


def job_request(
    settings: Settings,
    templates: TemplateRegistry,
    *,
    asset: str,
    partition: str | None,
    parameters: dict[str, Any],
    dagster_run_id: str | None,
    lineage: str | None = None,
) -> JobRequest:
    """A job for ``asset`` (and ``partition``): by a Dagster run, or by someone else.

    A Dagster run's job id comes from the asset, the partition and the run's ``lineage``
    (the root run of a re-execution, else the run itself), so a retried step and a
    re-execution from failure find the job the first attempt submitted. A job doing the same
    work (same inputs) still in flight is awaited instead (a crashed `make run`, rerun).
    Anyone else gets a fresh job each time.
    """
    pipeline = PIPELINE_OF_ASSET[asset]
    template = template_for_run(settings, templates, pipeline)
    inputs = inputs_digest(template, parameters)
    labels = settings.job_labels(
        asset=asset, partition=partition, run_id=dagster_run_id, inputs=inputs
    )
    origin = lineage or dagster_run_id
    return JobRequest(
        job_id=make_job_id(asset, partition or "", origin or f"manual-{uuid.uuid4().hex[:12]}"),
        template=template,
        parameters=parameters,
        labels=labels,
        display_name=f"{asset} {partition or ''}".strip(),
        same_work={k: v for k, v in labels.items() if k != "dagster_run_id"} if origin else {},
    )


def inputs_digest(template: TemplateVersion, parameters: dict[str, Any]) -> str:
    """What a job computes from: its template version and parameters (a label value)."""
    text = json.dumps([template.version, parameters], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def training_parameters(
    settings: Settings,
    warehouse_uri: str,
    cutoff: date,
    champion_model_uri: str = "",
    max_iter: int = MAX_ITER,
) -> dict[str, Any]:
    """``champion_model_uri``: the current champion's artifact, re-scored on the challenger's
    out-of-time window ("" when there is none); ``max_iter``: boosting iterations at most."""
    return {
        "warehouse_uri": warehouse_uri,
        "features_dataset": settings.dataset("features"),
        "cutoff_date": cutoff.isoformat(),
        "champion_model_uri": champion_model_uri,
        "max_iter": max_iter,
    }


def prediction_parameters(
    settings: Settings, warehouse_uri: str, day: date, model_uri: str, days: int = 1
) -> dict[str, Any]:
    """``days`` consecutive days from ``day``: a backfill of a range is one job."""
    return {
        "warehouse_uri": warehouse_uri,
        "features_dataset": settings.dataset("features"),
        "predictions_dataset": settings.dataset("predictions"),
        "predictions_table": PREDICTIONS_TABLE,
        "flight_date": day.isoformat(),
        "days": days,
        "model_uri": model_uri,
    }


def scored_days(parameters: Mapping[str, Any]) -> list[str]:
    """The days a prediction job scores (jobs from before ranges name one day)."""
    first = date.fromisoformat(parameters["flight_date"])
    return [(first + timedelta(days=i)).isoformat() for i in range(int(parameters.get("days", 1)))]


def partition_label(days: Sequence[str]) -> str:
    """A job's partition label: the day, or ``first..last`` for a range."""
    return days[0] if len(days) == 1 else f"{days[0]}..{days[-1]}"
