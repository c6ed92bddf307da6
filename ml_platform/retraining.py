"""``retrain_on_drift``: a sensor that proposes a retrain when the model keeps drifting.

When the drift checks of ``model_performance`` warned (any of the three) on each of the
latest ``RETRAIN_AFTER_DAYS`` measured days (by partition date, the latest measurement of
each), it requests one run of the training job with the cutoff the day after the last of
them, so the new model learns from the days that drifted. One day can be noise (a storm, a
holiday); three in a row is a change.

- Once per cutoff: the run key is made from the cutoff (the daemon never launches a run key
  twice), and the cursor keeps the last cutoff proposed; only days from that cutoff on count
  towards the next proposal, so a drift that goes on proposes again after another
  ``RETRAIN_AFTER_DAYS`` days, not every day.
- It reads which checks warned from the materialization metadata ``model_performance``
  records beside its check results (``drift_warnings``): Dagster's instance has no public
  API for asset check evaluations.
- Stopped by default in every deployment: a retrain costs a training run and, when the
  challenger wins, changes what predictions score with.
"""

from __future__ import annotations

from datetime import date, timedelta

import dagster as dg

from ml_platform.assets.performance import DRIFT_WARNINGS, PERFORMANCE_KEY, latest_per_day
from ml_platform.launch import MODEL_ASSET
from ml_platform.settings import Settings

SENSOR_NAME = "retrain_on_drift"
RETRAIN_AFTER_DAYS = 3
# Measurements come once a day: looking every 10 minutes is plenty.
INTERVAL_SECONDS = 600
REASON_TAG = "ml_platform/retrain_reason"
DRIFT_DAYS_TAG = "ml_platform/drift_days"
DRIFT_CHECKS_TAG = "ml_platform/drift_checks"
CUTOFF_TAG = "ml_platform/cutoff_date"


def run_key(cutoff: date) -> str:
    return f"retrain-before-{cutoff.isoformat()}"


def retrain_request(
    days: dict[str, dict], since: str | None = None
) -> tuple[dg.RunRequest | None, str]:
    """The training run the measured ``days`` call for (partition -> metadata values), and
    why or why not; only days on or after ``since`` (the last cutoff proposed) count."""
    counted = sorted(day for day in days if since is None or day >= since)
    latest = counted[-RETRAIN_AFTER_DAYS:]
    after = f" since {since}" if since else ""
    if len(latest) < RETRAIN_AFTER_DAYS:
        return None, f"{len(latest)} measured day(s){after}; {RETRAIN_AFTER_DAYS} needed"
    warned = {day: list(days[day].get(DRIFT_WARNINGS) or []) for day in latest}
    calm = [day for day, checks in warned.items() if not checks]
    if calm:
        return None, (
            f"the latest {RETRAIN_AFTER_DAYS} measured days{after} ({latest[0]} to {latest[-1]}) "
            f"did not all drift: {', '.join(calm)} passed every check"
        )
    cutoff = date.fromisoformat(latest[-1]) + timedelta(days=1)
    checks = sorted({check for found in warned.values() for check in found})
    request = dg.RunRequest(
        run_key=run_key(cutoff),
        run_config={"ops": {MODEL_ASSET: {"config": {"cutoff_date": cutoff.isoformat()}}}},
        tags={
            REASON_TAG: (
                f"{PERFORMANCE_KEY.to_user_string()} drift checks warned on "
                f"{RETRAIN_AFTER_DAYS} measured days in a row"
            ),
            DRIFT_DAYS_TAG: ",".join(latest),
            DRIFT_CHECKS_TAG: ",".join(checks),
            CUTOFF_TAG: cutoff.isoformat(),
        },
    )
    return request, f"drift on {', '.join(latest)} ({', '.join(checks)}): retrain before {cutoff}"


def build_retrain_sensor(settings: Settings, training_job_name: str) -> dg.SensorDefinition:
    # Stopped in every deployment (local, branch and prod alike): `settings` is taken for the
    # builders' common shape; nothing in the rule differs between deployments.
    del settings

    @dg.sensor(
        name=SENSOR_NAME,
        job_name=training_job_name,
        minimum_interval_seconds=INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=(
            f"Proposes a retrain when {PERFORMANCE_KEY.to_user_string()}'s drift checks warned "
            f"on each of the latest {RETRAIN_AFTER_DAYS} measured days: one run of "
            f"{training_job_name} with the cutoff the day after the last of them (once per "
            "cutoff). Stopped by default everywhere, since a retrain can replace the champion: "
            "start it on the UI's Automation page, or with `dagster sensor start "
            f"{SENSOR_NAME}`."
        ),
    )
    def retrain_on_drift(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        request, why = retrain_request(latest_per_day(context.instance), since=context.cursor)
        context.log.info(why)
        if request is None:
            return dg.SensorResult(skip_reason=why)
        return dg.SensorResult(run_requests=[request], cursor=request.tags[CUTOFF_TAG])

    return retrain_on_drift
