"""Faults outside the code's control give one line that says what and where, and leave
nothing half-written: a full disk and a read-only data folder (small tmpfs mounts: root is
needed), bad settings, an unknown pipeline, a job store deleted under a live sensor."""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest

from ml_platform.settings import PROJECT_DIR
from tests.integration.test_completion_sensor import make_world, run_keys

BIN = Path(sys.executable).parent


@contextmanager
def tmpfs(path: Path, *, size: str, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path: Path) -> None:
    """Leave no free block on the filesystem of ``path``."""
    try:
        with (path / "filler").open("wb", buffering=0) as filler:
            while True:
                filler.write(b"\0" * 4096)
    except OSError:
        pass


def ml_platform(data: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ml-platform"), *args],
        env={**os.environ, "ML_PLATFORM_DATA_DIR": str(data), **env},
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line(done: subprocess.CompletedProcess, *expected: str) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_a_full_disk_is_one_line_naming_the_file_and_nothing_is_half_written(tmp_path: Path):
    with tmpfs(tmp_path / "data", size="1m") as data:
        fill(data)
        done = ml_platform(data, "pipelines", "run", "training", "--no-wait")
        line = assert_one_line(done, "No space left on device", str(data))
        assert line.startswith("ml-platform: ")
        written = [p.name for p in data.rglob("*") if p.is_file() and p.name != "filler"]
        assert not [name for name in written if name.endswith(".tmp")]  # no half of a file
        assert "tags.json" not in written  # no tag points at a version that is not there
        assert "pipeline_jobs.sqlite" not in written  # no job was recorded


def test_a_read_only_data_folder_is_one_line_naming_it(tmp_path: Path):
    with tmpfs(tmp_path / "data", size="1m", read_only=True) as data:
        line = assert_one_line(ml_platform(data, "pipelines", "list"), str(data))
        assert "pipeline job store" in line
        assert_one_line(
            ml_platform(data, "pipelines", "run", "training", "--no-wait"),
            "Read-only file system",
            str(data),
        )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (
            ["pipelines", "list"],
            {"ML_PLATFORM_TEMPLATE_TAG": "v1 final"},
            "ML_PLATFORM_TEMPLATE_TAG",
        ),
        (["pipelines", "list"], {"ML_PLATFORM_GCP_REGION": "us central"}, "ML_PLATFORM_GCP_REGION"),
        (["pipelines", "compile", "--pipeline", "nope"], {}, "--pipeline: invalid choice: 'nope'"),
        (["materialize", "--days", "0"], {}, "--days must fit"),
    ],
)
def test_bad_input_is_one_line_naming_it(tmp_path: Path, args, env, expected):
    assert_one_line(ml_platform(tmp_path / "data", *args, **env), expected)
    assert not (tmp_path / "data").exists()  # refused before anything was written


def test_a_job_store_deleted_under_a_live_sensor_is_made_again_by_the_next_tick(tmp_path: Path):
    with dg.instance_for_test() as instance:
        world = make_world(tmp_path, instance)
        world.add_job(day="2013-12-01")
        assert len(run_keys(world.tick())) == 1
        for path in world.settings.data_dir.glob("pipeline_jobs.sqlite*"):
            path.unlink()  # the store goes, the code location (and its sensor) stays
        assert run_keys(world.tick()) == []  # no "no such table" on every tick after
        assert world.settings.job_store_path.exists()
        job_id = world.add_job(day="2013-12-02")  # and new jobs are seen again
        assert run_keys(world.tick()) == [f"projects/local/locations/local/pipelineJobs/{job_id}"]
