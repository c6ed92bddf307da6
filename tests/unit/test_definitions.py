import dataclasses
import json
import os
import subprocess
import sys

import dagster as dg
import pytest

from ml_platform.definitions import build_definitions
from ml_platform.settings import Settings

# Top-level packages, plus any Google Cloud SDK (the bare `google.cloud` namespace package,
# which some dependency touches, costs nothing).
HEAVY = ("kfp", "sklearn", "pandas", "pyarrow", "duckdb", "matplotlib", "google.cloud.")


def test_the_definitions_load(local_settings):
    defs = build_definitions(local_settings)
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {
        "raw/flights",
        "raw/weather",
        "staging/stg_flights",
        "features/flight_features",
        "features/training_data",
        "flight_delay_model",
        "flight_delay_predictions",
        "reporting/daily_delay_report",
        "reporting/carrier_route_risk",
        "reporting/prediction_calibration",
    } <= keys

    def parents(key: str) -> set[str]:
        node = graph.get(dg.AssetKey.from_user_string(key))
        return {parent.to_user_string() for parent in node.parent_keys}

    assert parents("staging/stg_flights") == {"raw/flights"}
    assert parents("flight_delay_model") == {"features/training_data"}
    assert "flight_delay_model" in parents("flight_delay_predictions")
    assert "flight_delay_predictions" in parents("reporting/scored_flights")
    assert parents("reporting/daily_delay_report") == {"reporting/scored_flights"}
    checks = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    assert ("flight_delay_model", "beats_baseline") in checks
    assert ("features/training_data", "not_null_training_data_is_delayed") in checks
    assert any(key == "raw/flights" for key, _ in checks)  # dbt source tests
    assert {job.name for job in defs.jobs} >= {
        "train_flight_delay_model",
        "score_flights",
        "refresh_reporting",
    }


BRANCH = {
    "DAGSTER_CLOUD_DEPLOYMENT_NAME": "pr-5",
    "DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT": "1",
    "DAGSTER_CLOUD_PULL_REQUEST_ID": "5",
    "ML_PLATFORM_GCP_PROJECT": "acme-ml",
    "ML_PLATFORM_GCS_BUCKET": "acme-ml-pipelines",
    "ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY": "pipeline-templates",
    "ML_PLATFORM_VERTEX_SERVICE_ACCOUNT": "vertex-pipelines@acme-ml.iam.gserviceaccount.com",
}


def test_slack_alerts_only_with_a_token(local_settings):
    from ml_platform.resources.alerts import LogAlerts
    from ml_platform.resources.alerts.slack import SlackAlerts

    quiet = build_definitions(local_settings)
    assert {s.name for s in quiet.sensors} == {"pipeline_job_completion", "retrain_on_drift"}
    assert isinstance(quiet.resources["alerts"], LogAlerts)
    loud = build_definitions(dataclasses.replace(local_settings, slack_token="xoxb-test"))
    assert "slack_on_run_failure" in {s.name for s in loud.sensors}
    assert isinstance(loud.resources["alerts"], SlackAlerts)
    assert {s.name for s in loud.schedules} == {"score_flights_daily"}


def test_a_branch_deployment_gets_the_google_cloud_backends():
    from ml_platform.resources.artifacts import GcsArtifactStore
    from ml_platform.resources.pipeline_runs.vertex import VertexPipelineRunner
    from ml_platform.resources.templates.artifact_registry import ArtifactRegistryTemplates
    from ml_platform.resources.warehouse.bigquery import BigQueryWarehouse
    from ml_platform.settings import Settings

    defs = build_definitions(Settings.from_env(BRANCH))
    dg.Definitions.validate_loadable(defs)
    resources = defs.resources
    assert isinstance(resources["warehouse"], BigQueryWarehouse)
    assert isinstance(resources["templates"], ArtifactRegistryTemplates)
    assert isinstance(resources["pipeline_runner"], VertexPipelineRunner)
    assert isinstance(resources["artifacts"], GcsArtifactStore)
    assert resources["artifacts"].root == "gs://acme-ml-pipelines/pipeline_root/branch/pr-5"
    assert resources["dbt"].target == "branch"


@pytest.mark.parametrize("deployment", ["local", "branch"])
def test_importing_the_code_location_loads_no_heavy_library(deployment: str):
    code = (
        "import gc, json, sys; import ml_platform.definitions; "
        f"heavy = {HEAVY!r}; "
        "print(json.dumps([sorted({h for h in heavy for m in sys.modules "
        "if m == h or m.startswith(h if h.endswith('.') else h + '.')}), "
        "gc.get_freeze_count(), len(gc.get_objects())]))"
    )
    env = {**os.environ, **(BRANCH if deployment == "branch" else {})}
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    heavy, frozen, tracked = json.loads(loaded.strip().splitlines()[-1])
    assert heavy == []
    # What the import built is frozen, out of the garbage collector's way (see P1).
    assert frozen > 100_000 and tracked < 1_000


def test_a_branch_deployment_has_its_automation_stopped_and_its_alerts_apart(monkeypatch):
    from ml_platform.alerting import RUN_FAILURE_SENSOR
    from ml_platform.resources.alerts import LogAlerts
    from ml_platform.resources.alerts.slack import SlackAlerts
    from ml_platform.sensors import SENSOR_NAME

    slack = {"ML_PLATFORM_SLACK_TOKEN": "xoxb-1", "ML_PLATFORM_SLACK_CHANNEL": "#prod-alerts"}
    prod_env = {k: v for k, v in BRANCH.items() if "BRANCH" not in k and "PULL" not in k}
    prod = build_definitions(
        Settings.from_env({**prod_env, "DAGSTER_CLOUD_DEPLOYMENT_NAME": "prod", **slack})
    )
    for name in (SENSOR_NAME, RUN_FAILURE_SENSOR):
        assert prod.resolve_sensor_def(name).default_status is dg.DefaultSensorStatus.RUNNING
    assert prod.resources["alerts"].channel == "#prod-alerts"

    # A branch never posts to prod's channel: the log only, unless it names its own.
    branch = build_definitions(Settings.from_env({**BRANCH, **slack}))
    completion = branch.resolve_sensor_def(SENSOR_NAME)
    assert completion.default_status is dg.DefaultSensorStatus.STOPPED
    assert "Stopped in branch deployments" in completion.description
    assert isinstance(branch.resources["alerts"], LogAlerts)
    assert RUN_FAILURE_SENSOR not in {s.name for s in branch.sensors}
    own = {**BRANCH, **slack, "ML_PLATFORM_SLACK_BRANCH_CHANNEL": "#pr-alerts"}
    branch = build_definitions(Settings.from_env(own))
    assert isinstance(branch.resources["alerts"], SlackAlerts)
    assert branch.resources["alerts"].channel == "#pr-alerts"
    failure = branch.resolve_sensor_def(RUN_FAILURE_SENSOR)
    assert failure.default_status is dg.DefaultSensorStatus.STOPPED
