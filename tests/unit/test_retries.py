"""The one retry mechanism (ml_platform/resources/retries.py), on its own.

Every backend's retries are also tested on the wire (tests/gcp/*, tests/unit/test_alerting.py,
the DuckDB lock in tests/unit/test_duckdb_warehouse.py); these pin the rules they share.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import requests

from ml_platform.resources.retries import (
    RETRYABLE_STATUS,
    Backoff,
    RetryDeadlineError,
    call,
    http_status,
    is_transient,
)


class Answer(Exception):
    def __init__(self, status: int, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


def failing(*errors: Exception):
    """A call that raises ``errors`` one after the other, then answers "ok"; it counts calls."""
    pending = list(errors)

    def target() -> str:
        target.calls += 1
        if pending:
            raise pending.pop(0)
        return "ok"

    target.calls = 0
    return target


FAST = Backoff(initial=0.001, maximum=0.001, deadline=5.0)


def test_transient_errors_are_retried_until_the_call_succeeds():
    target = failing(Answer(503), Answer(429), requests.ConnectionError("reset"))
    assert call(target, transient=is_transient, backoff=FAST) == "ok"
    assert target.calls == 4


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409])
def test_a_permanent_answer_is_raised_at_once(status: int):
    target = failing(Answer(status))
    with pytest.raises(Answer) as raised:
        call(target, transient=is_transient, backoff=FAST)
    assert raised.value.status == status and target.calls == 1


def test_retries_are_capped_and_the_last_error_is_raised():
    errors = [Answer(503) for _ in range(5)]
    target = failing(*errors)
    with pytest.raises(Answer) as raised:
        call(target, transient=is_transient, backoff=Backoff(0.001, 0.001, deadline=5, retries=2))
    assert target.calls == 3 and raised.value is errors[2]


def test_retry_after_replaces_the_backoff_and_a_wait_past_the_deadline_gives_up_at_once():
    hinted = failing(Answer(429, retry_after=0.3))
    started = time.monotonic()
    call(hinted, transient=is_transient, backoff=FAST, retry_after=lambda e: e.retry_after)
    assert time.monotonic() - started >= 0.3 and hinted.calls == 2

    too_long = failing(Answer(429, retry_after=60))
    started = time.monotonic()
    with pytest.raises(RetryDeadlineError) as raised:
        call(too_long, transient=is_transient, backoff=FAST, retry_after=lambda e: e.retry_after)
    assert time.monotonic() - started < 1 and too_long.calls == 1
    assert raised.value.cause.status == 429


def test_timeouts_are_retried_only_when_asked():
    assert is_transient(requests.ReadTimeout())
    assert not is_transient(requests.ReadTimeout(), timeouts=False)
    assert is_transient(requests.ConnectionError(), timeouts=False)


def test_statuses_are_read_from_every_library_s_errors():
    from google.api_core import exceptions

    response = requests.Response()
    response.status_code = 502
    assert http_status(requests.HTTPError(response=response)) == 502
    assert http_status(exceptions.ServiceUnavailable("down")) == 503
    assert http_status(exceptions.DeadlineExceeded("slow")) == 504  # gRPC's, as HTTP
    assert http_status(ValueError("no status")) is None
    assert {429, 500, 502, 503, 504} == RETRYABLE_STATUS


def test_a_call_that_succeeds_imports_no_google_library():
    code = (
        "import sys\n"
        "from ml_platform.resources.retries import Backoff, call, is_transient\n"
        "call(lambda: 1, transient=is_transient, backoff=Backoff())\n"
        "print([m for m in sys.modules if m.startswith(('google.api_core', 'google.auth'))])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
