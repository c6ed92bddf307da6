"""P2: `ml-platform materialize` (make run's main job) beside a bare single-process script
doing the same work with the same libraries (bench/bare_reference.py), on the full data.

Both run in scratch folders (neither reads nor disturbs the project's own data), alternating,
each keeping its warehouse from round to round as a user's second `make run` does; a warm-up
round of each comes first (the code location parses the dbt project for a new data folder,
the reference needs dbt's compiled SQL for its warehouse). After the timed rounds the two
warehouses are compared table by table, to the last row; a difference fails the bench.

    uv run python bench/p2_materialize.py [--rounds 2] [--days 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import measure, summary

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Columns that name the process that wrote a row or when: they differ by nature.
VOLATILE_COLUMNS = ("pipeline_job", "scored_at", "last_scored_at")


def compile_dbt(warehouse: Path, target: Path, env: dict[str, str]) -> Path:
    """dbt's compiled SQL for ``warehouse``, with the vars the runs pass (its manifest)."""
    from ml_platform.settings import Settings

    settings = Settings.from_env({"ML_PLATFORM_DATA_DIR": str(warehouse.parent)})
    subprocess.run(
        [
            str(BIN / "dbt"),
            "compile",
            "--quiet",
            "--target-path",
            str(target),
            "--vars",
            json.dumps(settings.dbt_vars),
        ],
        cwd=PROJECT / "dbt_project",
        env=env,
        check=True,
    )
    return target / "manifest.json"


def differences(ours: Path, bare: Path) -> tuple[int, list[str]]:
    """How many tables both warehouses hold, and what differs: tables one lacks, and tables
    whose rows differ (DOUBLE columns compared to 10 decimals, volatile columns left out)."""
    import duckdb

    with duckdb.connect() as db:
        db.execute(f"ATTACH '{ours}' AS ours (READ_ONLY)")
        db.execute(f"ATTACH '{bare}' AS bare (READ_ONLY)")

        def tables(catalog: str) -> set[tuple[str, str]]:
            return set(
                db.execute(
                    "SELECT table_schema, table_name FROM information_schema.tables "
                    "WHERE table_catalog = ?",
                    [catalog],
                ).fetchall()
            )

        found = tables("ours")
        problems = [f"only in one warehouse: {'.'.join(t)}" for t in found ^ tables("bare")]
        for schema, table in sorted(found & tables("bare")):
            columns = db.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_catalog = 'ours' AND table_schema = ? AND table_name = ? "
                "ORDER BY ordinal_position",
                [schema, table],
            ).fetchall()
            select = ", ".join(
                f'round("{name}", 10)' if kind in ("DOUBLE", "FLOAT") else f'"{name}"'
                for name, kind in columns
                if name not in VOLATILE_COLUMNS
            )
            for a, b in (("ours", "bare"), ("bare", "ours")):
                (extra,) = db.execute(
                    f'SELECT count(*) FROM (SELECT {select} FROM {a}."{schema}"."{table}" '
                    f'EXCEPT ALL SELECT {select} FROM {b}."{schema}"."{table}")'
                ).fetchone()
                if extra:
                    problems.append(f"{schema}.{table}: {extra} rows only in {a}")
        return len(found), problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--days", type=int, default=7)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="p2-"))
    (root / "home").mkdir()
    shutil.copy(PROJECT / "dagster_home" / "dagster.yaml", root / "home")
    env = {
        "ML_PLATFORM_DATA_DIR": str(root / "data"),
        "DAGSTER_HOME": str(root / "home"),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    bare_warehouse = root / "bare" / "warehouse.duckdb"
    bare_warehouse.parent.mkdir()
    manifest = compile_dbt(bare_warehouse, root / "bare-target", {**os.environ, **env})
    commands = {
        "ml-platform materialize": [
            str(BIN / "ml-platform"),
            "materialize",
            "--days",
            str(args.days),
        ],
        "bare reference": [
            sys.executable,
            str(PROJECT / "bench" / "bare_reference.py"),
            str(bare_warehouse),
            str(manifest),
            "--days",
            str(args.days),
        ],
    }
    samples: dict[str, list] = {name: [] for name in commands}
    try:
        for command in commands.values():  # warm-up
            measure(command, env)
        for _ in range(args.rounds):
            for name, command in commands.items():
                samples[name].append(measure(command, env))
        count, problems = differences(root / "data" / "warehouse.duckdb", bare_warehouse)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    medians = {name: summary(values).seconds for name, values in samples.items()}
    print(
        f"P2 make run's materialize vs a bare single-process reference, full data, {args.days} "
        f"days scored, median of {args.rounds} alternating rounds"
    )
    for name, seconds in medians.items():
        print(f"  {name:<24} {seconds:6.1f} s")
    ratio = medians["ml-platform materialize"] / medians["bare reference"]
    print(f"  ratio {ratio:.2f}x (goal <= 2x)")
    if problems:
        print("  outputs differ:\n    " + "\n    ".join(problems))
        return 1
    print(
        f"  outputs: the {count} tables and views of both warehouses hold the same rows "
        f"(DOUBLE columns to 10 decimals; {', '.join(VOLATILE_COLUMNS)} left out)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
