"""The completion sensor: ended pipeline jobs become reporting refreshes, recorded
materializations and alerts, whoever started the job.

Every tick asks the pipeline runner (the local job store, or Vertex AI's
`list_pipeline_jobs` with a server-side filter) for this deployment's jobs that ended
after the newest end it has handled, minus a lookback window: an end time can be recorded
late (a worker that reports after a slow write, Vertex's eventual consistency), and the
window catches it. The cursor keeps the ids handled inside the window, so nothing is
handled twice, and it survives restarts because Dagster stores it.

For each job that ended:

- a succeeded prediction job leads to exactly one refresh of the reporting models
  (run_key = the job's name). A job started outside Dagster (the CLI, a Vertex schedule, a
  data scientist) is first recorded as a materialization of its partition. A job started
  by a Dagster run waits until that run has finished; if the run (or anything else)
  refreshed the reporting after the job ended, nothing more is requested;
- a succeeded training job started outside Dagster is recorded on flight_delay_model, with
  its baseline check;
- a failed or cancelled job requests nothing; it is logged, and if nobody in Dagster
  started it (a Dagster run reports its own failure) it is also sent as an alert.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

import dagster as dg

from ml_platform.assets.model import MODEL_KEY, model_materialization
from ml_platform.assets.predictions import DAILY_2013, PREDICTIONS_KEY, predictions_metadata
from ml_platform.launch import MODEL_ASSET, PIPELINE_OF_ASSET, PREDICTIONS_ASSET
from ml_platform.resources.alerts import Alerts
from ml_platform.resources.artifacts import ArtifactStore
from ml_platform.resources.pipeline_runs import (
    TERMINAL_STATES,
    JobState,
    PipelineJob,
    PipelineRunner,
)
from ml_platform.settings import Settings

SENSOR_NAME = "pipeline_job_completion"
REPORTING_JOB = "refresh_reporting"
# Any reporting model tells when the reporting was last refreshed: one dbt step builds them.
REPORTING_MARKER = dg.AssetKey(["reporting", "daily_delay_report"])
ASSET_OF_PIPELINE = {pipeline: asset for asset, pipeline in PIPELINE_OF_ASSET.items()}
# A job whose Dagster run never finishes (a crashed run worker) is not waited for forever.
MAX_PENDING_SECONDS = 24 * 3600
# Remembered a little past the lookback (see Cursor.forget_before).
FORGET_MARGIN_SECONDS = 1.0


@dataclass
class Cursor:
    """Where the sensor is: the newest end it handled, and the jobs handled since then
    minus the lookback (by end time), or waiting for their Dagster run."""

    newest_end: float | None = None
    handled: dict[str, float] = field(default_factory=dict)
    waiting: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> Cursor:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(data.get("newest_end"), data.get("handled", {}), data.get("waiting", {}))

    def dump(self) -> str:
        return json.dumps(
            {"newest_end": self.newest_end, "handled": self.handled, "waiting": self.waiting},
            sort_keys=True,
        )

    def window_start(self, lookback: float) -> datetime | None:
        if self.newest_end is None:
            return None
        return datetime.fromtimestamp(self.newest_end - lookback, UTC)

    def mark_handled(self, job: PipelineJob) -> None:
        end = job.end_time.timestamp()
        self.handled[job.job_id] = end
        self.waiting.pop(job.job_id, None)
        self.newest_end = max(self.newest_end or end, end)

    def forget_before(self, lookback: float) -> None:
        # Jobs that ended before the window can no longer be listed: no need to remember them.
        # End times are kept at different precisions (the local store in float seconds, this
        # cursor in microseconds, Vertex in nanoseconds), so a job a hair inside the window
        # can look just outside it here: keep a margin, or it would be listed and handled again.
        if self.newest_end is not None:
            horizon = self.newest_end - lookback - FORGET_MARGIN_SECONDS
            self.handled = {job: end for job, end in self.handled.items() if end > horizon}


@dataclass
class Tick:
    run_requests: list[dg.RunRequest] = field(default_factory=list)
    asset_events: list[Any] = field(default_factory=list)
    # (title, text, links), sent once every job of the tick was handled: a tick that fails
    # half-way (an API error) is evaluated again, and must not alert twice.
    alerts: list[tuple[str, str, Mapping[str, str]]] = field(default_factory=list)


@cache
def _partition_keys() -> frozenset[str]:
    return frozenset(DAILY_2013.get_partition_keys())


def _dagster_run_finished(instance: dg.DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    # A run this instance does not know (another deployment's, deleted) will never finish here.
    return run is None or run.is_finished


def _reporting_refreshed_after(instance: dg.DagsterInstance, moment: datetime) -> bool:
    event = instance.get_latest_materialization_event(REPORTING_MARKER)
    return event is not None and event.timestamp > moment.timestamp()


def _reporting_request(job: PipelineJob, partition: str | None) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=job.name,
        job_name=REPORTING_JOB,
        tags={
            "ml_platform/pipeline_job": job.job_id,
            **({"ml_platform/flight_date": partition} if partition else {}),
        },
    )


def handle_job(
    context: dg.SensorEvaluationContext,
    job: PipelineJob,
    tick: Tick,
    *,
    runner: PipelineRunner,
    artifacts: ArtifactStore,
) -> bool:
    """Act on one ended job; False if it must wait for its Dagster run to finish."""
    asset = ASSET_OF_PIPELINE.get(job.pipeline)
    started_by = job.labels.get("dagster_run_id")
    if asset is None:
        context.log.info(f"ignoring {job.job_id}: pipeline {job.pipeline!r} is not ours")
        return True
    if job.state is not JobState.SUCCEEDED:
        if not started_by:
            # A listing may lack the failing task's own error (Vertex's list view).
            job = runner.get(job.job_id) or job
        context.log.error(f"{job.describe()}; no reporting refresh")
        if not started_by:  # a Dagster run reports its own failure (and alerts on it)
            tick.alerts.append(
                (
                    f"Pipeline job {job.state.name.lower()}: {job.job_id}",
                    job.error or f"{job.pipeline} ended {job.state.name}",
                    job.links,
                )
            )
        return True
    if asset == MODEL_ASSET:
        if not started_by:
            full = runner.get(job.job_id) or job  # a listing may carry no outputs
            metadata, check = model_materialization(full, artifacts)
            tick.asset_events.append(dg.AssetMaterialization(MODEL_KEY, metadata=metadata))
            tick.asset_events.append(
                dg.AssetCheckEvaluation(
                    asset_key=MODEL_KEY,
                    check_name=check.check_name,
                    passed=check.passed,
                    metadata=check.metadata,
                    description=check.description,
                )
            )
            context.log.info(f"recorded {job.job_id} (outside Dagster) on {MODEL_ASSET}")
        return True
    # A prediction job.
    partition = job.parameters.get("flight_date") or job.labels.get("partition")
    if started_by:
        if not _dagster_run_finished(context.instance, started_by):
            return False  # its run may still refresh the reporting itself
        if _reporting_refreshed_after(context.instance, job.end_time):
            context.log.info(f"{job.job_id}: reporting already refreshed after it ended")
            return True
    elif partition in _partition_keys():
        full = runner.get(job.job_id) or job
        tick.asset_events.append(
            dg.AssetMaterialization(
                PREDICTIONS_KEY, partition=partition, metadata=predictions_metadata(full)
            )
        )
    else:
        context.log.warning(f"{job.job_id}: {partition!r} is not a partition; not recorded")
    tick.run_requests.append(_reporting_request(job, partition))
    context.log.info(f"{job.job_id} ({PREDICTIONS_ASSET} {partition}): refreshing reporting")
    return True


def build_completion_sensor(settings: Settings) -> dg.SensorDefinition:
    lookback = float(settings.sensor_lookback_seconds)

    @dg.sensor(
        name=SENSOR_NAME,
        job_name=REPORTING_JOB,
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Ended pipeline jobs of this deployment, whoever started them: a succeeded "
        "prediction job refreshes the reporting once; failures are reported.",
    )
    def pipeline_job_completion(
        context: dg.SensorEvaluationContext,
        pipeline_runner: dg.ResourceParam[PipelineRunner],
        artifacts: dg.ResourceParam[ArtifactStore],
        alerts: dg.ResourceParam[Alerts],
    ) -> dg.SensorResult:
        cursor = Cursor.parse(context.cursor)
        ended = {
            job.job_id: job
            for job in pipeline_runner.list_jobs(
                labels=settings.labels,
                states=TERMINAL_STATES,
                ended_after=cursor.window_start(lookback),
            )
            if job.job_id not in cursor.handled
        }
        # Jobs waiting for their Dagster run may have left the window: look them up.
        for job_id in sorted(cursor.waiting.keys() - ended.keys()):
            job = pipeline_runner.get(job_id)
            if job is None:  # deleted meanwhile: nothing left to wait for
                context.log.warning(f"{job_id}: the job is gone; no longer waiting for it")
                del cursor.waiting[job_id]
            else:
                ended[job_id] = job
        tick = Tick()
        now = datetime.now(UTC).timestamp()
        for job in sorted(ended.values(), key=lambda job: (job.end_time, job.job_id)):
            try:
                done = handle_job(context, job, tick, runner=pipeline_runner, artifacts=artifacts)
            except (LookupError, TypeError, ValueError) as error:
                # A job this code cannot read (from an older template, or whose artifacts
                # are gone: ArtifactError is a LookupError) must not stop every later tick:
                # report it and go on. API errors still fail the tick, which is evaluated
                # again with the same cursor.
                context.log.exception(f"{job.job_id}: cannot record it")
                tick.alerts.append(
                    (
                        f"Pipeline job not recorded: {job.job_id}",
                        f"{type(error).__name__}: {error}",
                        job.links,
                    )
                )
                done = True
            if done:
                cursor.mark_handled(job)
            elif now - job.end_time.timestamp() > MAX_PENDING_SECONDS:
                context.log.warning(f"{job.job_id}: its Dagster run never finished; refreshing")
                tick.run_requests.append(_reporting_request(job, job.parameters.get("flight_date")))
                cursor.mark_handled(job)
            else:
                cursor.waiting[job.job_id] = job.end_time.timestamp()
        cursor.forget_before(lookback)
        for title, text, links in tick.alerts:
            alerts.send(title, text, links)
        return dg.SensorResult(
            run_requests=tick.run_requests, asset_events=tick.asset_events, cursor=cursor.dump()
        )

    return pipeline_job_completion
