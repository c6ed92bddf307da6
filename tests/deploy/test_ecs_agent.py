"""The Dagster+ ECS agent stacks (deploy/ecs/agent.yaml) and their configs (deploy/ecs/dagster.yaml
for the prod agent, deploy/ecs/dagster-branch.yaml for the branch-deployment agent).

Four kinds of check:

- cfn-lint finds nothing in the template, informational checks included.
- Each agent config is the one the template ships for its kind (AgentKind), and dagster-cloud's
  own loading path accepts it: the agent container's start command writes it,
  `DagsterInstance.from_config` builds the `DagsterCloudAgentInstance` from it and rehydrates the
  `EcsUserCodeLauncher` (both validate against their config schemas). Broken copies are refused.
  The prod agent serves the prod deployment and no branch deployment; the branch agent every
  branch deployment and no full deployment.
- Both stacks (prod and branch) are created under moto (in process), in one account as in AWS.
  moto's CloudFormation has no model for Cloud Map namespaces, Secrets Manager secrets or
  security group egress rules; its ECS task definition and service models drop most properties
  (network mode, compatibilities, CPU, roles, launch type, network configuration) and its ECR
  model drops the scan setting and lifecycle policy. For those six types the test gives moto's
  CloudFormation small models that create the resource through the public API (boto3, answered
  by moto) from the template's resolved properties, so every ARN and ID is wired as in AWS and
  the tests read back the ECS, ECR, Secrets Manager and Cloud Map view. moto's own models create
  the rest: the IAM roles with their inline policies, the log group, the security group and its
  ingress rule, the cluster. The boundary tests then compare the branch stack's roles with the
  prod stack's real ARNs: nothing of prod is granted to the branch side.
- What moto cannot hold is checked on the parsed template: the service's deployment circuit
  breaker (moto's ECS API has no deployment configuration), the cluster's capacity providers,
  the security group's inline egress (moto keeps its default allow-all), the agent's health
  check, tags.

Whether each IAM statement works (every action exists; every resource type it requires is
matched) is tests/deploy/test_iam_catalogue.py's job; parliament and cfripper run in
tests/deploy/test_iam_linters.py.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import boto3
import dagster_cloud
import pytest
import yaml
from cfnlint.api import ManualArgs, lint
from cfnlint.decode import decode_str
from dagster import DagsterInstance
from dagster._core.errors import DagsterInvalidConfigError
from dagster._serdes import serialize_value
from dagster_aws.ecs.container_context import EcsContainerContext
from dagster_cloud_cli.config.loader import DagsterCloudLocationsConfigLoader
from moto import mock_aws
from moto.cloudformation import parsing as moto_cfn_parsing

from ml_platform.settings import Deployment, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = ROOT / "deploy" / "ecs"
TEMPLATE_PATH = DEPLOY_DIR / "agent.yaml"
AGENT_CONFIG_PATHS = {
    "prod": DEPLOY_DIR / "dagster.yaml",
    "branch": DEPLOY_DIR / "dagster-branch.yaml",
}
KINDS = tuple(AGENT_CONFIG_PATHS)

REGION = "us-east-1"
ORGANIZATION = "acme"
# Not the default "prod": proves the prod name reaches ml_platform.settings.
DEPLOYMENT = "production"


@dataclass(frozen=True)
class StackSpec:
    """One stack of agent.yaml as the README deploys it (both in the same account)."""

    kind: str
    name: str
    token: str
    repository: str
    # The secrets prefix parameter is the same for both: the template derives the branch one.


SPECS = {
    "prod": StackSpec(
        "prod", "mlp-agent", "agent:acme:7f3c2b1a0e9d8c7b6a5f4e3d2c1b0a99", "ml-platform"
    ),
    "branch": StackSpec(
        "branch",
        "mlp-branch-agent",
        "agent:acme:0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e",
        "ml-platform-branch",
    ),
}
STACK = SPECS["prod"].name
TOKEN = SPECS["prod"].token
# Secrets the platform engineer creates by hand (README), by kind: the prod ones directly under
# CodeLocationSecretsPrefix, the branch ones under its branch/ folder.
HAND_MADE_SECRETS = {
    "prod": ["ml-platform/gcp-credential-config", "ml-platform/slack-token"],
    "branch": ["ml-platform/branch/gcp-credential-config", "ml-platform/branch/slack-token"],
}
# Variables of the agent container that the agent config does not refer to, and why they are set.
CONSUMED_OUTSIDE_CONFIG = {
    "DAGSTER_HOME": "where the start command writes dagster.yaml",
    "DAGSTER_AGENT_CONFIG": "dagster.yaml itself",
    "DAGSTER_CLOUD_CODE_SERVER_PORT": "read by the agent: the port code servers listen on",
}

# Fargate's CPU units and the memory (MiB) each accepts.
FARGATE_MEMORY = {
    256: {512, 1024, 2048},
    512: set(range(1024, 4097, 1024)),
    1024: set(range(2048, 8193, 1024)),
    2048: set(range(4096, 16385, 1024)),
    4096: set(range(8192, 30721, 1024)),
    8192: set(range(16384, 61441, 4096)),
    16384: set(range(32768, 122881, 8192)),
}


# -- the files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    parsed, errors = decode_str(TEMPLATE_PATH.read_text())
    assert not errors, errors
    return parsed


@pytest.fixture(scope="module")
def agent_container(template: dict[str, Any]) -> dict[str, Any]:
    properties = template["Resources"]["AgentTaskDefinition"]["Properties"]
    (container,) = properties["ContainerDefinitions"]
    return container


def agent_config(kind: str = "prod") -> dict[str, Any]:
    return yaml.safe_load(AGENT_CONFIG_PATHS[kind].read_text())


def for_kind(node: Any, kind: str) -> Any:
    """The template fragment as a stack of this AgentKind sees it: Fn::If on IsBranch / IsProd
    taken, AWS::NoValue dropped (other intrinsics are left as they are)."""
    if isinstance(node, dict):
        if set(node) == {"Fn::If"}:
            condition, if_true, if_false = node["Fn::If"]
            holds = (condition == "IsBranch") == (kind == "branch")
            assert condition in ("IsBranch", "IsProd"), condition
            return for_kind(if_true if holds else if_false, kind)
        return {key: for_kind(value, kind) for key, value in node.items()}
    if isinstance(node, list):
        return [
            item
            for item in (for_kind(value, kind) for value in node)
            if item != {"Ref": "AWS::NoValue"}
        ]
    return node


def shipped_environment(container: dict[str, Any], kind: str) -> dict[str, Any]:
    return {env["Name"]: env["Value"] for env in for_kind(container["Environment"], kind)}


def test_template_is_cfn_lint_clean():
    matches = lint(
        TEMPLATE_PATH.read_text(),
        config=ManualArgs(include_checks=["I"], regions=["us-east-1", "eu-west-1"]),
    )
    assert [str(match) for match in matches] == []


@pytest.mark.parametrize("kind", KINDS)
def test_template_ships_the_agent_config(agent_container: dict[str, Any], kind: str):
    shipped = shipped_environment(agent_container, kind)
    assert yaml.safe_load(shipped["DAGSTER_AGENT_CONFIG"]) == agent_config(kind), (
        f"{AGENT_CONFIG_PATHS[kind].name} and DAGSTER_AGENT_CONFIG in agent.yaml ({kind}) "
        "differ: copy the file (comments may be left out) into the template"
    )


def test_the_two_agent_configs_differ_only_where_they_must():
    """Everything but what makes an agent prod or branch is shared, so a fix made to one config
    cannot be forgotten in the other."""
    prod, branch = agent_config("prod"), agent_config("branch")
    assert prod["dagster_cloud_api"] == {
        "agent_token": {"env": "DAGSTER_CLOUD_AGENT_TOKEN"},
        "agent_label": "ml-platform prod",
        "deployments": [{"env": "DAGSTER_CLOUD_DEPLOYMENT"}],
        "branch_deployments": False,
    }
    assert branch["dagster_cloud_api"] == {
        "agent_token": {"env": "DAGSTER_CLOUD_AGENT_TOKEN"},
        "agent_label": "ml-platform branch deployments",
        "branch_deployments": True,
    }
    prefixes = ("server_task_definition_prefix", "run_task_definition_prefix")
    launchers = [dict(config["user_code_launcher"]["config"]) for config in (prod, branch)]
    assert [tuple(launcher.pop(key) for key in prefixes) for launcher in launchers] == [
        ("server", "dagsterrun"),
        ("branchserver", "branchrun"),
    ]
    assert launchers[0] == launchers[1]
    for config in (prod, branch):
        del config["dagster_cloud_api"]
        config["user_code_launcher"]["config"] = {}
    assert prod == branch


def referenced_variables(config_text: str) -> set[str]:
    """Variables the agent config reads: {env: NAME} sources and the bare env_vars entries the
    launcher copies from the agent's environment."""
    config = yaml.safe_load(config_text)
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if set(node) == {"env"}:
                names.add(node["env"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    names.update(
        name
        for name in config["user_code_launcher"]["config"].get("env_vars", [])
        if "=" not in name
    )
    return names


@pytest.mark.parametrize("kind", KINDS)
def test_template_sets_exactly_the_variables_the_config_reads(
    agent_container: dict[str, Any], kind: str
):
    set_by_template = set(shipped_environment(agent_container, kind)) | {
        secret["Name"] for secret in agent_container["Secrets"]
    }
    config_text = AGENT_CONFIG_PATHS[kind].read_text()
    assert referenced_variables(config_text) == set_by_template - set(CONSUMED_OUTSIDE_CONFIG)
    # Nothing for a shell to expand: the start command writes the config as it is.
    assert "$" not in shipped_environment(agent_container, kind)["DAGSTER_AGENT_CONFIG"]


def test_agent_task_size_is_a_valid_fargate_combination(template: dict[str, Any]):
    parameter = template["Parameters"]["AgentTaskSize"]
    assert parameter["Default"] in parameter["AllowedValues"]
    for size in parameter["AllowedValues"]:
        cpu, memory = (int(part) for part in size.split("/"))
        assert memory in FARGATE_MEMORY[cpu], f"AgentTaskSize: Fargate rejects {size}"


def test_code_server_and_run_sizes_come_from_the_code_location_only(
    template: dict[str, Any], monkeypatch: pytest.MonkeyPatch
):
    """Issue 11: CodeServerTaskSize / RunTaskSize had no effect, because the launcher merges the
    location's container context over its own config key by key (dagster-aws's
    EcsContainerContext.merge, which EcsUserCodeLauncher uses for code servers and runs) and
    dagster_cloud.yaml sets cpu and memory for both. The stack no longer pretends to size them:
    the agent configs set no sizes, and the location's are the ones that apply."""
    assert not {"CodeServerTaskSize", "RunTaskSize"} & set(template["Parameters"])
    for kind in KINDS:
        launcher = agent_config(kind)["user_code_launcher"]["config"]
        assert "server_resources" not in launcher and "run_resources" not in launcher
    # The merge the launcher does, with the location's context as dagster-cloud renders it.
    monkeypatch.setenv("ECR_REPOSITORY_URI", "123456789012.dkr.ecr.us-east-1.amazonaws.com/x")
    (location,) = DagsterCloudLocationsConfigLoader.load_from_template(
        str(ROOT / "dagster_cloud.yaml"), context={}
    ).locations
    ecs = location.container_context["ecs"]
    merged = EcsContainerContext(server_resources={}, run_resources={}).merge(
        EcsContainerContext.create_from_config(location.container_context)
    )
    for key in ("server_resources", "run_resources"):
        assert {"cpu", "memory"} <= set(ecs[key]), f"dagster_cloud.yaml must size {key}"
        assert {k: getattr(merged, key)[k] for k in ("cpu", "memory")} == {
            k: ecs[key][k] for k in ("cpu", "memory")
        }


def test_agent_image_follows_the_locked_dagster_cloud(template: dict[str, Any]):
    image = template["Parameters"]["AgentImage"]["Default"]
    repository, tag = image.rsplit(":", 1)
    assert repository == "docker.io/dagster/dagster-cloud-agent"
    # The agent and the code location image (uv.lock) stay on the same minor release.
    assert tag.split(".")[:2] == dagster_cloud.__version__.split(".")[:2]


# The first reconcile of a new agent (a Fargate code server per location: image pull, start,
# definitions loading) takes 3 to 15 minutes (issue 11).
FIRST_RECONCILE_SECONDS = 15 * 60


def test_health_check_waits_for_the_first_reconcile(agent_container: dict[str, Any]):
    check = agent_container["HealthCheck"]
    # ECS's limits for each field (ContainerDefinition.HealthCheck).
    assert 5 <= check["Interval"] <= 300
    assert 2 <= check["Timeout"] <= 120 and check["Timeout"] < check["Interval"]
    assert 1 <= check["Retries"] <= 10
    assert 0 <= check["StartPeriod"] <= 300
    # Failures during the start period do not count; after it, Retries consecutive failures,
    # Interval apart, mark the container unhealthy. The earliest that can happen:
    earliest_unhealthy = check["StartPeriod"] + check["Retries"] * check["Interval"]
    assert earliest_unhealthy >= FIRST_RECONCILE_SECONDS
    # ... while a stuck agent is still found within 20 minutes.
    assert earliest_unhealthy + check["Interval"] <= 20 * 60


def test_what_moto_cannot_hold(template: dict[str, Any], agent_container: dict[str, Any]):
    resources = template["Resources"]
    assert template["Parameters"]["AgentToken"]["NoEcho"] is True
    # A stack is prod or branch by choice, never by default.
    assert "Default" not in template["Parameters"]["AgentKind"]
    assert template["Parameters"]["AgentKind"]["AllowedValues"] == ["prod", "branch"]
    service = resources["AgentService"]["Properties"]
    assert service["DeploymentConfiguration"]["DeploymentCircuitBreaker"] == {
        "Enable": True,
        "Rollback": True,
    }
    # The old agent stops only after the new one is healthy.
    assert service["DeploymentConfiguration"]["MinimumHealthyPercent"] == 100
    cluster = resources["Cluster"]["Properties"]
    assert cluster["CapacityProviders"] == ["FARGATE"]
    # Egress: HTTPS anywhere (inline, replacing the default allow-all) and gRPC inside the group.
    group = resources["TaskSecurityGroup"]["Properties"]
    assert [
        (r["IpProtocol"], r["FromPort"], r["ToPort"], r["CidrIp"])
        for r in group["SecurityGroupEgress"]
    ] == [("tcp", 443, 443, "0.0.0.0/0")]
    # The health check waits for the readiness sentinel, which requires_healthcheck enables.
    assert "finished_initial_reconciliation_sentinel" in " ".join(
        agent_container["HealthCheck"]["Command"]
    )
    for kind in KINDS:
        assert agent_config(kind)["user_code_launcher"]["config"]["requires_healthcheck"] is True
    # Every resource that takes tags is tagged with the project and the agent's kind.
    for name, resource in resources.items():
        if resource["Type"] in ("AWS::EC2::SecurityGroupIngress", "AWS::EC2::SecurityGroupEgress"):
            continue  # rules have no tags
        tags = {tag["Key"]: tag["Value"] for tag in resource["Properties"]["Tags"]}
        assert tags["Project"] == "ml-platform", name
        assert tags["AgentKind"] == {"Ref": "AgentKind"}, name


# -- moto: the stack ----------------------------------------------------------------------------


def camel(node: Any, *, keep_keys: bool = False) -> Any:
    """CloudFormation's PascalCase properties as the ECS API's camelCase parameters (the keys of
    a log driver's Options are the driver's own and stay as they are)."""
    if isinstance(node, dict):
        return {
            (key if keep_keys else key[0].lower() + key[1:]): camel(
                value, keep_keys=key == "Options"
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [camel(value) for value in node]
    return node


def drop_no_value(node: Any) -> Any:
    """moto resolves AWS::NoValue to None; CloudFormation removes the property or list item."""
    if isinstance(node, dict):
        return {key: drop_no_value(value) for key, value in node.items() if value is not None}
    if isinstance(node, list):
        return [drop_no_value(value) for value in node if value is not None]
    return node


class ApiBackedModel:
    """A CloudFormation resource type, created through boto3 from its resolved properties."""

    TYPE: ClassVar[str]
    ATTRIBUTES: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, physical_id: str, attributes: dict[str, str] | None = None):
        self.physical_resource_id = physical_id
        self.attributes = attributes or {}

    @classmethod
    def cloudformation_type(cls) -> str:
        return cls.TYPE

    @classmethod
    def has_cfn_attr(cls, attr: str) -> bool:
        return attr in cls.ATTRIBUTES

    def get_cfn_attribute(self, attr: str) -> str:
        return self.attributes[attr]

    def is_created(self) -> bool:
        return True

    @classmethod
    def create_from_cloudformation_json(
        cls, resource_name: str, cloudformation_json: dict, account_id: str, region_name: str, **_
    ) -> ApiBackedModel:
        return cls.create(drop_no_value(cloudformation_json.get("Properties", {})))

    @classmethod
    def create(cls, properties: dict[str, Any]) -> ApiBackedModel:
        raise NotImplementedError


class PrivateDnsNamespace(ApiBackedModel):
    TYPE = "AWS::ServiceDiscovery::PrivateDnsNamespace"
    ATTRIBUTES = frozenset({"Id", "Arn", "HostedZoneId"})

    @classmethod
    def create(cls, properties: dict[str, Any]) -> ApiBackedModel:
        client = boto3.client("servicediscovery", region_name=REGION)
        operation = client.create_private_dns_namespace(
            Name=properties["Name"],
            Vpc=properties["Vpc"],
            Description=properties["Description"],
            Tags=properties["Tags"],
        )["OperationId"]
        namespace_id = client.get_operation(OperationId=operation)["Operation"]["Targets"][
            "NAMESPACE"
        ]
        namespace = client.get_namespace(Id=namespace_id)["Namespace"]
        return cls(
            namespace_id,
            {
                "Id": namespace_id,
                "Arn": namespace["Arn"],
                "HostedZoneId": namespace["Properties"]["DnsProperties"]["HostedZoneId"],
            },
        )


class Secret(ApiBackedModel):
    TYPE = "AWS::SecretsManager::Secret"

    @classmethod
    def create(cls, properties: dict[str, Any]) -> ApiBackedModel:
        client = boto3.client("secretsmanager", region_name=REGION)
        return cls(client.create_secret(**properties)["ARN"])  # Ref: the ARN


class SecurityGroupEgress(ApiBackedModel):
    TYPE = "AWS::EC2::SecurityGroupEgress"

    @classmethod
    def create(cls, properties: dict[str, Any]) -> ApiBackedModel:
        client = boto3.client("ec2", region_name=REGION)
        response = client.authorize_security_group_egress(
            GroupId=properties["GroupId"],
            IpPermissions=[
                {
                    "IpProtocol": properties["IpProtocol"],
                    "FromPort": properties["FromPort"],
                    "ToPort": properties["ToPort"],
                    "UserIdGroupPairs": [
                        {
                            "GroupId": properties["DestinationSecurityGroupId"],
                            "Description": properties["Description"],
                        }
                    ],
                }
            ],
        )
        return cls(response["SecurityGroupRules"][0]["SecurityGroupRuleId"])


class TaskDefinition(ApiBackedModel):
    TYPE = "AWS::ECS::TaskDefinition"
    ATTRIBUTES = frozenset({"TaskDefinitionArn"})

    @classmethod
    def create(cls, properties: dict[str, Any]) -> ApiBackedModel:
        client = boto3.client("ecs", region_name=REGION)
        arn = client.register_task_definition(**camel(properties))["taskDefinition"][
            "taskDefinitionArn"
        ]
        return cls(arn, {"TaskDefinitionArn": arn})  # Ref: the ARN


class EcsService(ApiBackedModel):
    TYPE = "AWS::ECS::Service"
    ATTRIBUTES = frozenset({"Name", "ServiceArn"})

    @classmethod
    def create(cls, properties: dict[str, Any]) -> ApiBackedModel:
        client = boto3.client("ecs", region_name=REGION)
        service = client.create_service(**camel(properties))["service"]
        return cls(service["serviceArn"], {"Name": service["serviceName"]})


class EcrRepository(ApiBackedModel):
    TYPE = "AWS::ECR::Repository"
    ATTRIBUTES = frozenset({"Arn", "RepositoryUri"})

    @classmethod
    def create(cls, properties: dict[str, Any]) -> ApiBackedModel:
        client = boto3.client("ecr", region_name=REGION)
        properties = dict(properties)
        lifecycle = properties.pop("LifecyclePolicy")
        tags = properties.pop("Tags")  # ECR's API spells tags as CloudFormation does
        repository = client.create_repository(**camel(properties), tags=tags)["repository"]
        client.put_lifecycle_policy(
            repositoryName=repository["repositoryName"],
            lifecyclePolicyText=lifecycle["LifecyclePolicyText"],
        )
        return cls(
            repository["repositoryName"],
            {"Arn": repository["repositoryArn"], "RepositoryUri": repository["repositoryUri"]},
        )


API_BACKED_MODELS = {
    model.TYPE: model
    for model in (
        PrivateDnsNamespace,
        Secret,
        SecurityGroupEgress,
        TaskDefinition,
        EcsService,
        EcrRepository,
    )
}


@dataclass
class Stack:
    spec: StackSpec
    outputs: dict[str, str]
    subnets: list[str]
    vpc_id: str
    # Name -> ARN of the secrets made by hand for this kind (HAND_MADE_SECRETS).
    hand_made_secrets: dict[str, str]

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def task_role_arn(self) -> str:
        """The code location task role (its output is named after the kind)."""
        prefix = "Branch" if self.kind == "branch" else ""
        return self.outputs[f"{prefix}CodeLocationTaskRoleArn"]

    @property
    def task_role_name(self) -> str:
        prefix = "Branch" if self.kind == "branch" else ""
        return self.outputs[f"{prefix}CodeLocationTaskRoleName"]

    @property
    def repository_uri(self) -> str:
        prefix = "Branch" if self.kind == "branch" else ""
        return self.outputs[f"{prefix}CodeLocationRepositoryUri"]

    def client(self, service: str) -> Any:
        return boto3.client(service, region_name=REGION)

    def role_statements(self, role_arn: str) -> list[dict[str, Any]]:
        """Every statement of a role's policies, Action and Resource always lists."""
        iam = self.client("iam")
        name = role_arn.rsplit("/", 1)[1]
        assert iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"] == []
        statements = []
        for policy in iam.list_role_policies(RoleName=name)["PolicyNames"]:
            document = iam.get_role_policy(RoleName=name, PolicyName=policy)["PolicyDocument"]
            if isinstance(document, str):
                # moto keeps a policy given as a mapping (CloudFormation's Policies) as repr().
                document = ast.literal_eval(document)
            for statement in document["Statement"]:
                statements.append(
                    {
                        **statement,
                        "Action": as_list(statement["Action"]),
                        "Resource": as_list(statement["Resource"]),
                    }
                )
        return statements

    def agent_task_definition(self) -> dict[str, Any]:
        ecs = self.client("ecs")
        service = ecs.describe_services(
            cluster=self.outputs["ClusterName"], services=[self.outputs["AgentServiceName"]]
        )["services"][0]
        return ecs.describe_task_definition(taskDefinition=service["taskDefinition"])[
            "taskDefinition"
        ]

    def role_arns(self) -> list[str]:
        """The stack's three roles: execution, agent task and code location task role."""
        return [
            self.outputs["ExecutionRoleArn"],
            self.agent_task_definition()["taskRoleArn"],
            self.task_role_arn,
        ]


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


@pytest.fixture(scope="module")
def stacks() -> Iterator[dict[str, Stack]]:
    """Both stacks in one mocked account, as the README deploys them. Each gets a VPC of its
    own here because moto allows one Cloud Map namespace per VPC (AWS allows several whose names
    do not overlap, so the README's single VPC works there)."""
    original = moto_cfn_parsing.get_model_map
    with pytest.MonkeyPatch.context() as patch, mock_aws():
        patch.setattr(
            moto_cfn_parsing, "get_model_map", lambda: {**original(), **API_BACKED_MODELS}
        )
        ec2 = boto3.client("ec2", region_name=REGION)
        cloudformation = boto3.client("cloudformation", region_name=REGION)
        secretsmanager = boto3.client("secretsmanager", region_name=REGION)
        created = {}
        for number, (kind, spec) in enumerate(SPECS.items()):
            vpc_id = ec2.create_vpc(CidrBlock=f"10.{20 + number}.0.0/16")["Vpc"]["VpcId"]
            subnets = [
                ec2.create_subnet(
                    VpcId=vpc_id,
                    CidrBlock=f"10.{20 + number}.{third}.0/24",
                    AvailabilityZone=f"{REGION}{zone}",
                )["Subnet"]["SubnetId"]
                for third, zone in ((0, "a"), (1, "b"))
            ]
            parameters = {
                "AgentKind": kind,
                "DagsterOrganization": ORGANIZATION,
                "DagsterDeployment": DEPLOYMENT,
                "AgentToken": spec.token,
                "VpcId": vpc_id,
                "SubnetA": subnets[0],
                "SubnetB": subnets[1],
                "CodeLocationRepositoryName": spec.repository,
            }
            cloudformation.create_stack(
                StackName=spec.name,
                TemplateBody=TEMPLATE_PATH.read_text(),
                Parameters=[
                    {"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()
                ],
                Capabilities=["CAPABILITY_IAM"],
            )
            (description,) = cloudformation.describe_stacks(StackName=spec.name)["Stacks"]
            assert description["StackStatus"] == "CREATE_COMPLETE", description
            outputs = {o["OutputKey"]: o["OutputValue"] for o in description["Outputs"]}
            hand_made = {
                name: secretsmanager.create_secret(Name=name, SecretString="{}")["ARN"]
                for name in HAND_MADE_SECRETS[kind]
            }
            created[kind] = Stack(spec, outputs, subnets, vpc_id, hand_made)
        yield created


@pytest.fixture(scope="module")
def stack(stacks: dict[str, Stack]) -> Stack:
    return stacks["prod"]


@pytest.fixture(scope="module")
def branch_stack(stacks: dict[str, Stack]) -> Stack:
    return stacks["branch"]


@pytest.fixture(params=KINDS)
def each_stack(request: pytest.FixtureRequest, stacks: dict[str, Stack]) -> Stack:
    return stacks[request.param]


def test_every_resource_is_created(each_stack: Stack, template: dict[str, Any]):
    resources = each_stack.client("cloudformation").describe_stack_resources(
        StackName=each_stack.spec.name
    )["StackResources"]
    # A type moto's CloudFormation cannot create would be missing here (it skips them).
    assert {r["LogicalResourceId"] for r in resources} == set(template["Resources"])
    holds = {"IsBranch": each_stack.kind == "branch", "IsProd": each_stack.kind == "prod"}
    assert set(each_stack.outputs) == {
        name
        for name, output in template["Outputs"].items()
        if holds.get(output.get("Condition"), True)
    }
    assert each_stack.outputs["AgentKind"] == each_stack.kind


def test_cluster(each_stack: Stack):
    (cluster,) = each_stack.client("ecs").describe_clusters(
        clusters=[each_stack.outputs["ClusterName"]]
    )["clusters"]
    assert cluster["status"] == "ACTIVE"
    assert cluster["clusterName"] == each_stack.spec.name


def test_agent_task_definition_is_fargate_awsvpc(each_stack: Stack, template: dict[str, Any]):
    definition = each_stack.agent_task_definition()
    assert definition["requiresCompatibilities"] == ["FARGATE"]
    assert definition["networkMode"] == "awsvpc"
    assert (definition["cpu"], definition["memory"]) == ("512", "1024")
    assert definition["executionRoleArn"] == each_stack.outputs["ExecutionRoleArn"]
    # The agent runs as its own role, not as the code location's.
    assert definition["taskRoleArn"] not in (
        each_stack.outputs["ExecutionRoleArn"],
        each_stack.task_role_arn,
    )
    (container,) = definition["containerDefinitions"]
    assert container["image"] == template["Parameters"]["AgentImage"]["Default"]
    assert (
        container["logConfiguration"]["options"]["awslogs-group"]
        == each_stack.outputs["LogGroupName"]
    )


def test_agent_reads_the_token_from_secrets_manager_only(each_stack: Stack):
    definition = each_stack.agent_task_definition()
    (container,) = definition["containerDefinitions"]
    secret_arn = each_stack.outputs["AgentTokenSecretArn"]
    assert container["secrets"] == [{"name": "DAGSTER_CLOUD_AGENT_TOKEN", "valueFrom": secret_arn}]
    secrets = each_stack.client("secretsmanager")
    assert secrets.get_secret_value(SecretId=secret_arn)["SecretString"] == each_stack.spec.token
    environment = {env["name"]: env["value"] for env in container["environment"]}
    assert "DAGSTER_CLOUD_AGENT_TOKEN" not in environment
    # Nowhere in the task definition (or in what code servers inherit from it).
    assert each_stack.spec.token not in json.dumps(definition)
    assert environment["DAGSTER_CLOUD_AGENT_TOKEN_SECRET_ARN"] == secret_arn


def test_each_agent_has_its_own_token(stacks: dict[str, Stack]):
    prod, branch = stacks["prod"], stacks["branch"]
    assert prod.outputs["AgentTokenSecretArn"] != branch.outputs["AgentTokenSecretArn"]
    for stack in (prod, branch):
        (container,) = stack.agent_task_definition()["containerDefinitions"]
        assert [s["valueFrom"] for s in container["secrets"]] == [
            stack.outputs["AgentTokenSecretArn"]
        ]


def test_execution_role_reads_the_token_and_the_code_location_secrets_only(each_stack: Stack):
    statements = each_stack.role_statements(each_stack.outputs["ExecutionRoleArn"])
    secret_statements = [
        s for s in statements if any(a.startswith(("secretsmanager:", "*")) for a in s["Action"])
    ]
    assert len(secret_statements) == 1
    (statement,) = secret_statements
    assert statement["Action"] == ["secretsmanager:GetSecretValue"]
    account = each_stack.outputs["ExecutionRoleArn"].split(":")[4]
    folder = "ml-platform/branch/" if each_stack.kind == "branch" else "ml-platform/"
    assert sorted(statement["Resource"]) == sorted(
        [
            each_stack.outputs["AgentTokenSecretArn"],
            f"arn:aws:secretsmanager:{REGION}:{account}:secret:{folder}*",
        ]
    )
    assert each_stack.outputs["CodeLocationSecretsArnPattern"] in statement["Resource"]
    # The secrets made for this kind are readable.
    for arn in each_stack.hand_made_secrets.values():
        assert any(fnmatch.fnmatchcase(arn, pattern) for pattern in statement["Resource"]), arn
    # Image pulls from this stack's code location repository only (the agent image is public).
    repository_arn = each_stack.client("ecr").describe_repositories(
        repositoryNames=[each_stack.spec.repository]
    )["repositories"][0]["repositoryArn"]
    for s in statements:
        if s["Resource"] == ["*"]:
            assert s["Action"] == ["ecr:GetAuthorizationToken"]
        elif any(a.startswith("ecr:") for a in s["Action"]):
            assert s["Resource"] == [repository_arn]


# Actions that IAM cannot scope to a resource (the ECS list actions are scoped by condition;
# each "*" is explained next to it in agent.yaml, and test_iam_catalogue.py checks the
# catalogue's view of each).
UNSCOPED_AGENT_ACTIONS = {
    "ecs:DescribeTaskDefinition",
    "ecs:ListAccountSettings",
    "ecs:RegisterTaskDefinition",
    "ecs:ListServices",
    "ecs:ListTasks",
    "servicediscovery:GetOperation",
    "servicediscovery:ListInstances",
    "servicediscovery:ListServices",
    "servicediscovery:ListTagsForResource",
    "servicediscovery:TagResource",
    "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeRouteTables",
    "tag:GetResources",
}


def test_agent_role_is_least_privilege(each_stack: Stack):
    stack = each_stack
    role_arn = stack.agent_task_definition()["taskRoleArn"]
    statements = stack.role_statements(role_arn)
    actions = [action for s in statements for action in s["Action"]]
    assert all(s["Effect"] == "Allow" for s in statements)
    assert not [a for a in actions if a == "*" or a.endswith(":*")]
    # Explicit dagster.yaml secrets need no Secrets Manager call by the agent.
    assert not [a for a in actions if a.startswith("secretsmanager:")]
    for s in statements:
        if s["Resource"] == ["*"]:
            assert set(s["Action"]) <= UNSCOPED_AGENT_ACTIONS, s
    # PassRole: only the two roles code servers and runs get, only to ECS tasks.
    (pass_role,) = [s for s in statements if "iam:PassRole" in s["Action"]]
    assert pass_role["Action"] == ["iam:PassRole"]
    assert sorted(pass_role["Resource"]) == sorted(
        [stack.outputs["ExecutionRoleArn"], stack.task_role_arn]
    )
    assert pass_role["Condition"] == {
        "StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}
    }
    # Services, tasks and runs only in this cluster; runs only of this kind's run families.
    cluster = stack.outputs["ClusterName"]
    for s in statements:
        for action in s["Action"]:
            if action in {"ecs:CreateService", "ecs:UpdateService", "ecs:DeleteService"}:
                assert s["Resource"] == [
                    f"arn:aws:ecs:{REGION}:{role_arn.split(':')[4]}:service/{cluster}/*"
                ]
    (run_task,) = [s for s in statements if "ecs:RunTask" in s["Action"]]
    run_prefix = agent_config(stack.kind)["user_code_launcher"]["config"][
        "run_task_definition_prefix"
    ]
    (family_pattern,) = run_task["Resource"]
    assert family_pattern.endswith(f":task-definition/{run_prefix}_{ORGANIZATION}_*")
    assert "ecs:cluster" in run_task["Condition"]["ArnEquals"]
    # Cloud Map: create services in the stack's namespace only. CreateService is authorized
    # against the namespace and the new service (issue 11): both are listed, and no other
    # namespace is.
    namespace_arn = stack.client("servicediscovery").get_namespace(
        Id=stack.outputs["ServiceDiscoveryNamespaceId"]
    )["Namespace"]["Arn"]
    (create,) = [s for s in statements if "servicediscovery:CreateService" in s["Action"]]
    account = role_arn.split(":")[4]
    assert sorted(create["Resource"]) == sorted(
        [namespace_arn, f"arn:aws:servicediscovery:{REGION}:{account}:service/*"]
    )
    namespaces = [
        r
        for s in statements
        for r in s["Resource"]
        if ":servicediscovery:" in r and "namespace/" in r
    ]
    assert set(namespaces) == {namespace_arn}
    # Deregistering an instance also deletes its Route 53 health check (issue 11).
    (health_checks,) = [s for s in statements if "route53:DeleteHealthCheck" in s["Action"]]
    assert sorted(health_checks["Action"]) == [
        "route53:DeleteHealthCheck",
        "route53:GetHealthCheck",
        "route53:UpdateHealthCheck",
    ]
    assert health_checks["Resource"] == ["arn:aws:route53:::healthcheck/*"]


def test_code_location_role_has_no_aws_permissions(each_stack: Stack):
    role_arn = each_stack.task_role_arn
    assert each_stack.role_statements(role_arn) == []
    name = each_stack.task_role_name
    assert role_arn.endswith(f"/{name}")
    role = each_stack.client("iam").get_role(RoleName=name)["Role"]
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}
    assert "aws:SourceAccount" in trust["Condition"]["StringEquals"]


def test_log_group_retention(each_stack: Stack):
    (group,) = each_stack.client("logs").describe_log_groups(
        logGroupNamePrefix=each_stack.outputs["LogGroupName"]
    )["logGroups"]
    assert int(group["retentionInDays"]) == 30


def test_agent_service(each_stack: Stack):
    ecs = each_stack.client("ecs")
    (service,) = ecs.describe_services(
        cluster=each_stack.outputs["ClusterName"],
        services=[each_stack.outputs["AgentServiceName"]],
    )["services"]
    assert service["desiredCount"] == 1
    assert service["launchType"] == "FARGATE"
    assert service["networkConfiguration"]["awsvpcConfiguration"] == {
        "subnets": each_stack.subnets,
        "securityGroups": [each_stack.outputs["SecurityGroupId"]],
        "assignPublicIp": "DISABLED",
    }


def test_code_location_repository(each_stack: Stack):
    ecr = each_stack.client("ecr")
    name = each_stack.spec.repository
    (repository,) = ecr.describe_repositories(repositoryNames=[name])["repositories"]
    assert repository["imageScanningConfiguration"] == {"scanOnPush": True}
    assert repository["imageTagMutability"] == "IMMUTABLE"
    assert each_stack.repository_uri == repository["repositoryUri"]
    rules = json.loads(ecr.get_lifecycle_policy(repositoryName=name)["lifecyclePolicyText"])
    keep = [r for r in rules["rules"] if r["selection"]["countType"] == "imageCountMoreThan"]
    assert [r["selection"]["countNumber"] for r in keep] == [10, 100]
    # The images deployed from main are selected first, so the catch-all count (the last
    # rule, lowest priority) can never expire what prod runs.
    main, catch_all = sorted(keep, key=lambda r: r["rulePriority"])
    assert main["selection"]["tagPrefixList"] == ["main-"]
    assert main["selection"]["tagStatus"] == "tagged"
    assert max(rules["rules"], key=lambda r: r["rulePriority"]) == catch_all
    assert catch_all["selection"]["tagStatus"] == "any"
    deploy = (ROOT / ".github" / "workflows" / "deploy.yml").read_text()
    assert re.search(r"IMAGE_TAG=main-\$\{HEAD_SHA\}", deploy)


def test_security_group_lets_the_agent_reach_code_servers(each_stack: Stack):
    group_id = each_stack.outputs["SecurityGroupId"]
    (group,) = each_stack.client("ec2").describe_security_groups(GroupIds=[group_id])[
        "SecurityGroups"
    ]
    assert group["VpcId"] == each_stack.vpc_id
    # The port the agent tells code servers to listen on.
    (container,) = each_stack.agent_task_definition()["containerDefinitions"]
    environment = {env["name"]: env["value"] for env in container["environment"]}
    port = int(environment["DAGSTER_CLOUD_CODE_SERVER_PORT"])

    def grpc_within_group(rules: list[dict[str, Any]]) -> bool:
        return any(
            (rule["IpProtocol"], rule.get("FromPort"), rule.get("ToPort")) == ("tcp", port, port)
            and [pair["GroupId"] for pair in rule["UserIdGroupPairs"]] == [group_id]
            for rule in rules
        )

    assert grpc_within_group(group["IpPermissions"])
    assert grpc_within_group(group["IpPermissionsEgress"])
    # No other way in.
    assert len(group["IpPermissions"]) == 1


def test_service_discovery_namespace(each_stack: Stack):
    namespace = each_stack.client("servicediscovery").get_namespace(
        Id=each_stack.outputs["ServiceDiscoveryNamespaceId"]
    )["Namespace"]
    assert namespace["Type"] == "DNS_PRIVATE"
    assert namespace["Name"] == each_stack.outputs["ServiceDiscoveryNamespaceName"]


# -- the boundary: nothing of prod on the branch side -----------------------------------------


def prod_arns(prod: Stack) -> dict[str, str]:
    """Concrete ARNs of what belongs to prod (secrets, roles, image repository, cluster,
    log group, Cloud Map namespace), for matching against the branch side's grants."""
    ecs = prod.client("ecs")
    cluster = prod.outputs["ClusterName"]
    account = prod.outputs["ExecutionRoleArn"].split(":")[4]
    (group,) = prod.client("logs").describe_log_groups(
        logGroupNamePrefix=prod.outputs["LogGroupName"]
    )["logGroups"]
    agent_service = ecs.describe_services(
        cluster=cluster, services=[prod.outputs["AgentServiceName"]]
    )["services"][0]
    return {
        "agent token secret": prod.outputs["AgentTokenSecretArn"],
        **{f"secret {name}": arn for name, arn in prod.hand_made_secrets.items()},
        **{f"role {arn.rsplit('/', 1)[1]}": arn for arn in prod.role_arns()},
        "image repository": prod.client("ecr").describe_repositories(
            repositoryNames=[prod.spec.repository]
        )["repositories"][0]["repositoryArn"],
        "cluster": f"arn:aws:ecs:{REGION}:{account}:cluster/{cluster}",
        "agent service": agent_service["serviceArn"],
        "a code server service": f"arn:aws:ecs:{REGION}:{account}:service/{cluster}/server-x",
        "a run task": f"arn:aws:ecs:{REGION}:{account}:task/{cluster}/0123456789abcdef",
        "a run task definition": f"arn:aws:ecs:{REGION}:{account}:task-definition/"
        f"dagsterrun_{ORGANIZATION}_{DEPLOYMENT}_0a1b2c3d_0a1b2c3d_0a1b2c3d:1",
        "log stream": f"{group['arn'].removesuffix(':*')}:log-stream:agent/x",
        "Cloud Map namespace": prod.client("servicediscovery").get_namespace(
            Id=prod.outputs["ServiceDiscoveryNamespaceId"]
        )["Namespace"]["Arn"],
    }


# The branch agent's grants that are account-wide by necessity, and why none reaches prod code:
# the agent runs Dagster's agent image, never a pull request's code (that runs as the branch code
# location task role, which has no AWS permissions at all).
ACCOUNT_WIDE_BRANCH_GRANTS = {
    # Cloud Map service ARNs do not name their namespace.
    "servicediscovery:DeleteService",
    "servicediscovery:DeregisterInstance",
    "servicediscovery:CreateService",  # the new service's side; the namespace side is its own
    # Route 53 health check ARNs name nothing of Cloud Map.
    "route53:DeleteHealthCheck",
    "route53:GetHealthCheck",
    "route53:UpdateHealthCheck",
}


def test_branch_roles_grant_nothing_of_prod(stacks: dict[str, Stack]):
    prod, branch = stacks["prod"], stacks["branch"]
    targets = prod_arns(prod)
    for role_arn in branch.role_arns():
        for statement in branch.role_statements(role_arn):
            assert statement["Effect"] == "Allow"
            for action in statement["Action"]:
                for resource in statement["Resource"]:
                    if resource == "*" or action in ACCOUNT_WIDE_BRANCH_GRANTS:
                        continue  # checked below / explained above
                    reached = [
                        what for what, arn in targets.items() if fnmatch.fnmatchcase(arn, resource)
                    ]
                    assert not reached, (role_arn, action, resource, reached)
    # The code location task role of branch deployments: no AWS permissions at all, and not
    # prod's role.
    assert branch.role_statements(branch.task_role_arn) == []
    assert branch.task_role_arn != prod.task_role_arn
    # "*" grants of the branch side are only the actions IAM cannot scope.
    for role_arn in branch.role_arns():
        for statement in branch.role_statements(role_arn):
            if "*" in statement["Resource"]:
                assert set(statement["Action"]) <= UNSCOPED_AGENT_ACTIONS | {
                    "ecr:GetAuthorizationToken"
                }, statement


def test_prod_secrets_are_not_readable_by_the_branch_side(stacks: dict[str, Stack]):
    """The prod credential config (and every other prod secret) matches no secret grant of any
    branch role; the branch's own ones do."""
    prod, branch = stacks["prod"], stacks["branch"]
    patterns = [
        resource
        for role_arn in branch.role_arns()
        for statement in branch.role_statements(role_arn)
        if any(a.startswith("secretsmanager:") for a in statement["Action"])
        for resource in statement["Resource"]
    ]
    assert patterns and "*" not in patterns
    prod_secrets = [prod.outputs["AgentTokenSecretArn"], *prod.hand_made_secrets.values()]
    for arn in prod_secrets:
        assert not [p for p in patterns if fnmatch.fnmatchcase(arn, p)], arn
    for arn in [branch.outputs["AgentTokenSecretArn"], *branch.hand_made_secrets.values()]:
        assert [p for p in patterns if fnmatch.fnmatchcase(arn, p)], arn


def test_the_agents_cannot_pass_each_others_roles(stacks: dict[str, Stack]):
    for stack, other in ((stacks["prod"], stacks["branch"]), (stacks["branch"], stacks["prod"])):
        role_arn = stack.agent_task_definition()["taskRoleArn"]
        passable = [
            resource
            for statement in stack.role_statements(role_arn)
            if "iam:PassRole" in statement["Action"]
            for resource in statement["Resource"]
        ]
        for arn in other.role_arns():
            assert not [p for p in passable if fnmatch.fnmatchcase(arn, p)], (stack.kind, arn)


def test_the_two_stacks_share_no_network_or_cluster(stacks: dict[str, Stack]):
    prod, branch = stacks["prod"], stacks["branch"]
    for output in (
        "ClusterName",
        "SecurityGroupId",
        "ServiceDiscoveryNamespaceId",
        "LogGroupName",
        "ExecutionRoleArn",
    ):
        assert prod.outputs[output] != branch.outputs[output], output
    assert prod.repository_uri != branch.repository_uri
    # Code servers are reachable from their own group only: a branch task cannot open a
    # connection to a prod code server.
    ec2 = prod.client("ec2")
    (group,) = ec2.describe_security_groups(GroupIds=[prod.outputs["SecurityGroupId"]])[
        "SecurityGroups"
    ]
    sources = {
        pair["GroupId"] for rule in group["IpPermissions"] for pair in rule["UserIdGroupPairs"]
    }
    assert sources == {prod.outputs["SecurityGroupId"]}


# -- the agent config, as dagster-cloud loads it -------------------------------------------------


@pytest.fixture(scope="module")
def ecs_launcher_importable() -> Iterator[None]:
    # dagster-aws (a dev dependency here, as in the agent image) is what dagster-cloud's ECS
    # launcher modules import; the config schema checked is dagster-cloud's own.
    importlib.import_module("dagster_cloud.workspace.ecs")
    yield


def start_agent_container(
    definition: dict[str, Any], environment: dict[str, str], home: Path
) -> subprocess.CompletedProcess[str]:
    """Run the agent container's entry point and command, with a stand-in `dagster-cloud`."""
    (container,) = definition["containerDefinitions"]
    bin_dir = home.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake_agent = bin_dir / "dagster-cloud"
    fake_agent.write_text('#!/bin/sh\necho "$@" > "$DAGSTER_HOME/agent-args"\n')
    fake_agent.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin"
    return subprocess.run(
        [*container["entryPoint"], *container["command"]],
        env={**environment, "DAGSTER_HOME": str(home), "PATH": path},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def container_environment(stack: Stack) -> dict[str, str]:
    """The agent container's environment as ECS would give it, the secret resolved."""
    (container,) = stack.agent_task_definition()["containerDefinitions"]
    secrets = stack.client("secretsmanager")
    return {
        **{env["name"]: env["value"] for env in container["environment"]},
        **{
            secret["name"]: secrets.get_secret_value(SecretId=secret["valueFrom"])["SecretString"]
            for secret in container["secrets"]
        },
    }


@contextmanager
def load_agent(home: Path) -> Iterator[tuple[DagsterInstance, Any]]:
    """The agent's own start-up: the instance from DAGSTER_HOME/dagster.yaml (validated against
    DagsterCloudAgentInstance's schema, its dagster_cloud_api processed), then the user code
    launcher rehydrated (validated against EcsUserCodeLauncher.config_type())."""
    instance = DagsterInstance.from_config(str(home))
    try:
        yield instance, instance.user_code_launcher
    finally:
        instance.dispose()


def test_agent_loads_the_config_it_writes(
    each_stack: Stack,
    ecs_launcher_importable: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    from dagster_cloud.instance import DagsterCloudAgentInstance
    from dagster_cloud.workspace.user_code_launcher.utils import get_instance_ref_for_user_code

    stack = each_stack
    environment = container_environment(stack)
    home = tmp_path / "home"
    started = start_agent_container(stack.agent_task_definition(), environment, home)
    assert started.returncode == 0, started.stderr
    assert (home / "agent-args").read_text().split() == ["agent", "run", str(home)]
    # Written as shipped: the file is this kind's config.
    assert yaml.safe_load((home / "dagster.yaml").read_text()) == agent_config(stack.kind)

    for name, value in {**environment, "DAGSTER_HOME": str(home)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with load_agent(home) as (instance, launcher):
        assert isinstance(instance, DagsterCloudAgentInstance)
        assert instance.organization_name == ORGANIZATION
        # Which deployments the agent serves, as dagster-cloud's agent loop reads them
        # (DagsterCloudAgent.run_loop: deployment_names, includes_branch_deployments).
        if stack.kind == "prod":
            assert instance.deployment_names == [DEPLOYMENT]
            assert instance.includes_branch_deployments is False
        else:
            assert instance.deployment_names == []
            assert instance.includes_branch_deployments is True
        assert instance.include_all_serverless_deployments is False
        assert type(launcher).__name__ == "EcsUserCodeLauncher"
        outputs = stack.outputs
        assert launcher.cluster == outputs["ClusterName"]
        assert launcher.subnets == stack.subnets
        assert launcher.security_group_ids == [outputs["SecurityGroupId"]]
        assert launcher.service_discovery_namespace_id == outputs["ServiceDiscoveryNamespaceId"]
        assert launcher.execution_role_arn == outputs["ExecutionRoleArn"]
        assert launcher.task_role_arn == stack.task_role_arn
        assert launcher.log_group == outputs["LogGroupName"]
        assert launcher.launch_type == "FARGATE"
        # No sizes of its own: the location's apply (test_code_server_and_run_sizes_...).
        for resources in (launcher.server_resources, launcher.run_resources):
            assert not {"cpu", "memory"} & set(resources)
        # What every code server and run task gets from the agent config.
        assert launcher.secrets == [
            {"name": "DAGSTER_CLOUD_AGENT_TOKEN", "valueFrom": outputs["AgentTokenSecretArn"]}
        ]
        assert launcher.env_vars == ["ML_PLATFORM_PROD_DEPLOYMENT"]

        # Code servers get the agent's config as their instance ref (DAGSTER_INSTANCE_REF, plain
        # text in their task definitions): it names the token's variable, not the token, and
        # loads with only what the code location tasks are given.
        deployment = DEPLOYMENT if stack.kind == "prod" else "pr-17"
        ref = get_instance_ref_for_user_code(instance.ref_for_deployment(deployment))
        assert stack.spec.token not in serialize_value(ref)
        with monkeypatch.context() as code_server:
            for name in environment:
                code_server.delenv(name)
            code_server.setenv(
                "DAGSTER_CLOUD_AGENT_TOKEN", environment["DAGSTER_CLOUD_AGENT_TOKEN"]
            )
            child = DagsterInstance.from_ref(ref)
            assert child.deployment_name == deployment
            child.dispose()

    # The prod name the agent passes on is the one ml_platform.settings recognises as prod.
    settings = Settings.from_env(
        {
            "DAGSTER_CLOUD_DEPLOYMENT_NAME": DEPLOYMENT,
            "ML_PLATFORM_PROD_DEPLOYMENT": environment["ML_PLATFORM_PROD_DEPLOYMENT"],
            "ML_PLATFORM_GCP_PROJECT": "acme-ml",
            "ML_PLATFORM_GCS_BUCKET": "acme-ml-pipelines",
        }
    )
    assert settings.deployment is Deployment.PROD


def set_in(config: dict[str, Any], path: str, value: Any) -> None:
    *parents, key = path.split(".")
    for parent in parents:
        config = config[parent]
    config[key] = value


def rename_key(config: dict[str, Any], path: str, new_key: str) -> None:
    *parents, key = path.split(".")
    for parent in parents:
        config = config[parent]
    config[new_key] = config.pop(key)


LAUNCHER = "user_code_launcher.config"
# Each breakage of the prod config, and what the refusal says about it.
BROKEN_CONFIGS = {
    "unknown launch type": (lambda c: set_in(c, f"{LAUNCHER}.launch_type", "LAMBDA"), "got LAMBDA"),
    "misspelt subnets": (
        lambda c: rename_key(c, f"{LAUNCHER}.subnets", "subnet"),
        'entry "subnet"',
    ),
    "no log group": (
        lambda c: c["user_code_launcher"]["config"].pop("log_group"),
        'entry "log_group"',
    ),
    # Why the deployment is given as `deployments`.
    "env source for deployment": (
        lambda c: set_in(c, "dagster_cloud_api.deployment", {"env": "DAGSTER_CLOUD_DEPLOYMENT"}),
        "root:dagster_cloud_api:deployment",
    ),
    "branch deployments as a string": (
        lambda c: set_in(c, "dagster_cloud_api.branch_deployments", "sometimes"),
        "root:dagster_cloud_api:branch_deployments",
    ),
    "secret without valueFrom": (
        lambda c: set_in(c, f"{LAUNCHER}.secrets", [{"name": "DAGSTER_CLOUD_AGENT_TOKEN"}]),
        'entry "valueFrom"',
    ),
    "token from an unset variable": (
        lambda c: set_in(c, "dagster_cloud_api.agent_token", {"env": "NOT_SET_BY_THE_TEMPLATE"}),
        "NOT_SET_BY_THE_TEMPLATE",
    ),
}


def write_agent_config(home: Path, config: dict[str, Any]) -> None:
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture
def agent_environment(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in container_environment(stack).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)


def test_an_intact_copy_loads(ecs_launcher_importable: None, agent_environment: None, tmp_path):
    """The control for the next test: the same writing and loading, nothing broken."""
    write_agent_config(tmp_path, agent_config())
    with load_agent(tmp_path) as (instance, launcher):
        assert instance.deployment_names == [DEPLOYMENT]
        assert launcher.run_task_definition_prefix == "dagsterrun"


@pytest.mark.parametrize("breakage", BROKEN_CONFIGS, ids=list(BROKEN_CONFIGS))
def test_broken_agent_config_is_refused(
    breakage: str, ecs_launcher_importable: None, agent_environment: None, tmp_path: Path
):
    config = agent_config()
    mutate, named = BROKEN_CONFIGS[breakage]
    mutate(config)
    write_agent_config(tmp_path, config)
    with pytest.raises(DagsterInvalidConfigError) as refused, load_agent(tmp_path):
        pass
    assert named in " ".join(error.message for error in refused.value.errors)
