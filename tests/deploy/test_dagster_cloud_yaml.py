"""dagster_cloud.yaml and workspace.yaml, checked by dagster-cloud's and Dagster's own code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from dagster_aws.ecs.container_context import EcsContainerContext
from dagster_cloud_cli.config.loader import DagsterCloudLocationsConfigLoader

ROOT = Path(__file__).resolve().parents[2]
CI_ENV = {
    "ECR_REPOSITORY_URI": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/ml-platform",
    "CODE_LOCATION_TASK_ROLE_ARN": "arn:aws:iam::123456789012:role/ml-platform-code-location",
    "ML_PLATFORM_GCP_PROJECT": "acme-ml",
    "ML_PLATFORM_GCP_REGION": "europe-west4",
    "ML_PLATFORM_BIGQUERY_LOCATION": "EU",
    "ML_PLATFORM_GCS_BUCKET": "acme-ml-pipelines",
    "ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY": "pipeline-templates",
    "ML_PLATFORM_VERTEX_SERVICE_ACCOUNT": "vertex-pipelines@acme-ml.iam.gserviceaccount.com",
    "ML_PLATFORM_COMPONENT_IMAGE": "europe-west4-docker.pkg.dev/acme-ml/images/components@sha256:"
    + "0" * 64,
    "ML_PLATFORM_TEMPLATE_TAG": "sha-0123abc",
    "ML_PLATFORM_DAGSTER_ORG_URL": "https://acme.dagster.cloud",
    "GCP_CREDENTIAL_CONFIG_SECRET_ARN": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:"
    "ml-platform/gcp-credential-config-AbCdEf",
}


def render(monkeypatch, path: Path = ROOT / "dagster_cloud.yaml", **extra: str):
    for name, value in {**CI_ENV, **extra}.items():
        monkeypatch.setenv(name, value)
    # What `dagster-cloud ci template` does (the deploy workflow renders the file with it
    # before `ci init`): render the Jinja template, validate the models, merge defaults.
    return DagsterCloudLocationsConfigLoader.load_from_template(str(path), context={})


def test_the_location_as_dagster_cloud_reads_it(monkeypatch):
    (location,) = render(monkeypatch).locations
    assert location.location_name == "ml_platform"
    assert location.code_source.module_name == "ml_platform.definitions"
    assert (ROOT / location.build.directory / "Dockerfile").is_file()
    assert location.build.registry == CI_ENV["ECR_REPOSITORY_URI"]
    assert location.working_directory == "/app"
    assert "WORKDIR /app" in (ROOT / "Dockerfile").read_text()


def test_the_ecs_container_context_fits_dagster_aws_schema(monkeypatch):
    (location,) = render(
        monkeypatch, SLACK_TOKEN_SECRET_ARN="arn:aws:secretsmanager:x:1:secret:s"
    ).locations
    context = EcsContainerContext.create_from_config(location.container_context)
    assert context.task_role_arn == CI_ENV["CODE_LOCATION_TASK_ROLE_ARN"]
    assert {s["name"] for s in context.secrets} == {
        "ML_PLATFORM_GCP_CREDENTIAL_CONFIG",
        "ML_PLATFORM_SLACK_TOKEN",
    }
    env = dict(item.split("=", 1) for item in context.env_vars)
    assert env["ML_PLATFORM_GCP_PROJECT"] == "acme-ml"
    assert env["ML_PLATFORM_COMPONENT_IMAGE"] == CI_ENV["ML_PLATFORM_COMPONENT_IMAGE"]
    assert context.server_resources["cpu"] == "1024"
    assert context.run_resources["memory"] == "8192"


def test_without_a_slack_secret_there_is_no_empty_secret(monkeypatch):
    (location,) = render(monkeypatch).locations
    context = EcsContainerContext.create_from_config(location.container_context)
    assert [s["name"] for s in context.secrets] == ["ML_PLATFORM_GCP_CREDENTIAL_CONFIG"]
    assert all(s["valueFrom"] for s in context.secrets)


def test_every_variable_the_code_location_gets_is_one_settings_reads(monkeypatch):
    (location,) = render(monkeypatch).locations
    context = EcsContainerContext.create_from_config(location.container_context)
    names = [item.split("=", 1)[0] for item in context.env_vars]
    names += [secret["name"] for secret in context.secrets]
    read = set(
        re.findall(r'"(ML_PLATFORM_[A-Z_]+)"', (ROOT / "ml_platform/settings.py").read_text())
    )
    assert set(names) <= read, f"not read by settings.py: {set(names) - read}"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d["locations"][0].update(colour="blue"), "extra"),
        (lambda d: d["locations"][0]["code_source"].update(package_name="x"), "only one"),
        (
            lambda d: d["locations"][0]["container_context"]["ecs"].update(task_role="x"),
            "task_role",
        ),
        (lambda d: d["locations"][0]["container_context"]["ecs"].update(secrets="x"), "secrets"),
    ],
)
def test_a_broken_file_is_refused(monkeypatch, tmp_path: Path, change, problem: str):
    for name, value in CI_ENV.items():
        monkeypatch.setenv(name, value)
    rendered = render(monkeypatch)
    data = yaml.safe_load(
        yaml.safe_dump(
            {"locations": [loc.model_dump(exclude_none=True) for loc in rendered.locations]}
        )
    )
    change(data)
    broken = tmp_path / "dagster_cloud.yaml"
    broken.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match=problem):
        (location,) = render(monkeypatch, broken).locations
        EcsContainerContext.create_from_config(location.container_context)


def test_the_workspace_loads_the_code_location():
    # What `dagster dev` does with workspace.yaml: a code server process for the location.
    from dagster import instance_for_test
    from dagster._core.workspace.load import load_workspace_process_context_from_yaml_paths

    with (
        instance_for_test() as instance,
        load_workspace_process_context_from_yaml_paths(
            instance, [str(ROOT / "workspace.yaml")]
        ) as context,
    ):
        entry = context.create_request_context().get_code_location_entries()["ml_platform"]
        assert entry.load_error is None, entry.load_error
        repository = next(iter(entry.code_location.get_repositories().values()))
        keys = {node.key.to_user_string() for node in repository.asset_graph.asset_nodes}
        assert {"flight_delay_model", "flight_delay_predictions"} <= keys
