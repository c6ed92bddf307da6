"""dagster_cloud.yaml and workspace.yaml, checked by dagster-cloud's and Dagster's own code.

Besides the location as dagster-cloud reads it: the agent queue a branch deployment's location
is rendered with (and the agents' configs that make prod and branch deployments land on
different agents), and the code server's ECS health check, checked against ECS's API model and
run against a real code server.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
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


# -- which agent serves the location ---------------------------------------------------------


def location_document(monkeypatch, tmp_path: Path, **extra: str) -> dict:
    """What `ci deploy` sends Dagster+ for the location (rendered file + image), which the
    agent validates with dagster-cloud's location schema."""
    from dagster_cloud_cli.config_utils import get_location_document

    (location,) = render(monkeypatch, **extra).locations
    rendered = tmp_path / "dagster_cloud.yaml"
    rendered.write_text(yaml.safe_dump({"locations": [location.model_dump(exclude_none=True)]}))
    return get_location_document(
        location.location_name, {"location_file": str(rendered), "image": "repo:tag"}
    )


def test_slack_channels_are_rendered_only_where_set(monkeypatch, tmp_path: Path):
    """Each GitHub environment sets its own channel variable: prod's location gets
    ML_PLATFORM_SLACK_CHANNEL, a branch deployment's ML_PLATFORM_SLACK_BRANCH_CHANNEL (Settings
    never posts a branch deployment's alerts to the prod channel), neither when unset."""
    from dagster_cloud.workspace.config_schema import validate_workspace_location

    def channels(**extra: str) -> dict[str, str]:
        for name in ("ML_PLATFORM_SLACK_CHANNEL", "ML_PLATFORM_SLACK_BRANCH_CHANNEL"):
            monkeypatch.delenv(name, raising=False)
        document = location_document(monkeypatch, tmp_path, **extra)
        assert validate_workspace_location(document) == []
        env = dict(item.split("=", 1) for item in document["container_context"]["ecs"]["env_vars"])
        return {name: value for name, value in env.items() if "SLACK" in name}

    assert channels() == {}
    assert channels(ML_PLATFORM_SLACK_CHANNEL="#ml-alerts") == {
        "ML_PLATFORM_SLACK_CHANNEL": "#ml-alerts"
    }
    assert channels(ML_PLATFORM_SLACK_BRANCH_CHANNEL="#ml-pr-alerts") == {
        "ML_PLATFORM_SLACK_BRANCH_CHANNEL": "#ml-pr-alerts"
    }


def agent_configs() -> dict[str, dict]:
    """The agents' dagster.yaml files in deploy/ecs, by file name."""
    configs = {}
    for path in sorted((ROOT / "deploy" / "ecs").glob("dagster*.yaml")):
        config = yaml.safe_load(path.read_text())
        if isinstance(config, dict) and "dagster_cloud_api" in config:
            configs[path.name] = config
    return configs


def test_prod_and_branch_deployments_have_agents_of_their_own():
    """Dagster+ hands a deployment's locations to the agents serving it: one agent serves the
    prod deployment and no branch deployment, another serves branch deployments and no full
    deployment: so a branch deployment's location can only land on the branch agent."""
    configs = agent_configs()
    serving = {
        name: (
            bool(config["dagster_cloud_api"].get("deployments"))
            or bool(config["dagster_cloud_api"].get("deployment")),
            config["dagster_cloud_api"].get("branch_deployments") is True,
        )
        for name, config in configs.items()
    }
    assert sorted(serving.values()) == [(False, True), (True, False)], serving


# -- the code server's health check ----------------------------------------------------------

# ECS's HealthCheck bounds (Amazon ECS API reference, HealthCheck).
ECS_HEALTH_CHECK_BOUNDS = {
    "interval": (5, 300),
    "timeout": (2, 60),
    "retries": (1, 10),
    "startPeriod": (0, 300),
}


def health_check(monkeypatch) -> dict:
    (location,) = render(monkeypatch).locations
    return EcsContainerContext.create_from_config(location.container_context).server_health_check


def code_server_port() -> int:
    """The port the agents serve code on: agent.yaml's DAGSTER_CLOUD_CODE_SERVER_PORT, else
    dagster-cloud's default."""
    from dagster_cloud.workspace.user_code_launcher.utils import DEFAULT_CODE_SERVER_PORT

    ports = set(
        re.findall(
            r"DAGSTER_CLOUD_CODE_SERVER_PORT,\s*Value:\s*\"?(\d+)",
            (ROOT / "deploy" / "ecs" / "agent.yaml").read_text(),
        )
    )
    assert len(ports) <= 1
    return int(ports.pop()) if ports else DEFAULT_CODE_SERVER_PORT


def test_the_code_server_has_an_ecs_health_check(monkeypatch):
    """server_health_check (dagster-aws's ECS container context, used by dagster-cloud's
    EcsUserCodeLauncher for code server task definitions) is set, fits ECS's HealthCheck, runs
    the same gRPC health check as the image's Docker HEALTHCHECK (which ECS does not run), on
    the port the agents serve code on."""
    import botocore.session
    from botocore.validate import ParamValidator
    from dagster_aws.ecs.tasks import DagsterEcsTaskDefinitionConfig

    check = health_check(monkeypatch)
    assert check, "no server_health_check"
    for key, (low, high) in ECS_HEALTH_CHECK_BOUNDS.items():
        assert low <= check[key] <= high, key
    assert check["timeout"] < check["interval"]
    command = check["command"]
    assert command[0] == "CMD" and command[1:4] == ["dagster", "api", "grpc-health-check"]
    assert int(command[command.index("-p") + 1]) == code_server_port()
    dockerfile = (ROOT / "Dockerfile").read_text()
    docker_check = re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD (\[.*\])", dockerfile)
    assert docker_check and json.loads(docker_check.group(1)) == command[1:]
    # As the launcher registers it: the code server container's healthCheck, valid for ECS's
    # RegisterTaskDefinition (botocore's service model).
    definition = DagsterEcsTaskDefinitionConfig(
        family="server_acme_prod_ml_platform",
        image="repo:tag",
        container_name="dagster",
        command=None,
        log_configuration=None,
        secrets=None,
        environment=None,
        execution_role_arn=None,
        task_role_arn=None,
        sidecars=None,
        requires_compatibilities=["FARGATE"],
        health_check=check,
    ).task_definition_dict()
    assert definition["containerDefinitions"][0]["healthCheck"] == check
    shape = (
        botocore.session.get_session()
        .get_service_model("ecs")
        .operation_model("RegisterTaskDefinition")
        .input_shape
    )
    report = ParamValidator().validate(definition, shape)
    assert not report.has_errors(), report.generate_report()


def test_the_health_check_command_tells_a_serving_code_server_from_none(
    monkeypatch, tmp_path: Path
):
    """The check's own command, against a real `dagster api grpc` of the code location (the
    server the ECS launcher starts): exit 1 while nothing serves, 0 once it serves."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = list(health_check(monkeypatch)["command"][1:])
    command[command.index("-p") + 1] = str(port)
    command[0] = str(Path(sys.executable).parent / "dagster")
    assert subprocess.run(command, capture_output=True, timeout=60, check=False).returncode == 1
    # A local deployment's code server (what render() put in the environment stays out).
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("DAGSTER_CLOUD_", "ML_PLATFORM_"))
    }
    env |= {"DAGSTER_HOME": str(tmp_path), "ML_PLATFORM_DATA_DIR": str(tmp_path / "data")}
    serve = [command[0], "api", "grpc", "-m", "ml_platform.definitions"]
    server = subprocess.Popen(
        [*serve, "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            result = subprocess.run(command, capture_output=True, timeout=60, check=False)
            if result.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
            time.sleep(1)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # still loading the code location: no handler yet
            server.kill()
            server.wait()
