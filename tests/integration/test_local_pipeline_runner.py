"""The local pipeline backend, for real: kfp.local jobs in worker processes, a SQLite store."""
# No `from __future__ import annotations`: kfp reads the component annotations as types.

import os
import signal
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from kfp import compiler, dsl

from ml_platform.resources.pipeline_runs import (
    JobRequest,
    JobState,
    PipelineJobError,
    PollPolicy,
    make_job_id,
)
from ml_platform.resources.pipeline_runs.local import LocalPipelineRunner
from ml_platform.resources.templates import TemplateError
from ml_platform.resources.templates.local import LocalTemplateRegistry

FAST = PollPolicy(initial_interval=0.1, max_interval=0.5, deadline=120)


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
def nap(seconds: float, fail: bool) -> str:
    import time

    time.sleep(seconds)
    if fail:
        raise ValueError(f"the nap of {seconds} s went wrong")
    return f"slept {seconds}"


@dsl.pipeline(name="nap-pipeline")
def nap_pipeline(seconds: float = 0.0, fail: bool = False) -> str:
    return nap(seconds=seconds, fail=fail).output


@pytest.fixture
def backend(tmp_path: Path):
    registry = LocalTemplateRegistry(tmp_path / "templates")
    compiled = tmp_path / "nap.yaml"
    compiler.Compiler().compile(nap_pipeline, str(compiled))
    template = registry.upload("nap-pipeline", compiled, tags=["latest"])
    runner = LocalPipelineRunner(tmp_path / "jobs.sqlite", tmp_path / "root", registry, poll=FAST)
    return runner, registry, template


def request(template, job_id="nap-1", **parameters) -> JobRequest:
    return JobRequest(
        job_id=job_id,
        template=template,
        parameters={"seconds": 0.0, "fail": False, **parameters},
        labels={"deployment": "local", "asset": "nap"},
    )


def test_a_job_runs_and_is_recorded(backend, tmp_path):
    runner, _, template = backend
    job = runner.run(request(template))
    assert job.state is JobState.SUCCEEDED
    assert job.outputs == {"Output": "slept 0.0"}
    assert job.template_version == template.version
    assert job.create_time <= job.start_time <= job.end_time
    # The record outlives the process that made it.
    later = LocalPipelineRunner(tmp_path / "jobs.sqlite", tmp_path / "root", backend[1])
    assert later.get("nap-1") == job
    assert [j.job_id for j in later.list_jobs(labels={"asset": "nap"})] == ["nap-1"]
    # The worker ran the exact version it was given.
    assert (tmp_path / "root" / "nap-1" / "pipeline.yaml").read_bytes() == Path(
        template.uri
    ).read_bytes()


def test_a_failing_component_fails_the_job_with_its_own_message(backend):
    runner, _, template = backend
    with pytest.raises(PipelineJobError) as failure:
        runner.run(request(template, fail=True))
    message = str(failure.value)
    assert "FAILED" in message
    assert "ValueError: the nap of 0.0 s went wrong" in message
    assert "job.log" in message  # the link to the log
    assert failure.value.job.state is JobState.FAILED


def test_a_retry_after_a_crash_reattaches_instead_of_submitting_again(backend, tmp_path):
    runner, registry, template = backend
    submitted = runner.submit(request(template, seconds=1.0))
    assert submitted.state is JobState.QUEUED
    # The submitting process dies; its retry builds a new runner and runs the same request.
    retry = LocalPipelineRunner(tmp_path / "jobs.sqlite", tmp_path / "root", registry, poll=FAST)
    job = retry.run(request(template, seconds=1.0))
    assert job.job_id == "nap-1"
    assert job.state is JobState.SUCCEEDED
    assert [j.job_id for j in retry.list_jobs()] == ["nap-1"]


def test_a_succeeded_job_is_taken_as_done(backend):
    runner, _, template = backend
    first = runner.run(request(template))
    again = runner.run(request(template))
    assert again == first
    assert len(list(runner.list_jobs())) == 1


def test_a_failed_job_is_retried_under_a_new_id(backend):
    runner, _, template = backend
    with pytest.raises(PipelineJobError):
        runner.run(request(template, fail=True))
    # Same attempt id, but the parameters were fixed (say, the data was repaired).
    job = runner.run(request(template, fail=False))
    assert job.job_id == "nap-1-retry1"
    states = {j.job_id: j.state for j in runner.list_jobs()}
    assert states == {"nap-1": JobState.FAILED, "nap-1-retry1": JobState.SUCCEEDED}


def test_the_same_work_in_flight_is_awaited_instead_of_submitted_again(backend):
    runner, _, template = backend
    work = {"deployment": "local", "asset": "nap", "inputs": "abc"}
    first = runner.submit(
        replace(request(template, "run-a", seconds=2.0), labels=work, same_work=work)
    )
    # Another run (the rerun of a crashed one) asks for the same work under its own id.
    job = runner.run(replace(request(template, "run-b", seconds=2.0), labels=work, same_work=work))
    assert job.job_id == first.job_id and job.state is JobState.SUCCEEDED
    assert [j.job_id for j in runner.list_jobs()] == ["run-a"]


def test_a_succeeded_job_nobody_recorded_is_taken_only_if_the_inputs_did_not_change(backend):
    runner, _, template = backend
    work = {"deployment": "local", "asset": "nap", "inputs": "abc"}
    done = runner.run(replace(request(template, "run-a"), labels=work, same_work=work))
    before_it = done.create_time - timedelta(seconds=1)
    again = runner.run(
        replace(request(template, "run-b"), same_work=work, reuse_succeeded_after=before_it)
    )
    assert again == done  # its run crashed before recording it: taken as done
    changed = done.end_time + timedelta(seconds=1)  # an input was rebuilt since
    new = runner.run(
        replace(request(template, "run-c"), same_work=work, reuse_succeeded_after=changed)
    )
    assert new.job_id == "run-c"


def test_an_interrupted_wait_cancels_the_job(backend):
    runner, _, template = backend
    # A real SIGINT while the wait blocks on the worker: what the Dagster step sees when its
    # run is terminated.
    # Python's own handler, even where this process was started with SIGINT ignored (a shell
    # ignores it for the commands it starts in the background).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupt = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    interrupt.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run(request(template, seconds=60.0))
    finally:
        interrupt.cancel()
        signal.signal(signal.SIGINT, previous)
    job = runner.get("nap-1")
    assert job.state is JobState.CANCELLED
    assert job.end_time is not None
    assert not runner.worker_alive("nap-1")


# A poll schedule that would look once an hour: a wait that follows it cannot end in a test.
HOURLY = PollPolicy(initial_interval=3600, max_interval=3600, deadline=7200)


def test_a_wait_ends_when_its_own_worker_ends_not_at_the_next_poll(backend, tmp_path):
    _, registry, template = backend
    runner = LocalPipelineRunner(tmp_path / "jobs.sqlite", tmp_path / "root", registry, HOURLY)
    job = runner.run(request(template, seconds=1.0))
    assert job.state is JobState.SUCCEEDED
    with pytest.raises(PipelineJobError, match=r"the nap of 1\.0 s went wrong"):
        runner.run(request(template, "nap-2", seconds=1.0, fail=True))


def test_a_wait_for_another_process_worker_ends_when_its_lock_is_released(backend, tmp_path):
    _, registry, template = backend
    submitter = LocalPipelineRunner(tmp_path / "jobs.sqlite", tmp_path / "root", registry)
    submitter.submit(request(template, seconds=1.5))
    # A retry in another process reattaches: it holds no worker of its own, only the lock.
    other = LocalPipelineRunner(tmp_path / "jobs.sqlite", tmp_path / "root", registry, HOURLY)
    job = other.run(request(template, seconds=1.5))
    assert job.job_id == "nap-1" and job.state is JobState.SUCCEEDED
    submitter.worker_alive("nap-1")  # reaps the finished child


def test_the_deadline_fails_and_cancels_the_job(backend, tmp_path):
    _, registry, template = backend
    impatient = LocalPipelineRunner(
        tmp_path / "jobs.sqlite",
        tmp_path / "root",
        registry,
        poll=PollPolicy(initial_interval=0.2, max_interval=0.2, deadline=1.0),
    )
    with pytest.raises(PipelineJobError, match="gave up waiting"):
        impatient.run(request(template, seconds=60.0))
    assert impatient.get("nap-1").state is JobState.CANCELLED


def test_a_worker_that_dies_marks_its_job_failed(backend):
    runner, _, template = backend
    runner.submit(request(template, seconds=60.0))
    deadline = time.monotonic() + 30
    while runner.get("nap-1").state is not JobState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(runner.store.row("nap-1")["pid"], 9)
    with pytest.raises(PipelineJobError, match="exited without recording a result"):
        runner.wait(runner.get("nap-1"))


def test_a_worker_that_cannot_start_fails_its_job_and_the_retry_runs_anew(backend, tmp_path):
    runner, _, template = backend
    (tmp_path / "root" / "nap-1" / "job.log").mkdir(parents=True)  # its log cannot be opened
    with pytest.raises(IsADirectoryError):
        runner.run(request(template))
    job = runner.get("nap-1")
    assert job.state is JobState.FAILED and "could not start the local worker" in job.error
    job = runner.run(request(template))  # the step's retry does not wait for a ghost
    assert job.job_id == "nap-1-retry1" and job.state is JobState.SUCCEEDED


def test_a_job_whose_submitter_died_before_starting_its_worker_is_failed(backend, tmp_path):
    runner, _, template = backend
    runner.store.insert(  # recorded by a submit whose process died before the worker started
        {
            "job_id": "nap-1", "pipeline": "nap-pipeline", "display_name": "nap-1",
            "state": str(JobState.QUEUED), "labels": "{}", "parameters": "{}",
            "create_time": time.time() - 120, "update_time": time.time() - 120,
            "template_uri": template.uri, "template_version": template.version,
            "template_path": template.uri, "pipeline_root": str(tmp_path / "root" / "nap-1"),
            "log_path": str(tmp_path / "root" / "nap-1" / "job.log"),
        }
    )  # fmt: skip
    job = runner.get("nap-1")
    assert job.state is JobState.FAILED and "no local worker was started" in job.error
    assert runner.run(request(template)).job_id == "nap-1-retry1"


def test_an_unknown_tag_names_the_package_and_tag(backend):
    _, registry, _ = backend
    with pytest.raises(TemplateError, match=r"'nap-pipeline' has no tag 'v9'.*tags: latest"):
        registry.resolve("nap-pipeline", "v9")


def test_job_ids_are_deterministic_and_valid():
    run_id = "8F2C1B7A-0D4E-4C55-9A3B-1E2F3A4B5C6D"
    job_id = make_job_id("flight_delay_predictions", "2013-10-01", run_id)
    assert job_id == make_job_id("flight_delay_predictions", "2013-10-01", run_id)
    assert job_id == "flight-delay-predictions-2013-10-01-8f2c1b7a-0d4e-4c55-9a3b-1e2f3a4b5c6d"
    assert make_job_id("7up", "x") == "job-7up-x"
    long = make_job_id("a" * 200, run_id)
    assert len(long) <= 120 and long.endswith("1e2f3a4b5c6d")
