"""One way to retry: google-api-core's retry loop, which the Google clients use themselves.

Every backend that talks HTTP (BigQuery, Vertex AI, Artifact Registry, Slack, the ECS
credentials endpoint) and the DuckDB file lock retry through it, with the answers worth
another attempt named once, here (``RETRYABLE_STATUS``):

- the Google clients take a ``Retry`` for each call (``Backoff.retry``);
- anything else wraps its call in ``call``, which also honours a server's Retry-After.

google-api-core is imported on the first error only, so a call that succeeds first time
(a component opening the warehouse, a Slack post) pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from google.api_core.retry import Retry

T = TypeVar("T")

# Answers worth another attempt, on every HTTP backend: too many requests and the server's
# transient failures (Google's guidance for its APIs, and Slack's for its Web API).
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: the n-th wait is drawn up to ``initial`` x
    ``multiplier`` ** (n - 1), at most ``maximum`` seconds. No attempt starts whose wait would
    end past ``deadline`` seconds after the first, nor after ``retries`` retries (if given)."""

    initial: float = 1.0
    maximum: float = 30.0
    multiplier: float = 2.0
    deadline: float = 120.0
    retries: int | None = None

    def retry(self, predicate: Callable[[Exception], bool]) -> Retry:
        """The same policy as a ``Retry``, for a Google client's ``retry=`` (no retry cap:
        the clients' own retries are bounded by the deadline)."""
        from google.api_core.retry import Retry

        return Retry(
            predicate=predicate,
            initial=self.initial,
            maximum=self.maximum,
            multiplier=self.multiplier,
            timeout=self.deadline,
        )


class RetryDeadlineError(Exception):
    """``call`` gave up: the next wait would have ended past the deadline. ``cause`` is the
    last error (also the exception's ``__cause__``)."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        self.cause = cause


def http_status(error: BaseException) -> int | None:
    """The HTTP status of an error answer: google-api-core's errors carry it as ``code``,
    requests' ``HTTPError`` and slack_sdk's ``SlackApiError`` on their ``response``, and
    this project's own answer errors as ``status``."""
    for status in (
        getattr(error, "code", None),
        getattr(error, "status", None),
        getattr(getattr(error, "response", None), "status_code", None),
    ):
        if isinstance(status, int):
            return status
    return None


def is_retryable_answer(error: BaseException) -> bool:
    return http_status(error) in RETRYABLE_STATUS


def is_transient(error: BaseException, *, timeouts: bool = True) -> bool:
    """A retryable answer, or a connection that failed or dropped before one came.

    ``timeouts=False`` for calls that must not be repeated after a request that may have
    been carried out but not answered in time (an upload), nor waited for again.
    """
    import requests
    from google.auth import exceptions as auth_exceptions

    if http_status(error) is not None:
        return is_retryable_answer(error)
    if isinstance(error, requests.Timeout):
        return timeouts
    # TransportError: google-auth's own requests (token exchanges, the ECS endpoint).
    connection = (
        requests.ConnectionError,
        requests.exceptions.ChunkedEncodingError,
        auth_exceptions.TransportError,
    )
    return isinstance(error, connection)


def call(
    target: Callable[[], T],
    *,
    transient: Callable[[Exception], bool],
    backoff: Backoff,
    retry_after: Callable[[Exception], float | None] | None = None,
) -> T:
    """``target()``, called again after each error ``transient`` accepts, as ``backoff`` allows.

    When ``retry_after`` reads a server's own hint from an error (Retry-After), that is the
    wait before the next attempt instead of the backoff's. Gives up with the last error
    when it is not transient or the retries are used up, and with ``RetryDeadlineError``
    when the next wait would end past the deadline.
    """
    try:
        return target()
    except Exception as error:
        if not transient(error):
            raise
        first: list[Exception] = [error]

    from google.api_core.retry import (
        RetryFailureReason,
        exponential_sleep_generator,
        retry_target,
    )

    retries = 0
    hint: float | None = None

    def attempt() -> T:
        if first:  # the first attempt already failed: hand its error to the loop
            raise first.pop()
        return target()

    def worth_retrying(error: Exception) -> bool:
        nonlocal retries
        if not transient(error) or (backoff.retries is not None and retries >= backoff.retries):
            return False
        retries += 1
        return True

    def read_hint(error: Exception) -> None:  # called before the next wait is drawn
        nonlocal hint
        hint = retry_after(error) if retry_after else None

    def waits() -> Iterator[float]:
        delays = exponential_sleep_generator(backoff.initial, backoff.maximum, backoff.multiplier)
        for delay in delays:
            yield delay if hint is None else hint

    def give_up(
        errors: list[Exception], reason: RetryFailureReason, deadline: float | None
    ) -> tuple[Exception, BaseException | None]:
        last = errors[-1]
        if reason is RetryFailureReason.TIMEOUT:
            message = f"gave up after {len(errors)} attempts in {deadline:g} s: {last}"
            return RetryDeadlineError(message, last), last
        return last, last.__cause__  # the error as it was raised, its own cause kept

    return retry_target(
        attempt,
        worth_retrying,
        waits(),
        timeout=backoff.deadline,
        on_error=read_hint,
        exception_factory=give_up,
    )


def retry_after_seconds(headers: Any) -> float | None:
    """A Retry-After header in seconds (an HTTP date, or none, gives None)."""
    for name, value in (headers or {}).items():
        if name.lower() == "retry-after":
            raw = value[0] if isinstance(value, list | tuple) else value
            try:
                return max(0.0, float(raw))
            except (TypeError, ValueError):
                return None
    return None
