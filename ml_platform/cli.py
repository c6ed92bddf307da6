"""``ml-platform``: the project's command line.

ml-platform materialize [--days N]   the whole asset graph, in the Dagster instance
                                     that `dagster dev` shows, then a summary
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from datetime import date, timedelta

from ml_platform.settings import Settings, get_settings

REPORTING_TABLES = ("daily_delay_report", "carrier_route_risk", "prediction_calibration")


def _instance(settings: Settings):
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    settings.dagster_home.mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(settings.dagster_home)))


def materialize(settings: Settings, days: int) -> int:
    """Ingest, features, model, ``days`` days of predictions after the cutoff, reporting."""

    from ml_platform.assets.model import MODEL_KEY
    from ml_platform.assets.predictions import PREDICTIONS_TABLE
    from ml_platform.definitions import build_definitions
    from ml_platform.resources.warehouse import DuckDBWarehouse

    if not settings.is_local:
        print("materialize runs the local deployment only", file=sys.stderr)
        return 2
    defs = build_definitions(settings)
    instance = _instance(settings)
    window = [settings.training_cutoff + timedelta(days=i) for i in range(days)]

    log_path = settings.data_dir / "materialize.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")

    def run(job_name: str, **kwargs) -> None:
        # The full logs are in the Dagster instance (`make dev`) and dbt's output in the log
        # file; the terminal gets progress and a summary.
        with log_path.open("a") as log, contextlib.redirect_stdout(log):
            result = defs.resolve_job_def(job_name).execute_in_process(
                instance=instance,
                raise_on_error=False,
                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
                **kwargs,
            )
        if not result.success:
            failure = next(
                (e for e in result.all_events if e.event_type_value == "STEP_FAILURE"), None
            )
            detail = failure.event_specific_data.error.message if failure else "see the run's logs"
            raise SystemExit(
                f"{job_name} failed (run {result.run_id}): {detail.strip()}\n"
                f"dbt output: {log_path}; the run's logs: make dev"
            )

    print("1/3 ingest, dbt features, flight_delay_model", flush=True)
    run("train_flight_delay_model")
    print(f"2/3 flight_delay_predictions for {window[0]} .. {window[-1]}", flush=True)
    for day in window:
        run("score_flights", partition_key=day.isoformat())
    print("3/3 dbt reporting models", flush=True)
    run("refresh_reporting")

    model = instance.get_latest_materialization_event(MODEL_KEY).asset_materialization.metadata
    warehouse = DuckDBWarehouse(settings.duckdb_path)
    predictions = settings.dataset("predictions")
    predicted = sum(
        warehouse.row_count(predictions, PREDICTIONS_TABLE, column="flight_date", value=day)
        for day in window
    )
    reporting = settings.dataset("reporting")
    print()
    rows = [
        ("test ROC AUC", "roc_auc", "baseline_roc_auc"),
        ("log loss", "log_loss", "baseline_log_loss"),
        ("Brier score", "brier_score", "baseline_brier_score"),
    ]
    print("flight_delay_model (test split; baseline: delay rate by carrier x scheduled hour)")
    for label, name, baseline in rows:
        print(f"  {label:<13}{model[name].value:.4f}   baseline {model[baseline].value:.4f}")
    print(f"flight_delay_predictions: {predicted:,} flights over {len(window)} days")
    print("reporting tables:")
    for table in REPORTING_TABLES:
        print(f"  {reporting}.{table}: {warehouse.row_count(reporting, table):,} rows")
    print(f"warehouse: {settings.duckdb_path}")
    print(f"Dagster instance: {settings.dagster_home} (make dev shows these runs)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ml-platform", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("materialize", help="materialize the whole asset graph locally")
    run.add_argument(
        "--days", type=int, default=7, help="days of predictions after the cutoff (default 7)"
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.command == "materialize":
        if not 1 <= args.days <= (date(2014, 1, 1) - settings.training_cutoff).days:
            parser.error("--days must fit between the training cutoff and the end of 2013")
        return materialize(settings, args.days)
    return 2


if __name__ == "__main__":
    sys.exit(main())
