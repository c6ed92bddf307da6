"""P7: what each dbt step of a run costs, and where the time goes: the two dbt assets
(`dbt_features`, `dbt_reporting`) as a run executes them, with their events streamed as
they were (before) against with dagster-dbt's row counts, column types and column lineage
fetched on the stream (now).

A local deployment in a data folder of its own (a slice of the raw data, and one day of
predictions written straight to the warehouse, so that no model needs training); the two
variants alternate (the machine is noisy) and the medians are the figures. Per step: its
duration as Dagster records it (start to success), and the time from dagster-dbt's
`--version` to the start of `dbt build`: the version check (DbtCliResource runs it once per
resource instance, i.e. once per run or step process, with the resource's executable:
ml-platform-dbt, see ml_platform/assets/dbt.py) plus dagster-dbt's own dbt adapter set-up.
`dbt --version` and `ml-platform-dbt --version` on their own are timed too.

    uv run python bench/p7_dbt_steps.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from datetime import date, datetime
from pathlib import Path
from statistics import median

from measure import measure

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

# A data folder of the bench's own, at a fixed place: the code location prepares the dbt
# parse for it at import (once; later runs of the bench reuse it), so it is set first.
ROOT = Path(tempfile.gettempdir()) / "ml-platform-p7"
os.environ["ML_PLATFORM_DATA_DIR"] = str(ROOT / "data")
os.environ["DAGSTER_HOME"] = str(ROOT / "home")
# dagster-dbt starts `dbt` from PATH when it prepares the parse: the project's.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

START, END, DAY = date(2013, 9, 1), date(2013, 10, 5), date(2013, 10, 1)
STEPS = ("dbt_features", "dbt_reporting")
VARIANTS = {"stream only (before)": False, "with the fetches (now)": True}

launches: list[tuple[float, list[str]]] = []


def record_launches(event: str, args: tuple) -> None:
    if event == "subprocess.Popen":
        launches.append((time.time(), [str(part) for part in (args[1] or [])][:2]))


def prepare_data() -> None:
    """Raw tables of the slice and one day of predictions over its flights."""
    import pyarrow as pa

    from ml_platform.assets.ingest import load_raw_tables
    from ml_platform.pipelines import model
    from ml_platform.resources.warehouse.duckdb import DuckDBWarehouse
    from ml_platform.settings import get_settings

    shutil.rmtree(ROOT / "data", ignore_errors=True)
    (ROOT / "home").mkdir(parents=True, exist_ok=True)
    settings = get_settings()
    warehouse = DuckDBWarehouse(settings.duckdb_path)
    load_raw_tables(warehouse, settings.dataset("raw"), start=START, end=END)
    # Flight keys of the day as the features build them: one throwaway dbt run first.
    run_steps(table_metadata=False, steps=("dbt_features",))
    with warehouse.connect(read_only=True) as connection:
        keys = [row[0] for row in connection.execute(
            f"select flight_key from {settings.dataset('features')}.flight_features "
            f"where flight_date = DATE '{DAY}' order by flight_key"
        ).fetchall()]  # fmt: skip
    rows = len(keys)
    predictions = pa.table(
        {
            "flight_key": keys,
            "flight_date": [DAY] * rows,
            "delay_probability": [(i % 97 + 1) / 100 for i in range(rows)],
            "model_version": ["sha256:p7"] * rows,
            "pipeline_job": [f"p7-{DAY}"] * rows,
            "scored_at": [datetime(2013, 10, 2, 6)] * rows,
        },
        schema=model.predictions_schema(),
    )
    warehouse.replace_partition(
        settings.dataset("predictions"), "flight_delay_predictions", model.DATE, DAY, predictions
    )


def run_steps(*, table_metadata: bool, steps: tuple[str, ...] = STEPS) -> dict[str, dict]:
    """Run the dbt assets' steps once; per step: seconds, and `dbt --version` to `dbt build`."""
    import dagster as dg

    from ml_platform.assets.dbt import build_dbt_assets
    from ml_platform.resources.backends import build_resources
    from ml_platform.settings import get_settings

    settings = get_settings()
    assets = build_dbt_assets(settings, table_metadata=table_metadata)
    selected = [a for a in assets if a.op.name in steps]
    job = dg.define_asset_job("dbt_steps", selection=dg.AssetSelection.assets(*selected))
    defs = dg.Definitions(assets=assets, jobs=[job], resources=build_resources(settings))
    instance = dg.DagsterInstance.ephemeral()
    first = len(launches)
    # dbt's output and Dagster's logs: not the bench's.
    with (
        open(os.devnull, "w") as sink,
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        result = defs.resolve_job_def("dbt_steps").execute_in_process(instance=instance)
    assert result.success
    times: dict[str, dict[str, float]] = defaultdict(dict)
    for entry in instance.all_logs(result.run_id):
        kind = entry.dagster_event.event_type_value if entry.dagster_event else None
        if kind in ("STEP_START", "STEP_SUCCESS"):
            times[entry.step_key][kind] = entry.timestamp
    figures = {}
    for step in steps:
        begin, end = times[step]["STEP_START"], times[step]["STEP_SUCCESS"]
        ours = [(at, args) for at, args in launches[first:] if begin <= at <= end]
        version = [at for at, args in ours if args[1:] == ["--version"]]
        build = [at for at, args in ours if args[1:] == ["build"]]
        figures[step] = {
            "seconds": end - begin,
            "version_checks": len(version),
            "version_to_build": build[0] - version[0] if version and build else float("nan"),
        }
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    warnings.filterwarnings("ignore")
    sys.addaudithook(record_launches)
    from ml_platform.settings import DBT_EXECUTABLE

    prepare_data()
    samples: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    version_alone: dict[str, list[float]] = {"dbt": [], DBT_EXECUTABLE.name: []}
    for _ in range(rounds):
        for name, table_metadata in VARIANTS.items():
            samples[name].append(run_steps(table_metadata=table_metadata))
        for command in version_alone:
            executable = DBT_EXECUTABLE.parent / command
            version_alone[command].append(measure([str(executable), "--version"]).seconds)

    print(f"P7 dbt steps of a run, local DuckDB, medians of {rounds} alternating rounds")
    for command, seconds in version_alone.items():
        print(f"  `{command} --version` on its own: {median(seconds):.2f} s")
    header = f"  {'step':<14}" + "".join(f"{name:>26}" for name in VARIANTS) + f"{'ratio':>8}"
    print(header)
    for step in STEPS:
        seconds = [median(s[step]["seconds"] for s in samples[name]) for name in VARIANTS]
        cells = "".join(f"{value:>24.2f} s" for value in seconds)
        print(f"  {step:<14}{cells}{seconds[1] / seconds[0]:>7.2f}x")
    # The resource is set up once per run here (in-process executor): its first dbt step
    # checks the version; with a process per step (multiprocess executor), every step does.
    for step in STEPS:
        checks = {s[step]["version_checks"] for name in VARIANTS for s in samples[name]}
        if checks == {0}:
            print(f"  {step:<14} no `dbt --version` (the run's resource had checked already)")
            continue
        gaps = [median(s[step]["version_to_build"] for s in samples[name]) for name in VARIANTS]
        print(
            f"  {step:<14} `dbt --version` + dbt adapter set-up, before `dbt build` starts: "
            + ", ".join(f"{gap:.2f} s" for gap in gaps)
        )
    total = [sum(median(s[st]["seconds"] for s in samples[n]) for st in STEPS) for n in VARIANTS]
    print(f"  both steps: {total[0]:.2f} s before, {total[1]:.2f} s now")
    return 0


if __name__ == "__main__":
    sys.exit(main())
