"""Who hears about failures, decided by the settings.

With a Slack token configured (``ML_PLATFORM_SLACK_TOKEN``), every failed run of this code
location is posted to the channel by a run-failure sensor, and every alert the rest of the
code sends through ``Alerts`` (the completion sensor's failed or cancelled pipeline jobs)
goes to the same channel. Without a token there is no run-failure sensor at all (a failed
run shows in the UI with its logs) and alerts only go to the log.
"""

from __future__ import annotations

import dagster as dg

from ml_platform.resources.alerts import Alerts, LogAlerts
from ml_platform.resources.alerts.slack import SlackAlerts
from ml_platform.sensors import automation_defaults
from ml_platform.settings import Deployment, Settings

RUN_FAILURE_SENSOR = "slack_on_run_failure"
# A message names the failed steps and their errors; the run's logs, one click away, have
# the rest (tracebacks, other steps).
MAX_STEPS_LISTED = 5
STEP_ERROR_MAX_CHARS = 600
# Runs launched from the UI for an asset selection (and some sensor runs) carry this name.
_ASSET_JOB_PREFIX = "__ASSET_JOB"


def build_alerting(settings: Settings) -> tuple[list[dg.SensorDefinition], Alerts]:
    """The run-failure sensor (none without a Slack token) and the ``Alerts`` everyone uses."""
    if settings.alert_channel is None:
        return [], LogAlerts()
    slack = SlackAlerts(settings.slack_token, settings.alert_channel)
    return [build_run_failure_sensor(settings, slack)], slack


def build_run_failure_sensor(settings: Settings, slack: SlackAlerts) -> dg.SensorDefinition:
    """Posts every failed run of this code location: job, partition, errors, a link to it.

    Not dagster-slack's ``make_slack_on_run_failure_sensor``: that one raises on any Slack
    error (the tick fails and the alert is gone all the same), does not wait out a 429,
    makes its client when the definitions load, and names neither the partition nor the
    failed steps' errors.
    """

    @dg.run_failure_sensor(
        name=RUN_FAILURE_SENSOR,
        # No monitored_jobs: every job of this code location, including the runs the UI
        # launches for a selection of assets and the runs sensors request.
        # Running by default (but in branch deployments): configuring a token is the opt-in;
        # a stopped alerting sensor would fail silently. On its first tick a run-failure
        # sensor starts from the latest failure, so turning it on replays no old failure.
        **automation_defaults(
            settings,
            f"Posts every failed run of this code location to Slack ({settings.alert_channel}).",
        ),
    )
    def slack_on_run_failure(context: dg.RunFailureSensorContext) -> None:
        title, text, links = run_failure_alert(
            settings,
            context.dagster_run,
            context.failure_event.message,
            context.get_step_failure_events(),
        )
        # Logged to the tick when Slack refuses it; raising would not bring the alert back
        # (the sensor's cursor moves past this run either way).
        slack.post(title, text, links, log=context.log)

    return slack_on_run_failure


def run_failure_alert(
    settings: Settings,
    run: dg.DagsterRun,
    failure_message: str | None,
    step_failures: list[dg.DagsterEvent],
) -> tuple[str, str, dict[str, str]]:
    """The alert for a failed run: a title, a plain-text body and links."""
    job = _run_label(run)
    partition = run.tags.get("dagster/partition")
    where = _deployment_label(settings)
    title = f"Run failed: {job}" + (f" [{partition}]" if partition else "") + f" ({where})"
    lines = [
        f"Run {run.run_id} of {job}"
        + (f" for partition {partition}" if partition else "")
        + f" failed in the {where} deployment.",
    ]
    if failure_message:
        lines.append(failure_message.strip())
    for event in step_failures[:MAX_STEPS_LISTED]:
        lines.append(f"• {event.step_key}: {_step_error(event)}")
    if len(step_failures) > MAX_STEPS_LISTED:
        lines.append(f"… and {len(step_failures) - MAX_STEPS_LISTED} more failed steps.")
    links = {}
    if settings.dagster_ui_url:
        links["Dagster run"] = f"{settings.dagster_ui_url.rstrip('/')}/runs/{run.run_id}"
    return title, "\n".join(lines), links


def _run_label(run: dg.DagsterRun) -> str:
    if not run.job_name.startswith(_ASSET_JOB_PREFIX):
        return run.job_name
    keys = sorted(key.to_user_string() for key in run.asset_selection or ())
    if not keys:
        return "an asset run"
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return f"materialization of {shown}"


def _deployment_label(settings: Settings) -> str:
    if settings.deployment is Deployment.BRANCH:
        return f"branch (PR #{settings.pull_request_id})"
    return settings.deployment_name


def _step_error(event: dg.DagsterEvent) -> str:
    data = event.step_failure_data
    if data is None:
        return event.message or "failed"
    # A dg.Failure carries the author's own description; anything else is an exception.
    if data.user_failure_data is not None and data.user_failure_data.description:
        message = data.user_failure_data.description
    elif data.error is not None:
        message = data.error.message.strip()
        if data.error.cause is not None:
            message += f" (caused by {data.error.cause.message.strip()})"
    else:
        message = event.message or "failed"
    return message if len(message) <= STEP_ERROR_MAX_CHARS else message[:STEP_ERROR_MAX_CHARS] + "…"
