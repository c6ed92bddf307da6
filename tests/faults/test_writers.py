"""Writers of the local warehouse take turns, for real: processes started at the same time
against one DuckDB file, dbt among them."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from ml_platform.resources.warehouse import WarehouseError
from ml_platform.resources.warehouse.duckdb import DuckDBWarehouse

PROJECT = Path(__file__).resolve().parents[2]


def hold_turn(path: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the warehouse for a writer of its own, as the dbt assets do."""
    code = textwrap.dedent(
        f"""
        import time
        from ml_platform.resources.warehouse.duckdb import DuckDBWarehouse

        with DuckDBWarehouse({str(path)!r}).writer_turn("dbt build of dbt_features"):
            print("holding", flush=True)
            time.sleep({seconds})
            print(f"released {{time.time()}}", flush=True)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def table(rows: int) -> pa.Table:
    return pa.table({"n": list(range(rows))})


def test_a_writer_waits_for_a_turn_held_for_dbt_then_writes(tmp_path: Path):
    path = tmp_path / "warehouse.duckdb"
    DuckDBWarehouse(path).replace_table("raw", "t", table(1))
    holder = hold_turn(path, 2)
    try:
        assert DuckDBWarehouse(path).replace_table("raw", "t", table(5)) == 5
        written = time.time()
        released = float(holder.stdout.readline().split()[1])
        assert released <= written  # one after the other, not in the middle of "dbt"
    finally:
        holder.kill()
        holder.wait()
    assert DuckDBWarehouse(path).row_count("raw", "t") == 5


def test_a_writer_that_waits_too_long_says_who_holds_the_warehouse(tmp_path: Path):
    path = tmp_path / "warehouse.duckdb"
    holder = hold_turn(path, 30)
    try:
        with pytest.raises(WarehouseError) as waited:
            DuckDBWarehouse(path, lock_timeout=0.5).replace_table("raw", "t", table(1))
    finally:
        holder.kill()
        holder.wait()
    message = str(waited.value)
    assert f"pid {holder.pid} (dbt build of dbt_features) has held it for over 0.5 s" in message
    assert "\n" not in message


def test_two_materializations_at_once_both_finish(tmp_path: Path):
    """Ingest (a writer) and the dbt staging and features models (dbt, a writer that opens
    the file itself), twice at the same moment on one warehouse: as the UI and `make run`."""
    code = textwrap.dedent(
        """
        import dagster as dg
        from ml_platform.definitions import defs

        job = dg.define_asset_job(
            "features",
            selection=dg.AssetSelection.groups("ingest", "staging", "features"),
        )
        defs = dg.Definitions.merge(defs, dg.Definitions(jobs=[job]))
        result = defs.resolve_job_def("features").execute_in_process(
            run_config={"ops": {"ingest_nycflights13": {"config": {
                "start_date": "2013-09-01", "end_date": "2013-09-07"}}}},
            raise_on_error=False,
        )
        failures = [e.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        print("SUCCESS" if result.success else f"FAILED {failures}")
        """
    )
    env = {
        **os.environ,
        "ML_PLATFORM_DATA_DIR": str(tmp_path / "data"),
        "DAGSTER_HOME": str(tmp_path / "home"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    (tmp_path / "home").mkdir()
    # The dbt project's manifest is prepared for this deployment first, by one process: two
    # first loads at once would both parse (and take turns at that, dagster-dbt's guard).
    subprocess.run([sys.executable, "-c", "import ml_platform.definitions"], env=env, check=True)
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            cwd=PROJECT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    for output in outputs:
        assert "Conflicting lock" not in output
        assert output.strip().splitlines()[-1] == "SUCCESS", output[-3000:]
