"""How an asset runs a Kubeflow pipeline: template, job id, labels, metadata. Shared by
the model and the predictions assets so both behave the same on every backend."""

import sys
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from ml_platform.launch import job_request, partition_label
from ml_platform.resources.pipeline_runs import (
    FAILURE_STATES,
    PipelineJob,
    PipelineJobError,
    PipelineRunner,
)
from ml_platform.resources.templates import TemplateRegistry
from ml_platform.settings import Settings

# A step that lost track of its job (the run worker died, an API error past its retries)
# runs again and reattaches to the job; a job that itself failed is not run again by this.
RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL)


def run_pipeline(
    context: dg.AssetExecutionContext,
    settings: Settings,
    *,
    runner: PipelineRunner,
    templates: TemplateRegistry,
    parameters: dict[str, Any],
) -> PipelineJob:
    """Run the pipeline of the asset being materialized and wait for it to succeed.

    The job id comes from the asset, the partition and the run's lineage, so a retried step
    or a re-execution from failure finds the job it already submitted instead of submitting
    another (``launch.job_request``).
    """
    run = context.run
    request = job_request(
        settings,
        templates,
        asset=context.asset_key.to_user_string(),
        partition=partition_label(partitions_of(context)) if partitions_of(context) else None,
        parameters=parameters,
        dagster_run_id=run.run_id,
        lineage=run.root_run_id or run.run_id,
    )
    request = replace(request, reuse_succeeded_after=_inputs_changed(context))
    context.log.info(
        f"template {request.pipeline}:{settings.template_tag} is {request.template.version}"
    )
    try:
        job = runner.run(request, log=context.log)
    except PipelineJobError as error:
        if error.job is not None and error.job.state in FAILURE_STATES:
            show_job_log(runner, error.job)
            # The job ran and failed: its error says why, and running it again would not help.
            raise dg.Failure(str(error), allow_retries=False) from error
        raise
    show_job_log(runner, job)
    return job


def show_job_log(runner: PipelineRunner, job: PipelineJob) -> None:
    """The ended job's own log, copied into the step's stderr, which the Dagster UI shows
    (the ``log`` link of a local job opens it there)."""
    text = runner.job_log(job.job_id)
    if text:
        print(f"--- log of pipeline job {job.job_id} ---\n{text}", file=sys.stderr, flush=True)


def partitions_of(context: dg.AssetExecutionContext) -> list[str]:
    """The partitions the step materializes: one, a range (a single-run backfill), or none."""
    if context.has_partition_key_range or context.has_partition_key:
        return list(context.partition_keys)
    return []


def _inputs_changed(context: dg.AssetExecutionContext) -> datetime:
    """The latest materialization of the asset (its partition) or of an asset it reads: a job
    of the same work that succeeded after it computed what this step would compute now."""
    instance, key = context.instance, context.asset_key
    partitions = partitions_of(context) or None
    own = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=partitions), limit=1
    ).records
    times = [record.timestamp for record in own]
    for upstream in context.assets_def.asset_deps[key]:
        event = instance.get_latest_materialization_event(upstream)
        if event is not None:
            times.append(event.timestamp)
    return datetime.fromtimestamp(max(times, default=0.0), UTC)


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
