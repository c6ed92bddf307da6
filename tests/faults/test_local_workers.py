"""Faults of the local pipeline workers, made to happen: workers killed with SIGKILL while
nobody waits for them, their components left running, and the submit path repeated on tmpfs.

Everything is real: kfp.local pipelines in worker processes, the SQLite job store, signals.
"""
# No `from __future__ import annotations`: kfp reads the component annotations as types.

import os
import signal
import time
from pathlib import Path

import pytest
from kfp import compiler, dsl

from ml_platform.resources.pipeline_runs import JobRequest, JobState, PollPolicy
from ml_platform.resources.pipeline_runs.local import LocalPipelineRunner
from ml_platform.resources.templates.local import LocalTemplateRegistry

FAST = PollPolicy(initial_interval=0.1, max_interval=0.5, deadline=120)


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
def write_later(seconds: float, marker: str) -> str:
    """Sleeps, then writes: stands for a component whose write lands after a long step."""
    import time
    from pathlib import Path

    Path(marker + ".started").write_text("started")
    time.sleep(seconds)
    Path(marker).write_text("written")
    return "done"


@dsl.pipeline(name="write-later")
def write_later_pipeline(seconds: float = 0.0, marker: str = "") -> str:
    return write_later(seconds=seconds, marker=marker).output


def make_runner(root: Path) -> tuple[LocalPipelineRunner, object]:
    registry = LocalTemplateRegistry(root / "templates")
    compiled = root / "write-later.yaml"
    compiler.Compiler().compile(write_later_pipeline, str(compiled))
    template = registry.upload("write-later", compiled, tags=["latest"])
    return LocalPipelineRunner(root / "jobs.sqlite", root / "root", registry, poll=FAST), template


def request(template, job_id: str, **parameters) -> JobRequest:
    return JobRequest(
        job_id=job_id,
        template=template,
        parameters={"seconds": 0.0, "marker": "", **parameters},
        labels={"deployment": "local", "asset": "faults"},
    )


def wait_for(predicate, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_killed_worker_nobody_waits_for_is_failed_by_the_next_listing_and_its_components_stopped(
    tmp_path: Path,
):
    runner, template = make_runner(tmp_path)
    marker = tmp_path / "written"
    runner.submit(request(template, "orphaned", seconds=4.0, marker=str(marker)))
    wait_for(lambda: Path(f"{marker}.started").exists())  # the component is running
    os.kill(runner.store.row("orphaned")["pid"], signal.SIGKILL)  # the worker only

    # Nobody waits for the job; another process lists the jobs (the sensor, `pipelines list`):
    # once the kernel has ended the worker (a moment after SIGKILL), the job is failed.
    other = LocalPipelineRunner(tmp_path / "jobs.sqlite", tmp_path / "root", runner.registry)

    def failed() -> bool:
        (job,) = other.list_jobs()
        return job.state is JobState.FAILED

    wait_for(failed, seconds=5)
    assert "exited without recording a result" in other.get("orphaned").error

    time.sleep(5)  # past the component's write, had it lived on
    assert not marker.exists()  # nothing of the job wrote after its record said FAILED


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGHUP])
def test_a_waited_for_worker_that_is_killed_fails_its_job_at_once(tmp_path: Path, signum: int):
    runner, template = make_runner(tmp_path)
    marker = tmp_path / "written"
    job = runner.submit(request(template, "killed", seconds=30.0, marker=str(marker)))
    wait_for(lambda: Path(f"{marker}.started").exists())
    os.kill(runner.store.row("killed")["pid"], signum)
    started = time.monotonic()
    with pytest.raises(Exception, match="exited without recording a result"):
        runner.wait(job)
    assert time.monotonic() - started < 10
    assert not runner.worker_alive("killed")


def test_the_submit_path_on_tmpfs_never_fails_a_healthy_worker(tmp_path: Path):
    # /dev/shm is a tmpfs: where a worker's /proc entry could be read empty right after
    # its start (8 of 8 submits failed so before). 200 submits, each looked at at once.
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable tmpfs at /dev/shm")
    root = Path(__import__("tempfile").mkdtemp(dir=shm))
    try:
        runner, template = make_runner(root)
        failed = []
        for i in range(200):
            job = runner.submit(request(template, f"submit-{i}", seconds=30.0))
            seen = runner.get(job.job_id)
            if seen.state is JobState.FAILED:
                failed.append((seen.job_id, seen.error))
            runner.cancel(job.job_id)  # ends it: the next submit does not compete with it
        assert failed == []
        assert {j.state for j in runner.list_jobs()} == {JobState.CANCELLED}
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
