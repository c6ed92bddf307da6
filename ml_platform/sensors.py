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
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cache
from typing import Any, NamedTuple

import dagster as dg

from ml_platform.assets.model import MODEL_KEY, record_training
from ml_platform.assets.predictions import (
    DAILY_2013,
    PREDICTIONS_KEY,
    predictions_metadata,
    registry_version_of,
    rows_by_day,
)
from ml_platform.launch import (
    MODEL_ASSET,
    PIPELINE_OF_ASSET,
    PREDICTIONS_ASSET,
    partition_label,
    scored_days,
)
from ml_platform.resources.alerts import Alerts
from ml_platform.resources.artifacts import ArtifactError, ArtifactStore
from ml_platform.resources.model_registry import ModelRegistry
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
# Refreshes of the reporting that have not ended; those not started yet.
_NOT_STARTED = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED)
_PENDING = [*_NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
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


class Alert(NamedTuple):
    title: str
    text: str
    links: Mapping[str, str]


@dataclass(frozen=True)
class Outcome:
    """What one ended job leads to; ``waiting``: nothing yet, its Dagster run is not over."""

    run_requests: tuple[dg.RunRequest, ...] = ()
    asset_events: tuple[dg.AssetMaterialization | dg.AssetCheckEvaluation, ...] = ()
    alerts: tuple[Alert, ...] = ()
    waiting: bool = False


NOTHING = Outcome()
WAITING = Outcome(waiting=True)


@cache
def _partition_keys() -> frozenset[str]:
    return frozenset(DAILY_2013.get_partition_keys())


def _dagster_run_finished(instance: dg.DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    # A run this instance does not know (another deployment's, deleted) will never finish here.
    return run is None or run.is_finished


def pending_refresh(instance: dg.DagsterInstance, moment: datetime) -> str | None:
    """A refresh of the reporting that will read what was there at ``moment`` (queued, or
    started since), if one is pending: its run id."""
    pending = instance.get_run_records(
        filters=dg.RunsFilter(job_name=REPORTING_JOB, statuses=_PENDING), limit=20
    )
    return next(
        (
            record.dagster_run.run_id
            for record in pending
            if record.dagster_run.status in _NOT_STARTED
            or (record.start_time or 0) > moment.timestamp()
        ),
        None,
    )


def reporting_covers(instance: dg.DagsterInstance, moment: datetime) -> bool:
    """Whether the reporting was refreshed after ``moment``, or a refresh that will be is
    pending (the days of a backfill, or of `make run`, then need one refresh, not one each)."""
    event = instance.get_latest_materialization_event(REPORTING_MARKER)
    refreshed = event is not None and event.timestamp > moment.timestamp()
    return refreshed or pending_refresh(instance, moment) is not None


def _reporting_request(job: PipelineJob, partition: str | None) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=job.name,
        job_name=REPORTING_JOB,
        tags={
            "ml_platform/pipeline_job": job.job_id,
            **({"ml_platform/flight_date": partition} if partition else {}),
        },
    )


def _started_by(job: PipelineJob) -> str | None:
    """The Dagster run that started the job; None for the CLI, a schedule, a person."""
    return job.labels.get("dagster_run_id")


def outcome_of(
    job: PipelineJob,
    context: dg.SensorEvaluationContext,
    runner: PipelineRunner,
    artifacts: ArtifactStore,
    registry: ModelRegistry,
) -> Outcome:
    """What an ended job of this deployment leads to: by its state, then its pipeline."""
    asset = ASSET_OF_PIPELINE.get(job.pipeline)
    if asset is None:
        context.log.info(f"ignoring {job.job_id}: pipeline {job.pipeline!r} is not ours")
        return NOTHING
    if job.state is not JobState.SUCCEEDED:
        return failed(job, context, runner)
    if asset == MODEL_ASSET:
        return trained(job, context, runner, artifacts, registry)
    return predicted(job, context, runner, registry)


def failed(
    job: PipelineJob, context: dg.SensorEvaluationContext, runner: PipelineRunner
) -> Outcome:
    """No reporting refresh; logged, and an alert unless a Dagster run started the job (the
    run reports its own failure, and alerts on it)."""
    if _started_by(job):
        context.log.error(f"{job.describe()}; no reporting refresh")
        return NOTHING
    job = runner.get(job.job_id) or job  # a listing may lack the failing task's own error
    context.log.error(f"{job.describe()}; no reporting refresh")
    title = f"Pipeline job {job.state.name.lower()}: {job.job_id}"
    text = job.error or f"{job.pipeline} ended {job.state.name}"
    return Outcome(alerts=(Alert(title, text, job.links),))


def trained(
    job: PipelineJob,
    context: dg.SensorEvaluationContext,
    runner: PipelineRunner,
    artifacts: ArtifactStore,
    registry: ModelRegistry,
) -> Outcome:
    """A model trained outside Dagster is registered and judged like one a Dagster run trained
    (it may become champion), and recorded on flight_delay_model with its checks."""
    if _started_by(job):
        return NOTHING
    full = runner.get(job.job_id) or job  # a listing may carry no outputs
    metadata, checks = record_training(
        full, artifacts, registry, dagster_run="", by=f"sensor {SENSOR_NAME}, job {job.job_id}"
    )
    context.log.info(f"recorded {job.job_id} (outside Dagster): {metadata['decision']}")
    return Outcome(
        asset_events=(
            dg.AssetMaterialization(MODEL_KEY, metadata=metadata),
            *(
                dg.AssetCheckEvaluation(
                    asset_key=MODEL_KEY,
                    check_name=check.check_name,
                    passed=check.passed,
                    metadata=check.metadata,
                    description=check.description,
                )
                for check in checks
            ),
        )
    )


def predicted(
    job: PipelineJob,
    context: dg.SensorEvaluationContext,
    runner: PipelineRunner,
    registry: ModelRegistry,
) -> Outcome:
    """One refresh of the reporting. A job started outside Dagster is first recorded on its
    partitions (each day it scored, with its own row count); one a Dagster run started waits
    for that run, which may refresh it itself."""
    days = _days_of(job)
    partition = partition_label(days) if days else None
    run_id = _started_by(job)
    events: tuple[dg.AssetMaterialization, ...] = ()
    if run_id:
        if not _dagster_run_finished(context.instance, run_id):
            return WAITING
        if reporting_covers(context.instance, job.end_time):
            context.log.info(f"{job.job_id}: the reporting was or will be refreshed after it")
            return NOTHING
    elif days and set(days) <= _partition_keys():
        full = runner.get(job.job_id) or job
        version = registry_version_of(registry, full.parameters.get("model_uri", ""))
        metadata = predictions_metadata(full, version)
        written = rows_by_day(full)
        events = tuple(
            dg.AssetMaterialization(
                PREDICTIONS_KEY,
                partition=day,
                metadata={**metadata, "dagster/row_count": written.get(day, 0)},
            )
            for day in days
        )
    else:
        context.log.warning(f"{job.job_id}: {partition!r} is not a partition; not recorded")
    context.log.info(f"{job.job_id} ({PREDICTIONS_ASSET} {partition}): refreshing reporting")
    return Outcome(run_requests=(_reporting_request(job, partition),), asset_events=events)


def _days_of(job: PipelineJob) -> list[str]:
    """The days a prediction job scored, from its parameters (else its partition label)."""
    if "flight_date" in job.parameters:
        try:
            return scored_days(job.parameters)
        except ValueError:
            return [str(job.parameters["flight_date"])]  # not a date: reported as such
    label = job.labels.get("partition")
    return [label] if label else []


def automation_defaults(settings: Settings, description: str) -> dict[str, Any]:
    """A sensor's default status and description in this deployment: running locally and in
    prod; in a branch deployment stopped, and saying how to start it."""
    if settings.automation_runs_by_default:
        return {"default_status": dg.DefaultSensorStatus.RUNNING, "description": description}
    return {
        "default_status": dg.DefaultSensorStatus.STOPPED,
        "description": f"{description} Stopped in branch deployments (every open pull request "
        "would poll and alert): start it on this deployment's Automation page to try it on the "
        "pull request's own jobs.",
    }


def build_completion_sensor(settings: Settings) -> dg.SensorDefinition:
    lookback = float(settings.sensor_lookback_seconds)

    @dg.sensor(
        name=SENSOR_NAME,
        job_name=REPORTING_JOB,
        minimum_interval_seconds=settings.sensor_interval_seconds,
        **automation_defaults(
            settings,
            "Ended pipeline jobs of this deployment, whoever started them: a succeeded "
            "prediction job refreshes the reporting once; failures are reported.",
        ),
    )
    def pipeline_job_completion(
        context: dg.SensorEvaluationContext,
        pipeline_runner: dg.ResourceParam[PipelineRunner],
        artifacts: dg.ResourceParam[ArtifactStore],
        model_registry: dg.ResourceParam[ModelRegistry],
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
        run_requests: list[dg.RunRequest] = []
        asset_events: list[dg.AssetMaterialization | dg.AssetCheckEvaluation] = []
        alerts_to_send: list[Alert] = []
        now = datetime.now(UTC).timestamp()
        for job in sorted(ended.values(), key=lambda job: (job.end_time, job.job_id)):
            try:
                outcome = outcome_of(job, context, pipeline_runner, artifacts, model_registry)
            except (KeyError, ArtifactError) as error:
                # A job this code cannot read (outputs its template did not declare, an
                # artifact that is gone) must not stop every later tick: report it, go on.
                # Anything else (an API error, a bug of ours) fails the tick, which is
                # evaluated again with the same cursor.
                context.log.exception(f"{job.job_id}: cannot record it")
                text = f"{type(error).__name__}: {error}"
                alert = Alert(f"Pipeline job not recorded: {job.job_id}", text, job.links)
                outcome = Outcome(alerts=(alert,))
            if outcome.waiting:
                if now - job.end_time.timestamp() <= MAX_PENDING_SECONDS:
                    cursor.waiting[job.job_id] = job.end_time.timestamp()
                    continue
                context.log.warning(f"{job.job_id}: its Dagster run never finished; refreshing")
                partition = partition_label(_days_of(job)) if _days_of(job) else None
                outcome = Outcome(run_requests=(_reporting_request(job, partition),))
            if run_requests and _started_by(job):
                # A job of a Dagster run: the refresh this tick already requests starts after it.
                outcome = replace(outcome, run_requests=())
            cursor.mark_handled(job)
            run_requests += outcome.run_requests
            asset_events += outcome.asset_events
            alerts_to_send += outcome.alerts
        cursor.forget_before(lookback)
        # Sent once every job of the tick was handled: a tick that fails half-way (an API
        # error) is evaluated again, and must not alert twice.
        for alert in alerts_to_send:
            alerts.send(*alert)
        return dg.SensorResult(
            run_requests=run_requests, asset_events=asset_events, cursor=cursor.dump()
        )

    return pipeline_job_completion
