"""How `ml-platform materialize` ends when a step fails: the error that failed it on the last
line of the terminal, its stack in the log file, and nothing at exit (no leak reports).

A real step fails for real: the warehouse file of the data folder is not a DuckDB database,
so the ingest reads every raw file with DuckDB and then cannot open the warehouse. That
takes seconds, where a whole materialize takes a minute.

The command runs from a fresh clone (a copy of ml_platform/ and dbt_project/ without a dbt
manifest), as `make run` does the first time: the code location then parses the dbt project
when it loads, which is when DuckDB got frozen (see ml_platform/definitions.py). The copy
also keeps that parse, prepared for a temporary data folder, out of the repository's
dbt_project/target, which other processes and tests use.
"""

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from dagster_shared.error import SerializableErrorInfo

from ml_platform import cli
from ml_platform.launch import EVERYTHING_JOB

REPOSITORY = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# What the parse of a missing or stale dbt manifest does when the code location loads:
# dagster-dbt starts the dbt adapter in this process, which imports duckdb before the code
# location freezes what it holds (ml_platform/definitions.py). Done here explicitly, the
# test does not depend on the state of the manifest.
DUCKDB_FIRST = "import duckdb, sys; from ml_platform.cli import main; sys.exit(main())"


@dataclass
class Ended:
    returncode: int
    stdout: str
    stderr: str
    log: str
    warehouse: Path


def fresh_clone(root: Path) -> Path:
    clone = root / "clone"
    shutil.copytree(
        REPOSITORY / "ml_platform",
        clone / "ml_platform",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copytree(
        REPOSITORY / "dbt_project",
        clone / "dbt_project",
        ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"),
    )
    # What runs go through: the workspace the daemon loads, the instance's settings.
    shutil.copy(REPOSITORY / "workspace.yaml", clone / "workspace.yaml")
    (clone / "dagster_home").mkdir()
    shutil.copy(REPOSITORY / "dagster_home" / "dagster.yaml", clone / "dagster_home")
    return clone


def materialize(root: Path, clone: Path, command: list[str]) -> Ended:
    data = root / "data"
    data.mkdir(exist_ok=True)
    warehouse = data / "warehouse.duckdb"
    warehouse.write_text("not a DuckDB database\n")
    env = {
        **os.environ,
        "ML_PLATFORM_DATA_DIR": str(data),
        "DAGSTER_HOME": str(root / "home"),
        # The clone's ml_platform before the repository's (installed editable).
        "PYTHONPATH": os.pathsep.join(filter(None, [str(clone), os.environ.get("PYTHONPATH")])),
        # As `uv run` (make run) has it: the environment's bin first (dagster-dbt runs `dbt`).
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    done = subprocess.run(
        [*command, "materialize", "--days", "1"],
        env=env,
        cwd=root,  # not the repository: `python -c` imports from its working directory
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = data / "materialize.log"
    return Ended(
        done.returncode,
        done.stdout,
        done.stderr,
        log.read_text() if log.exists() else "",
        warehouse,
    )


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return fresh_clone(tmp_path_factory.mktemp("clone"))


@pytest.fixture(scope="module")
def failed(tmp_path_factory, clone) -> dict[str, Ended]:
    root = tmp_path_factory.mktemp("materialize")
    # One data folder for both: the first prepares the dbt manifest for it (the fresh clone
    # has none), the second loads it as it is.
    return {
        "ml-platform": materialize(root, clone, [str(BIN / "ml-platform")]),
        "duckdb first": materialize(root, clone, [sys.executable, "-c", DUCKDB_FIRST]),
    }


def test_a_failed_step_ends_with_its_own_error_and_leaves_the_stack_in_the_log(failed):
    ended = failed["ml-platform"]
    assert ended.returncode == 1
    # What the run was to do, then each step as it started: the first failed.
    what, *steps = ended.stdout.splitlines()
    assert what.startswith(f"{EVERYTHING_JOB}: ingest, dbt features, flight_delay_model")
    assert steps == ["  ingest_nycflights13"]
    for stream in (ended.stdout, ended.stderr):
        assert "Traceback" not in stream
        assert "Stack Trace" not in stream
        assert "DagsterExecutionStepExecutionError" not in stream
    *_, where, cause = ended.stderr.splitlines()
    assert where.startswith(f"{EVERYTHING_JOB} failed (run ")
    assert "in step ingest_nycflights13" in where
    assert str(ended.warehouse.parent / "materialize.log") in where
    assert cause == (
        f"WarehouseError: cannot open {ended.warehouse}: IO Error: The file "
        f'"{ended.warehouse}" exists, but it is not a valid DuckDB database file!'
    )
    # The whole error, with the stack of every exception in the chain, is in the log file.
    assert "STEP_FAILURE" in ended.log
    assert "DagsterExecutionStepExecutionError" in ended.log
    assert f"WarehouseError: cannot open {ended.warehouse}" in ended.log
    assert "Stack Trace:" in ended.log
    assert 'ml_platform/resources/warehouse/duckdb.py", line' in ended.log


@pytest.mark.parametrize("command", ["ml-platform", "duckdb first"])
def test_the_cli_exits_without_leak_reports(failed, clone, command):
    ended = failed[command]
    # The first parsed the dbt project when the code location loaded: only that can have
    # written the manifest (the run failed before its dbt step).
    # (Under target/ for the default data folder, target/local-* for another: this one.)
    assert list((clone / "dbt_project" / "target").glob("**/manifest.json"))
    # It got as far as the ingest, which read the raw files with DuckDB.
    assert ended.returncode == 1 and "WarehouseError: cannot open" in ended.stderr
    # Neither the command nor the processes it started (the daemon, the run workers: their
    # output is in the log file).
    for output in (ended.stderr, ended.log):
        noise = [line for line in output.splitlines() if "nanobind" in line or "leaked" in line]
        assert noise == []


def error(cls_name, message, cause=None) -> SerializableErrorInfo:
    return SerializableErrorInfo(
        message=message, stack=["  File ...\n"], cls_name=cls_name, cause=cause
    )


def test_the_error_shown_is_the_first_past_dagsters_own():
    raw = error(
        "RawDataError",
        "ml_platform.assets.ingest.RawDataError: raw table weather (/d/weather.csv) is "
        "malformed: Conversion Error: CSV Error on Line: 6\nColumn visib\n",
        cause=error("ConversionException", "_duckdb.ConversionException: CSV Error\n" * 20),
    )
    step = error(
        "DagsterExecutionStepExecutionError",
        "dagster._core.errors.DagsterExecutionStepExecutionError: Error occurred while "
        'executing op "ingest_nycflights13":\n',
        cause=raw,
    )
    assert cli.error_line(step) == (
        "RawDataError: raw table weather (/d/weather.csv) is malformed: Conversion Error: "
        "CSV Error on Line: 6 Column visib"  # on one line: the terminal's last
    )
    assert cli.error_line(error("ValueError", "builtins.ValueError\n")) == "ValueError"
    assert cli.error_line(error(None, "KeyError: 'x'\n")) == "KeyError: 'x'"
    # A Dagster error with no cause is the error itself (dbt's, say).
    dbt = error("DagsterDbtCliRuntimeError", "dagster_dbt.errors.DagsterDbtCliRuntimeError: x\n")
    assert cli.error_line(dbt) == "DagsterDbtCliRuntimeError: x"
