"""Alerting: Slack messages against a local Slack Web API, the run-failure sensor on a real
failed run of the code location, and the daily predictions schedule.

The fake speaks ``chat.postMessage`` as documented
(docs.slack.dev/reference/methods/chat.postMessage): a POST to ``/api/chat.postMessage``
with a JSON or form body (``channel``, ``text``, ``blocks``; ``blocks`` is a JSON string in a
form), the token as ``Authorization: Bearer`` or a ``token`` field; HTTP 200 with
``{"ok": true, "channel", "ts", "message"}`` or ``{"ok": false, "error": CODE}``; HTTP 429
with ``Retry-After`` (seconds) and ``{"ok": false, "error": "ratelimited"}`` when rate limited
(docs.slack.dev/apis/web-api/rate-limits). slack_sdk is pointed at it by its documented
``base_url`` (``SlackAlerts(api_url=...)``), nothing else of the client is replaced.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import dagster as dg
import pytest

from ml_platform.alerting import RUN_FAILURE_SENSOR, build_alerting, build_run_failure_sensor
from ml_platform.definitions import build_definitions
from ml_platform.resources.alerts import LogAlerts
from ml_platform.resources.alerts.slack import SlackAlerts
from ml_platform.schedules import SCORE_DAILY_SCHEDULE
from ml_platform.settings import Settings

TOKEN = "xoxb-test-token"
CHANNEL = "#ml-platform-alerts"
UI_URL = "https://acme.dagster.cloud/prod"


# -- a local Slack Web API ---------------------------------------------------------------


@dataclass
class Post:
    """One request to chat.postMessage, as the server read it, and whether it was taken."""

    headers: dict[str, str]
    content_type: str
    params: dict[str, Any]
    at: float
    accepted: bool = False


@dataclass
class FakeSlack:
    token: str = TOKEN
    channels: frozenset[str] = frozenset({CHANNEL, "C0123ABC456"})
    posts: list[Post] = field(default_factory=list)
    # Answers to give before the normal ones: (HTTP status, headers, body).
    _faults: list[tuple[int, dict[str, str], dict[str, Any]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The posts Slack accepted."""
        return [post.params for post in self.posts if post.accepted]

    def rate_limit_next(self, retry_after: int, times: int = 1) -> None:
        for _ in range(times):
            self._faults.append(
                (429, {"Retry-After": str(retry_after)}, {"ok": False, "error": "ratelimited"})
            )

    def fail_next(self, error: str) -> None:
        self._faults.append((200, {}, {"ok": False, "error": error}))

    def answer(self, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, str], dict]:
        content_type = headers.get("content-type", "").split(";")[0].strip()
        if content_type == "application/json":
            params = json.loads(raw or b"{}")
        elif content_type == "application/x-www-form-urlencoded":
            params = dict(parse_qsl(raw.decode()))
            if "blocks" in params:
                params["blocks"] = json.loads(params["blocks"])
        else:
            return 200, {}, {"ok": False, "error": "invalid_form_data"}
        with self._lock:
            post = Post(headers, content_type, params, time.monotonic())
            self.posts.append(post)
            if self._faults:
                return self._faults.pop(0)
        bearer = headers.get("authorization", "").removeprefix("Bearer ").strip()
        token = bearer or params.get("token")
        if not token:
            return 200, {}, {"ok": False, "error": "not_authed"}
        if token != self.token:
            return 200, {}, {"ok": False, "error": "invalid_auth"}
        if params.get("channel") not in self.channels:
            return 200, {}, {"ok": False, "error": "channel_not_found"}
        if not params.get("text") and not params.get("blocks"):
            return 200, {}, {"ok": False, "error": "no_text"}
        post.accepted = True
        ts = f"{1700000000 + len(self.posts)}.000100"
        message = {
            "type": "message",
            "subtype": "bot_message",
            "text": params.get("text"),
            "ts": ts,
        }
        return 200, {}, {"ok": True, "channel": "C0123ABC456", "ts": ts, "message": message}


@pytest.fixture
def slack() -> Iterator[tuple[FakeSlack, str]]:
    """The fake and its API URL (what slack_sdk calls base_url)."""
    fake = FakeSlack()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = {name.lower(): value for name, value in self.headers.items()}
            if self.path.split("?")[0] != "/api/chat.postMessage":
                status, extra, body = 404, {}, {"ok": False, "error": "unknown_method"}
            else:
                status, extra, body = fake.answer(headers, raw)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}/api/"
    finally:
        server.shutdown()
        server.server_close()


# -- settings ----------------------------------------------------------------------------


def alert_settings(
    settings: Settings, *, slack_token: str | None, dagster_ui_url: str | None = UI_URL
) -> Settings:
    return dataclasses.replace(
        settings, slack_token=slack_token, slack_channel=CHANNEL, dagster_ui_url=dagster_ui_url
    )


# -- SlackAlerts -------------------------------------------------------------------------


def test_an_alert_is_posted_with_its_title_text_and_links(slack):
    fake, url = slack
    alerts = SlackAlerts(TOKEN, CHANNEL, api_url=url)
    alerts.send(
        "Pipeline job failed: score-2013-06-01",
        "task score_flights: ValueError: no rows for 2013-06-01 & <none> scored",
        {"Vertex console": "https://console.cloud.google.com/vertex-ai/x?project=p&a=1"},
    )

    (post,) = fake.posts
    assert post.headers["authorization"] == f"Bearer {TOKEN}"
    assert post.content_type == "application/json"
    message = post.params
    assert message["channel"] == CHANNEL
    assert message["unfurl_links"] is False
    header, body, links = message["blocks"]
    assert header == {
        "type": "header",
        "text": {"type": "plain_text", "text": "Pipeline job failed: score-2013-06-01"},
    }
    # Slack's control characters are escaped, so the error text cannot become a link.
    assert body["text"] == {
        "type": "mrkdwn",
        "text": "task score_flights: ValueError: no rows for 2013-06-01 &amp; &lt;none&gt; scored",
    }
    assert links["text"]["text"] == (
        "<https://console.cloud.google.com/vertex-ai/x?project=p&amp;a=1|Vertex console>"
    )
    # The notification fallback carries title and text.
    assert message["text"].startswith("Pipeline job failed: score-2013-06-01: task score_flights")
    assert fake.messages == [message]


def test_a_long_alert_is_cut_to_slacks_block_limits(slack):
    fake, url = slack
    SlackAlerts(TOKEN, CHANNEL, api_url=url).send("T" * 400, "<!channel> " + "x&" * 4000)
    (message,) = fake.messages
    header, body = message["blocks"]
    assert len(header["text"]["text"]) == 150  # header blocks: at most 150 characters
    text = body["text"]["text"]
    assert len(text) <= 3000  # section text: at most 3000 characters
    assert text.startswith("&lt;!channel&gt; x&amp;x&amp;") and text.endswith("…")
    assert len(message["text"]) <= 1000


@pytest.mark.parametrize(
    ("token", "channel", "expected"),
    [
        ("xoxb-revoked", CHANNEL, "invalid_auth (Slack rejected the token"),
        (TOKEN, "#no-such-channel", "channel_not_found (no such channel"),
    ],
)
def test_slack_errors_are_logged_with_the_reason_and_never_raised(
    slack, caplog, token, channel, expected
):
    fake, url = slack
    alerts = SlackAlerts(token, channel, api_url=url)
    with caplog.at_level(logging.WARNING, logger="ml_platform.resources.alerts.slack"):
        alerts.send("Pipeline job failed: j1", "task train: boom", {"logs": "https://logs/j1"})
        reason = alerts.post("Pipeline job failed: j1", "task train: boom")
    assert reason is not None and reason.startswith(expected)
    assert len(fake.posts) == 2 and fake.messages == []
    (first, _) = caplog.records
    logged = first.getMessage()
    # The log says why, and keeps the alert itself.
    assert expected in logged and "task train: boom" in logged and "https://logs/j1" in logged


def test_a_rate_limited_post_waits_for_retry_after_then_succeeds(slack):
    fake, url = slack
    fake.rate_limit_next(retry_after=1)
    reason = SlackAlerts(TOKEN, CHANNEL, api_url=url).post("Run failed: score_flights", "boom")
    assert reason is None
    first, second = fake.posts
    assert second.at - first.at >= 1.0  # waited for Retry-After
    assert second.params["blocks"] == first.params["blocks"]
    assert len(fake.messages) == 1


def test_rate_limiting_gives_up_when_retry_after_exceeds_the_budget_or_retries_run_out(slack):
    fake, url = slack
    fake.rate_limit_next(retry_after=120)
    started = time.monotonic()
    reason = SlackAlerts(TOKEN, CHANNEL, api_url=url).post("Run failed", "boom")
    assert time.monotonic() - started < 5  # did not sleep 120 s inside a sensor tick
    assert reason is not None and "Retry-After 120s" in reason
    assert len(fake.posts) == 1

    fake.posts.clear()
    fake.rate_limit_next(retry_after=0, times=5)
    reason = SlackAlerts(TOKEN, CHANNEL, api_url=url, max_rate_limit_retries=2).post("R", "b")
    assert reason == "rate limited by Slack (ratelimited) after 2 retries"
    assert len(fake.posts) == 3


def test_refused_blocks_fall_back_to_a_plain_text_message(slack):
    fake, url = slack
    fake.fail_next("invalid_blocks")
    reason = SlackAlerts(TOKEN, CHANNEL, api_url=url).post(
        "Run failed: score_flights", "boom", {"Dagster run": f"{UI_URL}/runs/abc"}
    )
    assert reason is None
    first, second = fake.posts
    assert "blocks" in first.params and "blocks" not in second.params
    assert second.params["text"] == (
        f"Run failed: score_flights\nboom\n<{UI_URL}/runs/abc|Dagster run>"
    )


def test_an_unreachable_or_hung_slack_is_logged_and_does_not_hang(caplog):
    # Nothing listens on a port we bound and closed: connection refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    # A socket that accepts connections (the kernel's backlog) but never answers.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    try:
        with caplog.at_level(logging.WARNING, logger="ml_platform.resources.alerts.slack"):
            started = time.monotonic()
            refused = SlackAlerts(TOKEN, CHANNEL, api_url=f"http://127.0.0.1:{closed_port}/api/")
            refused.send("Run failed", "boom")
            timeout = SlackAlerts(
                TOKEN,
                CHANNEL,
                api_url=f"http://127.0.0.1:{hung.getsockname()[1]}/api/",
                timeout_seconds=1,
            )
            reason = timeout.post("Run failed", "boom")
            elapsed = time.monotonic() - started
    finally:
        hung.close()
    assert "refused" in caplog.records[0].getMessage().lower()
    assert reason is not None and "timed out" in reason.lower()
    assert elapsed < 10


def test_importing_the_alerting_modules_loads_no_slack_library():
    code = (
        "import sys; import ml_platform.alerting, ml_platform.schedules, "
        "ml_platform.resources.alerts.slack; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('slack_sdk', 'dagster_slack')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "[]"


# -- the run-failure sensor --------------------------------------------------------------


def test_without_a_token_there_is_no_run_failure_sensor_and_alerts_go_to_the_log(
    local_settings,
):
    settings = alert_settings(local_settings, slack_token=None)
    sensors, alerts = build_alerting(settings)
    assert sensors == [] and isinstance(alerts, LogAlerts)
    defs = build_definitions(settings)
    assert not [s for s in defs.sensors or [] if isinstance(s, dg.RunStatusSensorDefinition)]


def test_with_a_token_the_run_failure_sensor_runs_and_alerts_go_to_slack(local_settings):
    sensors, alerts = build_alerting(alert_settings(local_settings, slack_token=TOKEN))
    (sensor,) = sensors
    assert isinstance(sensor, dg.RunStatusSensorDefinition)
    assert sensor.name == RUN_FAILURE_SENSOR
    assert sensor.default_status is dg.DefaultSensorStatus.RUNNING
    assert isinstance(alerts, SlackAlerts) and alerts.channel == CHANNEL
    assert TOKEN not in repr(alerts)


def test_a_failed_run_of_the_code_location_is_posted_once(slack, local_settings):
    """A real run of score_flights fails (no model was ever trained) in a temporary
    instance; the sensor, evaluated tick by tick as the daemon does, posts it once."""
    fake, url = slack
    settings = alert_settings(local_settings, slack_token=TOKEN)
    sensor = build_run_failure_sensor(settings, SlackAlerts(TOKEN, CHANNEL, api_url=url))
    job = build_definitions(settings).resolve_job_def("score_flights")

    with dg.instance_for_test() as instance:

        def tick(cursor: str | None) -> str | None:
            with dg.build_sensor_context(instance=instance, cursor=cursor) as context:
                sensor.evaluate_tick(context)
                return context.cursor

        cursor = tick(None)  # the first tick only records where the sensor starts
        assert fake.posts == []
        result = job.execute_in_process(
            instance=instance, partition_key="2013-06-01", raise_on_error=False
        )
        assert not result.success
        cursor = tick(cursor)
        tick(cursor)  # nothing new: no second message

    run_id = result.run_id
    (message,) = fake.messages
    header, body, links = message["blocks"]
    assert header["text"]["text"] == "Run failed: score_flights [2013-06-01] (local)"
    text = body["text"]["text"]
    assert f"Run {run_id} of score_flights for partition 2013-06-01 failed" in text
    assert 'Execution of run for "score_flights" failed' in text
    assert (
        "• flight_delay_predictions: model flight-delay has no champion yet: materialize "
        "flight_delay_model" in text
    )
    assert links["text"]["text"] == f"<{UI_URL}/runs/{run_id}|Dagster run>"


def test_a_run_of_an_asset_selection_is_named_by_its_assets(slack, local_settings):
    fake, url = slack
    settings = alert_settings(local_settings, slack_token=TOKEN, dagster_ui_url=None)
    sensor = build_run_failure_sensor(settings, SlackAlerts(TOKEN, CHANNEL, api_url=url))
    # What the UI launches for "Materialize" on a selection: a run of __ASSET_JOB.
    run = dg.DagsterRun(
        job_name="__ASSET_JOB",
        run_id="0b3f2c1e-0000-4000-8000-000000000001",
        asset_selection={dg.AssetKey(["reporting", "daily_delay_report"])},
    )
    failure = dg.DagsterEvent(
        event_type_value=dg.DagsterEventType.RUN_FAILURE.value,
        job_name=run.job_name,
        message="Run execution process unexpectedly exited with exit code -9.",
    )
    with dg.instance_for_test() as instance:
        sensor(dg.build_run_status_sensor_context(RUN_FAILURE_SENSOR, failure, instance, run))
    (message,) = fake.messages
    header, body = message["blocks"]  # no UI URL configured: no link section
    assert header["text"]["text"] == (
        "Run failed: materialization of reporting/daily_delay_report (local)"
    )
    assert "unexpectedly exited with exit code -9" in body["text"]["text"]


# -- the daily schedule ------------------------------------------------------------------


@pytest.fixture
def schedule_and_repository(local_settings):
    """The schedule in the code location's definitions, so requests are checked against
    the real score_flights job and its partitions."""
    defs = build_definitions(local_settings)
    dg.Definitions.validate_loadable(defs)
    return defs.get_repository_def().get_schedule_def(SCORE_DAILY_SCHEDULE), defs


def _tick(schedule_and_repository, at: datetime):
    schedule, defs = schedule_and_repository
    # Contexts closed in order: one left to the garbage collector would put the dagster
    # instance it opened back as the "current" one after that instance is gone.
    with (
        dg.instance_for_test() as instance,
        dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=at,
            repository_def=defs.get_repository_def(),
        ) as context,
    ):
        return schedule.evaluate_tick(context)


def test_the_schedule_scores_yesterday_at_six_utc_and_starts_stopped(schedule_and_repository):
    schedule, _ = schedule_and_repository
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 6 * * *", "UTC")
    assert schedule.default_status is dg.DefaultScheduleStatus.STOPPED
    assert schedule.job_name == "score_flights"

    data = _tick(schedule_and_repository, datetime(2013, 6, 2, 6, tzinfo=UTC))
    (request,) = data.run_requests
    assert (request.partition_key, request.run_key) == ("2013-06-01", "2013-06-01")
    # The last day of the data, scored on the first morning after it.
    (request,) = _tick(schedule_and_repository, datetime(2014, 1, 1, 6, tzinfo=UTC)).run_requests
    assert request.partition_key == "2013-12-31"


@pytest.mark.parametrize(
    "at", [datetime(2014, 1, 2, 6, tzinfo=UTC), datetime(2026, 5, 1, 6, tzinfo=UTC)]
)
def test_past_the_end_of_2013_the_schedule_skips_and_says_why(schedule_and_repository, at):
    data = _tick(schedule_and_repository, at)
    assert not data.run_requests
    assert "flight_delay_predictions has daily partitions from 2013-01-01 to 2013-12-31" in (
        data.skip_message
    )
