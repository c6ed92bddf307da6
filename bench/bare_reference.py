"""The work of `ml-platform materialize`, done by one bare Python process: no Dagster, no dbt
process, no pipeline job. P2 times it beside the real command and checks that both leave
the same tables, to the last row.

    python bench/bare_reference.py WAREHOUSE MANIFEST [--days 7]

Same libraries and the project's own functions: the raw tables are read by the ingest's
``load_raw_tables``; the dbt models and data tests run as the SQL dbt compiled for this
warehouse (MANIFEST: a ``dbt compile`` with the runs' vars), each model created as dbt
materializes it (view or table) and each test counted as dbt counts its failures; the model
is trained, evaluated and plotted by ``ml_platform.pipelines.model`` as the training
component does it, and the days are scored and replaced as the scoring component does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import timedelta
from graphlib import TopologicalSorter
from pathlib import Path

from ml_platform.assets.ingest import load_raw_tables
from ml_platform.pipelines import model as flight_model
from ml_platform.resources.warehouse.duckdb import DuckDBWarehouse
from ml_platform.settings import Settings

REPORTING_TAG = "reporting"


def dbt_nodes(manifest: dict, *, reporting: bool) -> list[dict]:
    """The models and data tests of one dbt asset (reporting or not), in dependency order."""
    nodes = {
        node_id: node
        for node_id, node in manifest["nodes"].items()
        if node["resource_type"] in ("model", "test")
    }

    def is_reporting(node: dict) -> bool:
        if node["resource_type"] == "model":
            return REPORTING_TAG in node["tags"]
        return any(
            is_reporting(nodes[parent]) for parent in node["depends_on"]["nodes"] if parent in nodes
        )

    chosen = {node_id for node_id, node in nodes.items() if is_reporting(node) == reporting}
    graph = {
        node_id: [p for p in nodes[node_id]["depends_on"]["nodes"] if p in chosen]
        for node_id in chosen
    }
    return [nodes[node_id] for node_id in TopologicalSorter(graph).static_order()]


def run_dbt_sql(connection, nodes: list[dict]) -> None:
    for node in nodes:
        sql = node["compiled_code"]
        if node["resource_type"] == "model":
            kind = "VIEW" if node["config"]["materialized"] == "view" else "TABLE"
            connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{node["schema"]}"')
            relation = f'"{node["schema"]}"."{node["alias"]}"'
            connection.execute(f"CREATE OR REPLACE {kind} {relation} AS {sql}")
        else:
            (failures,) = connection.execute(
                f"SELECT count(*) FROM ({sql}) AS dbt_internal_test"
            ).fetchone()
            if failures and node["config"]["severity"].lower() == "error":
                raise SystemExit(f"data test {node['name']} failed: {failures} rows")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("warehouse", type=Path)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--days", type=int, default=7)
    args = parser.parse_args()
    import duckdb

    settings = Settings.from_env({"ML_PLATFORM_DATA_DIR": str(args.warehouse.parent)})
    manifest = json.loads(args.manifest.read_text())
    warehouse = DuckDBWarehouse(args.warehouse)
    cutoff = settings.training_cutoff

    load_raw_tables(warehouse, settings.dataset("raw"))
    with duckdb.connect(str(args.warehouse)) as connection:
        run_dbt_sql(connection, dbt_nodes(manifest, reporting=False))

    # Training and evaluation, as the training component does them.
    features = settings.dataset("features")
    rows = warehouse.read_table(
        features, "training_data", date_column=flight_model.DATE, end=cutoff
    )
    earlier, window = flight_model.hold_out_window(rows, cutoff, where="training_data")
    window_start = cutoff - timedelta(days=flight_model.HOLDOUT_DAYS)
    train, test = flight_model.split_training_data(earlier, window_start, where="training_data")
    estimator = flight_model.train_model(train)
    evaluation, curves = flight_model.evaluate(estimator, train, test)
    flight_model.evaluate_out_of_time(estimator, train, window, None)
    with tempfile.TemporaryDirectory() as scratch:
        flight_model.plot_evaluation(evaluation, curves, Path(scratch) / "plot.png")
        version = flight_model.save_model(estimator, Path(scratch) / "model")

    # Scoring the days, as the scoring component does it.
    first = cutoff
    scored = warehouse.read_table(
        features,
        "flight_features",
        date_column=flight_model.DATE,
        start=first,
        end=first + timedelta(days=args.days),
    )
    days = [first + timedelta(days=i) for i in range(args.days)]
    parts = flight_model.score_days(estimator, version, scored, days, "bare")
    warehouse.replace_partitions(
        settings.dataset("predictions"), "flight_delay_predictions", flight_model.DATE, parts
    )

    with duckdb.connect(str(args.warehouse)) as connection:
        run_dbt_sql(connection, dbt_nodes(manifest, reporting=True))
    print(f"bare reference: model {version}, {sum(p.num_rows for p in parts.values())} scored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
