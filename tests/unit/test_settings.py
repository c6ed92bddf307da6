from pathlib import Path

import pytest

from ml_platform.settings import (
    DATASETS,
    PROD_DATASETS,
    Deployment,
    Settings,
    SettingsError,
    sanitize_label_key,
    sanitize_label_value,
)

GCP = {"ML_PLATFORM_GCP_PROJECT": "acme-ml", "ML_PLATFORM_GCS_BUCKET": "acme-ml-pipelines"}


def branch(pr: str = "42", **extra: str) -> Settings:
    return Settings.from_env(
        {
            "DAGSTER_CLOUD_DEPLOYMENT_NAME": f"pr-{pr}",
            "DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT": "1",
            "DAGSTER_CLOUD_PULL_REQUEST_ID": pr,
            **GCP,
            **extra,
        }
    )


def prod() -> Settings:
    return Settings.from_env({"DAGSTER_CLOUD_DEPLOYMENT_NAME": "prod", **GCP})


def test_no_dagster_cloud_variables_means_local(tmp_path: Path):
    settings = Settings.from_env({"ML_PLATFORM_DATA_DIR": str(tmp_path)})
    assert settings.deployment is Deployment.LOCAL
    assert settings.duckdb_path == tmp_path / "warehouse.duckdb"
    assert settings.pipeline_root == str(tmp_path / "pipeline_root")
    assert settings.datasets == {name: f"flights_{name}" for name in DATASETS}
    assert settings.dbt_target == "local"
    assert settings.dbt_vars["duckdb_path"] == str(tmp_path / "warehouse.duckdb")


def test_prod_names():
    settings = prod()
    assert settings.deployment is Deployment.PROD
    assert set(settings.datasets.values()) == PROD_DATASETS
    assert settings.pipeline_root == "gs://acme-ml-pipelines/pipeline_root/prod"
    assert settings.labels == {"app": "ml-platform", "deployment": "prod"}
    assert "duckdb_path" not in settings.dbt_vars
    assert settings.dbt_vars["gcp_project"] == "acme-ml"
    assert settings.dbt_vars["bigquery_location"] == "US"


def test_artifact_registry_url():
    settings = Settings.from_env(
        {
            "DAGSTER_CLOUD_DEPLOYMENT_NAME": "prod",
            "ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY": "pipeline-templates",
            "ML_PLATFORM_GCP_REGION": "europe-west4",
            **GCP,
        }
    )
    assert settings.artifact_registry_url == (
        "https://europe-west4-kfp.pkg.dev/acme-ml/pipeline-templates"
    )
    with pytest.raises(SettingsError, match="ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY"):
        _ = prod().artifact_registry_url


def test_branch_names_carry_the_pull_request():
    settings = branch("42")
    assert settings.deployment is Deployment.BRANCH
    assert settings.dataset("predictions") == "flights_predictions_pr_42"
    assert settings.pipeline_root == "gs://acme-ml-pipelines/pipeline_root/branch/pr-42"
    assert settings.labels["pull_request"] == "42"
    assert settings.labels["deployment"] == "branch"
    assert settings.dbt_vars["datasets"]["raw"] == "flights_raw_pr_42"


@pytest.mark.parametrize("pr", ["1", "42", "0", "999999"])
def test_a_branch_never_resolves_a_prod_dataset(pr: str):
    settings = branch(pr)
    for logical in DATASETS:
        assert settings.dataset(logical) not in PROD_DATASETS
    assert not set(settings.dbt_vars["datasets"].values()) & PROD_DATASETS


@pytest.mark.parametrize("pr", ["", "abc", "42; drop", "../prod", "4 2"])
def test_a_branch_without_a_valid_pull_request_id_is_refused(pr: str):
    with pytest.raises(SettingsError, match="PULL_REQUEST_ID"):
        branch(pr)


def test_the_branch_guard_holds_even_if_the_naming_rule_regresses(monkeypatch):
    # Should a later change drop the branch suffix, the guard still refuses the prod name.
    settings = branch("7")
    monkeypatch.setattr(Settings, "dataset_suffix", property(lambda self: ""))
    with pytest.raises(SettingsError, match="prod dataset"):
        settings.dataset("raw")


def test_unknown_full_deployment_is_refused():
    with pytest.raises(SettingsError, match="neither a branch deployment nor the prod"):
        Settings.from_env({"DAGSTER_CLOUD_DEPLOYMENT_NAME": "staging", **GCP})
    named = Settings.from_env(
        {"DAGSTER_CLOUD_DEPLOYMENT_NAME": "main", "ML_PLATFORM_PROD_DEPLOYMENT": "main", **GCP}
    )
    assert named.deployment is Deployment.PROD


def test_google_cloud_deployments_need_a_project_and_bucket():
    with pytest.raises(SettingsError, match="ML_PLATFORM_GCP_PROJECT, ML_PLATFORM_GCS_BUCKET"):
        Settings.from_env({"DAGSTER_CLOUD_DEPLOYMENT_NAME": "prod"})


def test_unknown_dataset_is_refused():
    with pytest.raises(SettingsError, match="unknown dataset"):
        prod().dataset("scratch")


def test_job_labels_follow_vertex_rules():
    labels = branch("42").job_labels(
        asset="flight_delay_predictions",
        partition="2013-10-01",
        run_id="8F2C1B7A-0D4E-4C55-9A3B-1E2F3A4B5C6D",
    )
    assert labels["asset"] == "flight_delay_predictions"
    assert labels["partition"] == "2013-10-01"
    assert labels["dagster_run_id"] == "8f2c1b7a-0d4e-4c55-9a3b-1e2f3a4b5c6d"
    for key, value in labels.items():
        assert key[0].isalpha() and len(key) <= 63 and len(value) <= 63
        assert set(key + value) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-")


def test_label_sanitizing():
    assert sanitize_label_value("Team: Data/ML " + "x" * 80) == ("team-data-ml-" + "x" * 50)
    assert sanitize_label_key("1team") == "k_1team"
    assert sanitize_label_key("Cost Center") == "cost_center"


def test_settings_are_the_only_reader_of_the_environment():
    package = Path(__file__).resolve().parents[2] / "ml_platform"
    readers = [
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if "os.environ" in path.read_text() or "getenv" in path.read_text()
    ]
    assert readers == ["settings.py"]


def test_a_job_started_outside_dagster_has_no_run_label():
    labels = prod().job_labels(asset="flight_delay_predictions", partition=None, run_id=None)
    assert "dagster_run_id" not in labels
    assert labels["partition"] == "none"


def test_sensor_timing_from_the_environment():
    settings = Settings.from_env(
        {"ML_PLATFORM_SENSOR_INTERVAL_SECONDS": "5", "ML_PLATFORM_SENSOR_LOOKBACK_SECONDS": "900"}
    )
    assert (settings.sensor_interval_seconds, settings.sensor_lookback_seconds) == (5, 900)
    with pytest.raises(SettingsError, match="ML_PLATFORM_SENSOR_INTERVAL_SECONDS"):
        Settings.from_env({"ML_PLATFORM_SENSOR_INTERVAL_SECONDS": "0"})


def test_alert_links_never_point_a_cloud_deployment_at_localhost():
    assert Settings.from_env({}).dagster_ui_url == "http://127.0.0.1:3000"
    assert prod().dagster_ui_url is None
    org = {"ML_PLATFORM_DAGSTER_ORG_URL": "https://acme.dagster.cloud"}
    assert branch("42", **org).dagster_ui_url == "https://acme.dagster.cloud/pr-42"
    assert "xoxb" not in repr(Settings.from_env({"ML_PLATFORM_SLACK_TOKEN": "xoxb-secret"}))


def test_google_credential_configuration_and_the_ecs_task_role():
    config = (
        '{"type": "external_account", "audience": "//iam.googleapis.com/projects/1/locations/'
        'global/workloadIdentityPools/p/providers/aws", "subject_token_type": '
        '"urn:ietf:params:aws:token-type:aws4_request"}'
    )
    settings = branch(
        ML_PLATFORM_GCP_CREDENTIAL_CONFIG=config,
        AWS_CONTAINER_CREDENTIALS_RELATIVE_URI="/v2/credentials/abc",
        AWS_CONTAINER_AUTHORIZATION_TOKEN="container-token",
        AWS_DEFAULT_REGION="eu-west-1",
    )
    assert settings.gcp_credential_info["type"] == "external_account"
    assert settings.ecs_task_role.credentials_relative_uri == "/v2/credentials/abc"
    assert settings.ecs_task_role.region == "eu-west-1"
    assert settings.ecs_task_role.serves_credentials
    assert "workloadIdentityPools" not in repr(settings)
    assert "container-token" not in repr(settings)
    assert branch().gcp_credential_config is None  # Application Default Credentials
    assert not branch().ecs_task_role.serves_credentials
    for bad in ("{oops", '{"type": "service_account"}'):
        with pytest.raises(SettingsError, match="ML_PLATFORM_GCP_CREDENTIAL_CONFIG"):
            branch(ML_PLATFORM_GCP_CREDENTIAL_CONFIG=bad)


@pytest.mark.parametrize(
    "variable", ["ECS_CONTAINER_METADATA_URI_V4", "ECS_CONTAINER_METADATA_URI"]
)
def test_an_ecs_task_without_dagster_cloud_variables_refuses_to_run_as_local(variable: str):
    # What a run task would look like if the agent ever failed to pass Dagster+'s variables.
    with pytest.raises(SettingsError, match="refusing to run as the local deployment"):
        Settings.from_env({variable: "http://169.254.170.2/v4/abc", **GCP})
    # With them, it is the deployment they name.
    ecs = {variable: "http://169.254.170.2/v4/abc", "DAGSTER_CLOUD_DEPLOYMENT_NAME": "prod"}
    assert Settings.from_env({**ecs, **GCP}).deployment is Deployment.PROD


def test_a_cloud_code_location_needs_the_pipelines_service_account_when_it_loads():
    with pytest.raises(SettingsError, match="ML_PLATFORM_VERTEX_SERVICE_ACCOUNT"):
        prod().check_code_location()
    # Commands that only publish templates or clean up do without: the settings load.
    assert prod().vertex_service_account is None
    complete = {
        "ML_PLATFORM_VERTEX_SERVICE_ACCOUNT": "vertex-pipelines@acme-ml.iam.gserviceaccount.com",
        "ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY": "pipeline-templates",
    }
    branch(**complete).check_code_location()
    Settings.from_env({}).check_code_location()  # local needs neither
