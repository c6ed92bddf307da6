"""How an asset runs a Kubeflow pipeline: template, job id, labels, metadata. Shared by
the model and the predictions assets so both behave the same on every backend."""

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from ml_platform.resources.pipeline_runner import (
    JobRequest,
    PipelineJob,
    PipelineRunner,
    make_job_id,
)
from ml_platform.resources.template_registry import TemplateRegistry, TemplateVersion
from ml_platform.settings import Settings


def template_for_run(
    settings: Settings, templates: TemplateRegistry, pipeline: str
) -> TemplateVersion:
    """The template version to submit, resolved from the deployment's tag.

    On Google Cloud, CD publishes templates; locally the code as it is now is compiled and
    published under the tag first, so `dagster dev` always runs what is on disk. Either
    way the job is submitted by the sha256 version the tag resolves to.
    """
    if settings.is_local:
        from ml_platform.pipelines.compile import compile_pipeline

        with tempfile.TemporaryDirectory() as scratch:
            compiled = compile_pipeline(
                pipeline, Path(scratch) / f"{pipeline}.yaml", image=settings.component_image
            )
            templates.upload(pipeline, compiled, tags=[settings.template_tag])
    return templates.resolve(pipeline, settings.template_tag)


def run_pipeline(
    context: dg.AssetExecutionContext,
    settings: Settings,
    *,
    runner: PipelineRunner,
    templates: TemplateRegistry,
    pipeline: str,
    parameters: Mapping[str, Any],
) -> PipelineJob:
    """Run one pipeline job for the asset being materialized and wait for it to succeed.

    The job id comes from the Dagster run, asset and partition, so a retried step (or a
    resumed run) finds the job it already submitted instead of submitting another.
    """
    asset = context.asset_key.to_user_string()
    partition = context.partition_key if context.has_partition_key else None
    template = template_for_run(settings, templates, pipeline)
    context.log.info(f"template {pipeline}:{settings.template_tag} is {template.version}")
    request = JobRequest(
        job_id=make_job_id(asset, partition or "", context.run.run_id),
        template=template,
        parameters=dict(parameters),
        labels=settings.job_labels(asset=asset, partition=partition, run_id=context.run.run_id),
        display_name=f"{asset} {partition or ''}".strip(),
    )
    return runner.run(request, log=context.log)


def job_metadata(job: PipelineJob) -> dict[str, Any]:
    """What every pipeline-backed materialization records about its job."""
    metadata: dict[str, Any] = {
        "pipeline_job": job.name,
        "pipeline_job_id": job.job_id,
        "template_version": job.template_version,
        "template_uri": job.template_uri,
    }
    for name, link in job.links.items():
        metadata[f"{name}_link"] = dg.MetadataValue.url(link)
    if job.start_time and job.end_time:
        metadata["pipeline_seconds"] = round((job.end_time - job.start_time).total_seconds(), 1)
    return metadata
