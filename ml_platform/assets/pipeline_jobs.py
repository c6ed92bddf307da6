"""How an asset runs a Kubeflow pipeline: template, job id, labels, metadata. Shared by
the model and the predictions assets so both behave the same on every backend."""

from typing import Any

import dagster as dg

from ml_platform.launch import job_request
from ml_platform.resources.pipeline_runs import PipelineJob, PipelineRunner
from ml_platform.resources.templates import TemplateRegistry
from ml_platform.settings import Settings


def run_pipeline(
    context: dg.AssetExecutionContext,
    settings: Settings,
    *,
    runner: PipelineRunner,
    templates: TemplateRegistry,
    parameters: dict[str, Any],
) -> PipelineJob:
    """Run the pipeline of the asset being materialized and wait for it to succeed.

    The job id comes from the Dagster run, asset and partition, so a retried step (or a
    resumed run) finds the job it already submitted instead of submitting another.
    """
    request = job_request(
        settings,
        templates,
        asset=context.asset_key.to_user_string(),
        partition=context.partition_key if context.has_partition_key else None,
        parameters=parameters,
        dagster_run_id=context.run.run_id,
    )
    context.log.info(
        f"template {request.pipeline}:{settings.template_tag} is {request.template.version}"
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
