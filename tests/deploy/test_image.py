"""The Dockerfile, built and run for real with podman (no Docker daemon on these machines).

`with-containers` (from the shared tools of this workplace) prepares podman and an offline
stand-in for `python:3.11-slim`; the image installs the locked dependencies from PyPI.
The code server is started in a container and checked from the host over gRPC.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CODE_LOCATION = "localhost/ml-platform:test"
COMPONENTS = "localhost/ml-platform-components:test"


def with_containers() -> Path:
    for candidate in (
        ROOT.parent / "shared" / "tools" / "with-containers",
        Path("/work/shared/tools/with-containers"),
    ):
        if candidate.is_file():
            return candidate
    pytest.fail("with-containers (../shared/tools) is missing: podman cannot be prepared here")


def podman(*args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(with_containers()), "podman", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if check and done.returncode != 0:
        pytest.fail(
            f"podman {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


@pytest.fixture(scope="module")
def images() -> None:
    for target, tag in (("code-location", CODE_LOCATION), ("components", COMPONENTS)):
        podman("build", "--network", "host", "--target", target, "-t", tag, str(ROOT))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The prod deployment, as the agent's task for the code server gets it (dagster_cloud.yaml's
# container_context env vars; Dagster+ adds its own): the code location loads with the
# Google Cloud backends, which call nothing when they are built.
PROD = {
    "DAGSTER_CLOUD_DEPLOYMENT_NAME": "prod",
    "ML_PLATFORM_GCP_PROJECT": "acme-ml",
    "ML_PLATFORM_GCS_BUCKET": "acme-ml-pipelines",
    "ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY": "pipeline-templates",
    "ML_PLATFORM_VERTEX_SERVICE_ACCOUNT": "vertex-pipelines@acme-ml.iam.gserviceaccount.com",
}


def agent_command(port: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment dagster-cloud's ECS user code launcher gives a code server
    task (EcsUserCodeLauncher: CodeLocationDeployData.get_grpc_server_command and
    get_grpc_server_env), for this code location as dagster_cloud.yaml declares it."""
    from dagster_cloud.workspace.user_code_launcher.utils import get_grpc_server_env
    from dagster_cloud_cli.core.workspace import CodeLocationDeployData

    # dagster_cloud.yaml is a template the deploy workflow renders: read the two plain keys.
    text = (ROOT / "dagster_cloud.yaml").read_text()
    location = re.search(r"location_name: (\S+)", text)[1]
    module = re.search(r"module_name: (\S+)", text)[1]
    data = CodeLocationDeployData(image=CODE_LOCATION, module_name=module)
    env = get_grpc_server_env(data, port, location, instance_ref=None)
    return data.get_grpc_server_command(), env


@pytest.fixture(scope="module")
def code_server(images) -> Iterator[tuple[str, int]]:
    name, port = f"mlp-test-{uuid.uuid4().hex[:8]}", free_port()
    command, env = agent_command(4000)
    variables = [arg for key, value in {**env, **PROD}.items() for arg in ("-e", f"{key}={value}")]
    podman(
        "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:4000", *variables,
        CODE_LOCATION, *command,
    )  # fmt: skip
    try:
        from dagster._grpc.client import DagsterGrpcClient

        client = DagsterGrpcClient(port=port, host="127.0.0.1")
        deadline = time.monotonic() + 180
        while True:
            try:
                client.ping("ready?")
                break
            except Exception:
                if time.monotonic() > deadline:
                    logs = podman("logs", name, check=False)
                    pytest.fail(f"the code server never answered:\n{logs.stdout}{logs.stderr}")
                time.sleep(2)
        yield name, port
    finally:
        podman("rm", "-f", name, check=False)


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_code_server_serves_the_code_location_over_grpc(code_server):
    from dagster import instance_for_test
    from dagster._core.remote_origin import GrpcServerCodeLocationOrigin

    _, port = code_server
    origin = GrpcServerCodeLocationOrigin(host="127.0.0.1", port=port, location_name="ml_platform")
    with instance_for_test() as instance, origin.create_location(instance) as location:
        (repository,) = location.get_repositories().values()
        keys = {node.key.to_user_string() for node in repository.asset_graph.asset_nodes}
        assert {
            "raw/flights",
            "features/training_data",
            "flight_delay_model",
            "flight_delay_predictions",
            "reporting/daily_delay_report",
        } <= keys
        assert {"train_flight_delay_model", "score_flights", "refresh_reporting"} <= {
            job.name for job in repository.get_all_jobs()
        }


def test_the_container_is_healthy_runs_as_a_user_and_never_parsed_dbt(code_server):
    name, _ = code_server
    health = podman("exec", name, "dagster", "api", "grpc-health-check", "-p", "4000")
    assert health.returncode == 0
    assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
    # Started as the agent starts it (`dagster api grpc`), as the prod deployment, and the
    # manifest was built with the image: loading the code location parsed nothing.
    command = podman("inspect", "--format", "{{json .Config.Cmd}}", name).stdout
    assert json.loads(command)[:3] == ["dagster", "api", "grpc"]
    logs = podman("logs", name).stdout + podman("logs", name).stderr
    assert "Started Dagster code server for module ml_platform.definitions" in logs
    assert "Running with dbt" not in logs
    resolved = podman(
        "exec", name, "python", "-c",
        "from ml_platform.settings import get_settings; print(get_settings().deployment)",
    )  # fmt: skip
    assert resolved.stdout.strip() == "prod"
    manifest = podman("exec", name, "test", "-s", "/app/dbt_project/target/manifest.json")
    assert manifest.returncode == 0


def test_the_components_image_runs_kfp_components_with_the_project(images):
    code = (
        "import kfp, sklearn, ml_platform.pipelines.model as m, "
        "ml_platform.resources.warehouse.bigquery as b; print(kfp.__version__, m.TARGET)"
    )
    done = podman("run", "--rm", COMPONENTS, "python3", "-c", code)
    assert done.stdout.split() == ["2.17.0", "is_delayed"]
    # The command Vertex AI runs for a lightweight component.
    usage = podman("run", "--rm", COMPONENTS, "python3", "-m", "kfp.dsl.executor_main", "--help")
    assert "--function_to_execute" in usage.stdout
