"""Pipeline runs: one interface with Vertex-like job records, and the waiting logic both share.

A backend (``kfp.local`` in a subprocess here, Vertex AI Pipelines on Google Cloud) only
implements four primitives: ``submit``, ``get``, ``cancel`` and ``list_jobs``. What peers
get wrong lives once, in ``PipelineRunner.run``:

- a deterministic job id; on a retry the job is looked up first and reattached, so one
  attempt never submits twice; a failed or cancelled job gets a new id; a job doing the
  same work that is still in flight is awaited instead of submitting it again;
- our own poll loop with backoff and a deadline; success only on SUCCEEDED;
- an interrupted wait (the Dagster run is terminated) cancels the job.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from ml_platform.resources.templates import TemplateVersion

# Vertex AI: pipelineJobId must match [a-z][-a-z0-9]{0,127}.
_JOB_ID_MAX = 128
_RETRY_SUFFIX_MAX = len("-retry99")


class JobState(StrEnum):
    """Vertex AI's ``PipelineState`` names, used by every backend."""

    QUEUED = "PIPELINE_STATE_QUEUED"
    PENDING = "PIPELINE_STATE_PENDING"
    RUNNING = "PIPELINE_STATE_RUNNING"
    SUCCEEDED = "PIPELINE_STATE_SUCCEEDED"
    FAILED = "PIPELINE_STATE_FAILED"
    CANCELLING = "PIPELINE_STATE_CANCELLING"
    CANCELLED = "PIPELINE_STATE_CANCELLED"
    PAUSED = "PIPELINE_STATE_PAUSED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
# States a waiting run gives up on: PAUSED needs a person, it will not finish by itself.
FAILURE_STATES = frozenset({JobState.FAILED, JobState.CANCELLED, JobState.PAUSED})
# States a retry does not reattach to: a job being cancelled (say, by the terminated run
# before this retry) can only end CANCELLED.
_NOT_REATTACHABLE = FAILURE_STATES | {JobState.CANCELLING}
_IN_FLIGHT = (JobState.QUEUED, JobState.PENDING, JobState.RUNNING)


@dataclass(frozen=True)
class PipelineJob:
    """A pipeline job as Vertex AI describes one; the local store keeps the same fields."""

    name: str  # the full resource name
    job_id: str
    pipeline: str  # the template package, e.g. "flight-delay-training"
    state: JobState
    labels: Mapping[str, str]
    create_time: datetime
    start_time: datetime | None = None
    end_time: datetime | None = None
    template_uri: str = ""
    template_version: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    # Pipeline outputs: artifacts as {"uri", "metadata", "type"}, parameters as values.
    outputs: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    links: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        where = " ".join(f"{k}: {v}" for k, v in self.links.items())
        text = f"pipeline job {self.job_id} ({self.pipeline}) is {self.state.name}"
        if self.error:
            text += f": {self.error}"
        return f"{text} [{where}]" if where else text


@dataclass(frozen=True)
class JobRequest:
    job_id: str
    template: TemplateVersion
    parameters: Mapping[str, Any]
    labels: Mapping[str, str]
    display_name: str = ""
    # The labels every job doing the same work carries (deployment, asset, partition and a
    # digest of the inputs), whoever started it: a job found in flight with them is awaited
    # instead of submitting the work again. Empty: always submit.
    same_work: Mapping[str, str] = field(default_factory=dict)
    # When the work's inputs last changed (or its result was last recorded): a job of the
    # same work that succeeded after it, whose result nobody recorded (its run crashed), is
    # taken as done. None: only jobs in flight are taken.
    reuse_succeeded_after: datetime | None = None

    @property
    def pipeline(self) -> str:
        return self.template.package


@dataclass(frozen=True)
class PollPolicy:
    """How to wait: intervals grow by ``backoff`` up to ``max_interval``; stop at ``deadline``."""

    initial_interval: float = 10.0
    max_interval: float = 90.0
    backoff: float = 1.5
    deadline: float = 24 * 3600.0

    def intervals(self) -> Iterator[float]:
        interval = self.initial_interval
        while True:
            yield interval
            interval = min(interval * self.backoff, self.max_interval)


class PipelineJobError(RuntimeError):
    """A pipeline job did not succeed; the message has its state, error and links."""

    def __init__(self, message: str, job: PipelineJob | None = None) -> None:
        super().__init__(message)
        self.job = job


class JobAlreadyExistsError(PipelineJobError):
    """``submit`` was asked for a job id the backend already has."""


class Log(Protocol):
    def info(self, msg: str) -> Any: ...
    def warning(self, msg: str) -> Any: ...


class _NoLog:
    def info(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        pass


def make_job_id(*parts: str) -> str:
    """A Vertex-valid job id from readable parts: lowercase, [a-z0-9-], starts with a letter.

    Deterministic, so the same Dagster run, asset and partition always name the same job
    and a retry can find it. Long ids keep their tail (the run id makes them unique).
    """
    text = "-".join(re.sub(r"[^a-z0-9]+", "-", part.lower()).strip("-") for part in parts if part)
    text = re.sub(r"-+", "-", text).strip("-")
    if not text or not text[0].isalpha():
        text = f"job-{text}"
    limit = _JOB_ID_MAX - _RETRY_SUFFIX_MAX
    if len(text) > limit:
        head = limit - 41
        text = f"{text[:head].rstrip('-')}-{text[-40:].lstrip('-')}"
    return text


class PipelineRunner(ABC):
    poll: PollPolicy = PollPolicy()

    # -- what a backend implements ---------------------------------------------------

    @abstractmethod
    def submit(self, request: JobRequest) -> PipelineJob:
        """Create the job; raise ``JobAlreadyExistsError`` if the id is taken."""

    @abstractmethod
    def get(self, job_id: str) -> PipelineJob | None:
        """The job now, or None if there is no job with that id."""

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Ask the backend to cancel; a job that already ended stays as it is."""

    @abstractmethod
    def list_jobs(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        states: Iterable[JobState] | None = None,
        ended_after: datetime | None = None,
        page_size: int = 100,
    ) -> Iterator[PipelineJob]:
        """Jobs matching every filter, oldest end time first (the completion sensor's view).

        A backend may leave ``outputs`` empty in a listing (Vertex's list view has no task
        details): ``get`` a job to read its outputs. ``ended_after`` is compared at the
        backend's precision (float seconds locally, nanoseconds on Vertex, microseconds in a
        datetime), so a job that ended within a microsecond of it may or may not be listed:
        callers keep a margin (the sensor does).
        """

    def job_log(self, job_id: str) -> str | None:
        """The job's own log, if this backend keeps it on this machine (the local one does;
        Vertex AI's is in Cloud Logging, its ``logs`` link). None otherwise."""
        return None

    # -- what every backend shares ---------------------------------------------------

    def run(
        self,
        request: JobRequest,
        *,
        log: Log | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> PipelineJob:
        """Submit (or reattach to) the job and wait for it; return it only if it SUCCEEDED."""
        log = log or _NoLog()
        job = self.submit_or_reattach(request, log)
        return self.wait(job, log=log, sleep=sleep, clock=clock)

    def submit_or_reattach(self, request: JobRequest, log: Log) -> PipelineJob:
        """The job of this request: the one its id names if that can still succeed, else one
        doing the same work still in flight (a crashed run's, before its rerun), else new."""
        for attempt in range(100):
            job_id = request.job_id if attempt == 0 else f"{request.job_id}-retry{attempt}"
            existing = self.get(job_id)
            if existing is None:
                same = self._same_work(request)
                if same is not None:
                    log.info(f"the same work was already submitted: {same.describe()}")
                    return same
                try:
                    job = self.submit(replace(request, job_id=job_id))
                except JobAlreadyExistsError:
                    # Another process submitted it between our look-up and submit: use it.
                    job = self.get(job_id)
                    if job is None:
                        raise
                log.info(f"submitted {job.describe()}")
                return job
            # A paused job counts as failed here too: `wait` gives up on it, so reattaching
            # would fail every retry forever.
            if existing.state in _NOT_REATTACHABLE:
                log.info(f"{existing.describe()}; submitting a new job")
                continue
            log.info(f"reattaching to {existing.describe()}")
            return existing
        raise PipelineJobError(f"gave up after 100 failed attempts of {request.job_id}")

    def _same_work(self, request: JobRequest) -> PipelineJob | None:
        """A job doing the request's work in flight, else one that succeeded since its inputs
        last changed and was never recorded; None if there is neither."""
        if not request.same_work:
            return None
        after = request.reuse_succeeded_after
        states = _IN_FLIGHT if after is None else (*_IN_FLIGHT, JobState.SUCCEEDED)
        jobs = list(self.list_jobs(labels=request.same_work, states=states))
        found = next((job for job in jobs if job.state in _IN_FLIGHT), None)
        if found is None and after is not None:
            done = [job for job in jobs if job.end_time and job.end_time > after]
            found = max(done, key=lambda job: job.end_time, default=None)
        # Read whole: a listing may carry no outputs (Vertex's list view).
        return self.get(found.job_id) if found is not None else None

    def wait(
        self,
        job: PipelineJob,
        *,
        log: Log | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> PipelineJob:
        log = log or _NoLog()
        started = clock()
        intervals = self.poll.intervals()
        last_state = job.state
        try:
            while True:
                if job.state is JobState.SUCCEEDED:
                    return job
                if job.state in FAILURE_STATES:
                    raise PipelineJobError(job.describe(), job)
                if clock() - started > self.poll.deadline:
                    self._cancel_quietly(job.job_id, log)
                    raise PipelineJobError(
                        f"{job.describe()}; gave up waiting after {self.poll.deadline:.0f} s "
                        "and requested cancellation",
                        job,
                    )
                self.pause(job.job_id, next(intervals), sleep)
                found = self.get(job.job_id)
                if found is None:
                    raise PipelineJobError(f"pipeline job {job.job_id} disappeared", job)
                job = found
                if job.state is not last_state:
                    log.info(f"{job.job_id}: {last_state.name} -> {job.state.name}")
                    last_state = job.state
        except PipelineJobError:
            raise
        except Exception as error:
            # Polling failed (credentials that could not refresh, a locked job store), not
            # the job: leave it running, so that a retry of the step reattaches to it.
            raise PipelineJobError(
                f"lost track of pipeline job {job.job_id} while waiting for it "
                f"({type(error).__name__}: {error}); it was left running: a retry or rerun "
                "of its Dagster step waits for it, and `ml-platform pipelines list` shows it",
                job,
            ) from error
        except BaseException:
            # The wait was interrupted (the Dagster run was terminated, or the process is
            # shutting down): nobody will be left to use the result, so stop paying for it.
            log.warning(f"interrupted while waiting for {job.job_id}; cancelling it")
            self._cancel_quietly(job.job_id, log)
            raise

    def pause(self, job_id: str, seconds: float, sleep: Callable[[float], None]) -> None:
        """Wait before looking at the job again: ``seconds`` of the poll schedule, on a
        remote backend. A backend that can see its job end (the local one owns the worker
        process) returns as soon as it does."""
        sleep(seconds)

    def _cancel_quietly(self, job_id: str, log: Log) -> None:
        # A cancel that fails must not hide why we cancelled (the interrupt, the deadline).
        try:
            self.cancel(job_id)
        except Exception as error:
            log.warning(f"could not cancel pipeline job {job_id}: {error}")
