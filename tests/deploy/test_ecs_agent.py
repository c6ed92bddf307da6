"""The Dagster+ ECS agent stack (deploy/ecs/agent.yaml) and its config (deploy/ecs/dagster.yaml).

Four kinds of check:

- cfn-lint finds nothing in the template, informational checks included.
- The agent config is the one the template ships, and dagster-cloud's own loading path accepts
  it: the agent container's start command writes it, `DagsterInstance.from_config` builds the
  `DagsterCloudAgentInstance` from it and rehydrates the `EcsUserCodeLauncher` (both validate
  against their config schemas). Broken copies are refused.
- The stack is created under moto (in process). moto's CloudFormation has no model for Cloud Map
  namespaces, Secrets Manager secrets or security group egress rules; its ECS task definition
  and service models drop most properties (network mode, compatibilities, CPU, roles, launch
  type, network configuration) and its ECR model drops the scan setting and lifecycle policy.
  For those six types the test gives moto's CloudFormation small models that create the
  resource through the public API (boto3, answered by moto) from the template's resolved
  properties, so every ARN and ID is wired as in AWS and the tests read back the ECS, ECR,
  Secrets Manager and Cloud Map view. moto's own models create the rest: the IAM roles with
  their inline policies, the log group, the security group and its ingress rule, the cluster.
- What moto cannot hold is checked on the parsed template: the service's deployment circuit
  breaker (moto's ECS API has no deployment configuration), the cluster's capacity providers,
  the security group's inline egress (moto keeps its default allow-all), the agent's health
  check, tags.
"""

from __future__ import annotations

import ast
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
from moto import mock_aws
from moto.cloudformation import parsing as moto_cfn_parsing

from ml_platform.settings import Deployment, Settings

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "ecs"
TEMPLATE_PATH = DEPLOY_DIR / "agent.yaml"
AGENT_CONFIG_PATH = DEPLOY_DIR / "dagster.yaml"

REGION = "us-east-1"
STACK = "mlp-agent"
ORGANIZATION = "acme"
# Not the default "prod": proves the prod name reaches ml_platform.settings.
DEPLOYMENT = "production"
TOKEN = "agent:acme:7f3c2b1a0e9d8c7b6a5f4e3d2c1b0a99"
# Variables of the agent container that dagster.yaml does not refer to, and why they are set.
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


def agent_config() -> dict[str, Any]:
    return yaml.safe_load(AGENT_CONFIG_PATH.read_text())


def test_template_is_cfn_lint_clean():
    matches = lint(
        TEMPLATE_PATH.read_text(),
        config=ManualArgs(include_checks=["I"], regions=["us-east-1", "eu-west-1"]),
    )
    assert [str(match) for match in matches] == []


def test_template_ships_the_agent_config(agent_container: dict[str, Any]):
    shipped = {env["Name"]: env["Value"] for env in agent_container["Environment"]}
    assert yaml.safe_load(shipped["DAGSTER_AGENT_CONFIG"]) == agent_config(), (
        "deploy/ecs/dagster.yaml and DAGSTER_AGENT_CONFIG in agent.yaml differ: copy the file "
        "(comments may be left out) into the template"
    )


def referenced_variables(config_text: str) -> set[str]:
    """Variables the agent config reads: {env: NAME} sources, "$NAME" placeholders, and the
    bare env_vars entries the launcher copies from the agent's environment."""
    config = yaml.safe_load(config_text)
    names: set[str] = set(re.findall(r"[$]([A-Za-z_][A-Za-z0-9_]*)", config_text))

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


def test_template_sets_exactly_the_variables_the_config_reads(agent_container: dict[str, Any]):
    config_text = "\n".join(
        line
        for line in AGENT_CONFIG_PATH.read_text().splitlines()
        if not line.lstrip().startswith("#")
    )
    set_by_template = {env["Name"] for env in agent_container["Environment"]} | {
        secret["Name"] for secret in agent_container["Secrets"]
    }
    assert referenced_variables(config_text) == set_by_template - set(CONSUMED_OUTSIDE_CONFIG)


def test_task_sizes_are_valid_fargate_combinations(template: dict[str, Any]):
    for name in ("AgentTaskSize", "CodeServerTaskSize", "RunTaskSize"):
        parameter = template["Parameters"][name]
        assert parameter["Default"] in parameter["AllowedValues"]
        for size in parameter["AllowedValues"]:
            cpu, memory = (int(part) for part in size.split("/"))
            assert memory in FARGATE_MEMORY[cpu], f"{name}: Fargate rejects {size}"


def test_agent_image_follows_the_locked_dagster_cloud(template: dict[str, Any]):
    image = template["Parameters"]["AgentImage"]["Default"]
    repository, tag = image.rsplit(":", 1)
    assert repository == "docker.io/dagster/dagster-cloud-agent"
    # The agent and the code location image (uv.lock) stay on the same minor release.
    assert tag.split(".")[:2] == dagster_cloud.__version__.split(".")[:2]


def test_what_moto_cannot_hold(template: dict[str, Any], agent_container: dict[str, Any]):
    resources = template["Resources"]
    assert template["Parameters"]["AgentToken"]["NoEcho"] is True
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
    assert agent_config()["user_code_launcher"]["config"]["requires_healthcheck"] is True
    # Every resource that takes tags is tagged with the project.
    for name, resource in resources.items():
        if resource["Type"] in ("AWS::EC2::SecurityGroupIngress", "AWS::EC2::SecurityGroupEgress"):
            continue  # rules have no tags
        tags = {tag["Key"]: tag["Value"] for tag in resource["Properties"]["Tags"]}
        assert tags["Project"] == "ml-platform", name


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
        return cls.create(cloudformation_json.get("Properties", {}))

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
    outputs: dict[str, str]
    subnets: list[str]
    vpc_id: str

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


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    original = moto_cfn_parsing.get_model_map
    with pytest.MonkeyPatch.context() as patch, mock_aws():
        patch.setattr(
            moto_cfn_parsing, "get_model_map", lambda: {**original(), **API_BACKED_MODELS}
        )
        ec2 = boto3.client("ec2", region_name=REGION)
        vpc_id = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
        subnets = [
            ec2.create_subnet(VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=f"{REGION}{zone}")[
                "Subnet"
            ]["SubnetId"]
            for cidr, zone in (("10.20.0.0/24", "a"), ("10.20.1.0/24", "b"))
        ]
        parameters = {
            "DagsterOrganization": ORGANIZATION,
            "DagsterDeployment": DEPLOYMENT,
            "AgentToken": TOKEN,
            "VpcId": vpc_id,
            "SubnetA": subnets[0],
            "SubnetB": subnets[1],
        }
        cloudformation = boto3.client("cloudformation", region_name=REGION)
        cloudformation.create_stack(
            StackName=STACK,
            TemplateBody=TEMPLATE_PATH.read_text(),
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
            Capabilities=["CAPABILITY_IAM"],
        )
        (description,) = cloudformation.describe_stacks(StackName=STACK)["Stacks"]
        assert description["StackStatus"] == "CREATE_COMPLETE", description
        outputs = {o["OutputKey"]: o["OutputValue"] for o in description["Outputs"]}
        yield Stack(outputs=outputs, subnets=subnets, vpc_id=vpc_id)


def test_every_resource_is_created(stack: Stack, template: dict[str, Any]):
    resources = stack.client("cloudformation").describe_stack_resources(StackName=STACK)[
        "StackResources"
    ]
    # A type moto's CloudFormation cannot create would be missing here (it skips them).
    assert {r["LogicalResourceId"] for r in resources} == set(template["Resources"])
    assert set(stack.outputs) == set(template["Outputs"])


def test_cluster(stack: Stack):
    (cluster,) = stack.client("ecs").describe_clusters(clusters=[stack.outputs["ClusterName"]])[
        "clusters"
    ]
    assert cluster["status"] == "ACTIVE"
    assert cluster["clusterName"] == STACK


def test_agent_task_definition_is_fargate_awsvpc(stack: Stack, template: dict[str, Any]):
    definition = stack.agent_task_definition()
    assert definition["requiresCompatibilities"] == ["FARGATE"]
    assert definition["networkMode"] == "awsvpc"
    assert (definition["cpu"], definition["memory"]) == ("512", "1024")
    assert definition["executionRoleArn"] == stack.outputs["ExecutionRoleArn"]
    # The agent runs as its own role, not as the code location's.
    assert definition["taskRoleArn"] not in (
        stack.outputs["ExecutionRoleArn"],
        stack.outputs["CodeLocationTaskRoleArn"],
    )
    (container,) = definition["containerDefinitions"]
    assert container["image"] == template["Parameters"]["AgentImage"]["Default"]
    assert (
        container["logConfiguration"]["options"]["awslogs-group"] == stack.outputs["LogGroupName"]
    )


def test_agent_reads_the_token_from_secrets_manager_only(stack: Stack):
    definition = stack.agent_task_definition()
    (container,) = definition["containerDefinitions"]
    secret_arn = stack.outputs["AgentTokenSecretArn"]
    assert container["secrets"] == [{"name": "DAGSTER_CLOUD_AGENT_TOKEN", "valueFrom": secret_arn}]
    secrets = stack.client("secretsmanager")
    assert secrets.get_secret_value(SecretId=secret_arn)["SecretString"] == TOKEN
    environment = {env["name"]: env["value"] for env in container["environment"]}
    assert "DAGSTER_CLOUD_AGENT_TOKEN" not in environment
    # Nowhere in the task definition (or in what code servers inherit from it).
    assert TOKEN not in json.dumps(definition)
    assert environment["DAGSTER_CLOUD_AGENT_TOKEN_SECRET_ARN"] == secret_arn


def test_execution_role_reads_the_token_and_the_code_location_secrets_only(stack: Stack):
    statements = stack.role_statements(stack.outputs["ExecutionRoleArn"])
    secret_statements = [
        s for s in statements if any(a.startswith(("secretsmanager:", "*")) for a in s["Action"])
    ]
    assert len(secret_statements) == 1
    (statement,) = secret_statements
    assert statement["Action"] == ["secretsmanager:GetSecretValue"]
    account = stack.outputs["ExecutionRoleArn"].split(":")[4]
    assert sorted(statement["Resource"]) == sorted(
        [
            stack.outputs["AgentTokenSecretArn"],
            f"arn:aws:secretsmanager:{REGION}:{account}:secret:ml-platform/*",
        ]
    )
    assert stack.outputs["CodeLocationSecretsArnPattern"] in statement["Resource"]
    # Image pulls from the code location repository only (the agent image is public).
    repository_arn = stack.client("ecr").describe_repositories(repositoryNames=["ml-platform"])[
        "repositories"
    ][0]["repositoryArn"]
    for s in statements:
        if s["Resource"] == ["*"]:
            assert s["Action"] == ["ecr:GetAuthorizationToken"]
        elif any(a.startswith("ecr:") for a in s["Action"]):
            assert s["Resource"] == [repository_arn]


# Actions that IAM cannot scope to a resource (the ECS list actions are scoped by condition).
UNSCOPED_AGENT_ACTIONS = {
    "ecs:DescribeTaskDefinition",
    "ecs:ListAccountSettings",
    "ecs:RegisterTaskDefinition",
    "ecs:ListServices",
    "ecs:ListTasks",
    "servicediscovery:GetOperation",
    "servicediscovery:ListServices",
    "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeRouteTables",
    "tag:GetResources",
}


def test_agent_role_is_least_privilege(stack: Stack):
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
        [stack.outputs["ExecutionRoleArn"], stack.outputs["CodeLocationTaskRoleArn"]]
    )
    assert pass_role["Condition"] == {
        "StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}
    }
    # Services, tasks and runs only in this cluster; runs only of the launcher's run families.
    cluster = stack.outputs["ClusterName"]
    for s in statements:
        for action in s["Action"]:
            if action in {"ecs:CreateService", "ecs:UpdateService", "ecs:DeleteService"}:
                assert s["Resource"] == [
                    f"arn:aws:ecs:{REGION}:{role_arn.split(':')[4]}:service/{cluster}/*"
                ]
    (run_task,) = [s for s in statements if "ecs:RunTask" in s["Action"]]
    run_prefix = agent_config()["user_code_launcher"]["config"]["run_task_definition_prefix"]
    (family_pattern,) = run_task["Resource"]
    assert family_pattern.endswith(f":task-definition/{run_prefix}_{ORGANIZATION}_*")
    assert "ecs:cluster" in run_task["Condition"]["ArnEquals"]
    # Cloud Map: create services in the stack's namespace only.
    namespace_arn = stack.client("servicediscovery").get_namespace(
        Id=stack.outputs["ServiceDiscoveryNamespaceId"]
    )["Namespace"]["Arn"]
    (create,) = [s for s in statements if "servicediscovery:CreateService" in s["Action"]]
    assert create["Resource"] == [namespace_arn]


def test_code_location_role_has_no_aws_permissions(stack: Stack):
    role_arn = stack.outputs["CodeLocationTaskRoleArn"]
    assert stack.role_statements(role_arn) == []
    name = stack.outputs["CodeLocationTaskRoleName"]
    assert role_arn.endswith(f"/{name}")
    role = stack.client("iam").get_role(RoleName=name)["Role"]
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}
    assert "aws:SourceAccount" in trust["Condition"]["StringEquals"]


def test_log_group_retention(stack: Stack):
    (group,) = stack.client("logs").describe_log_groups(
        logGroupNamePrefix=stack.outputs["LogGroupName"]
    )["logGroups"]
    assert int(group["retentionInDays"]) == 30


def test_agent_service(stack: Stack):
    ecs = stack.client("ecs")
    (service,) = ecs.describe_services(
        cluster=stack.outputs["ClusterName"], services=[stack.outputs["AgentServiceName"]]
    )["services"]
    assert service["desiredCount"] == 1
    assert service["launchType"] == "FARGATE"
    assert service["networkConfiguration"]["awsvpcConfiguration"] == {
        "subnets": stack.subnets,
        "securityGroups": [stack.outputs["SecurityGroupId"]],
        "assignPublicIp": "DISABLED",
    }


def test_code_location_repository(stack: Stack):
    ecr = stack.client("ecr")
    (repository,) = ecr.describe_repositories(repositoryNames=["ml-platform"])["repositories"]
    assert repository["imageScanningConfiguration"] == {"scanOnPush": True}
    assert repository["imageTagMutability"] == "IMMUTABLE"
    assert stack.outputs["CodeLocationRepositoryUri"] == repository["repositoryUri"]
    rules = json.loads(
        ecr.get_lifecycle_policy(repositoryName="ml-platform")["lifecyclePolicyText"]
    )
    keep = [r for r in rules["rules"] if r["selection"]["countType"] == "imageCountMoreThan"]
    assert [r["selection"]["countNumber"] for r in keep] == [10, 100]
    # The images deployed from main are selected first, so the catch-all count (the last
    # rule, lowest priority) can never expire what prod runs.
    main, catch_all = sorted(keep, key=lambda r: r["rulePriority"])
    assert main["selection"]["tagPrefixList"] == ["main-"]
    assert main["selection"]["tagStatus"] == "tagged"
    assert max(rules["rules"], key=lambda r: r["rulePriority"]) == catch_all
    assert catch_all["selection"]["tagStatus"] == "any"
    deploy = (DEPLOY_DIR.parents[1] / ".github" / "workflows" / "deploy.yml").read_text()
    assert re.search(r"IMAGE_TAG=main-\$\{HEAD_SHA\}", deploy)


def test_security_group_lets_the_agent_reach_code_servers(stack: Stack):
    group_id = stack.outputs["SecurityGroupId"]
    (group,) = stack.client("ec2").describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    assert group["VpcId"] == stack.vpc_id
    # The port the agent tells code servers to listen on.
    (container,) = stack.agent_task_definition()["containerDefinitions"]
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


def test_service_discovery_namespace(stack: Stack):
    namespace = stack.client("servicediscovery").get_namespace(
        Id=stack.outputs["ServiceDiscoveryNamespaceId"]
    )["Namespace"]
    assert namespace["Type"] == "DNS_PRIVATE"
    assert namespace["Name"] == stack.outputs["ServiceDiscoveryNamespaceName"]


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
    stack: Stack, ecs_launcher_importable: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from dagster_cloud.instance import DagsterCloudAgentInstance
    from dagster_cloud.workspace.user_code_launcher.utils import get_instance_ref_for_user_code

    environment = container_environment(stack)
    home = tmp_path / "home"
    started = start_agent_container(stack.agent_task_definition(), environment, home)
    assert started.returncode == 0, started.stderr
    assert (home / "agent-args").read_text().split() == ["agent", "run", str(home)]

    for name, value in {**environment, "DAGSTER_HOME": str(home)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with load_agent(home) as (instance, launcher):
        assert isinstance(instance, DagsterCloudAgentInstance)
        assert instance.organization_name == ORGANIZATION
        assert instance.deployment_names == [DEPLOYMENT]
        assert instance.includes_branch_deployments is True
        assert type(launcher).__name__ == "EcsUserCodeLauncher"
        outputs = stack.outputs
        assert launcher.cluster == outputs["ClusterName"]
        assert launcher.subnets == stack.subnets
        assert launcher.security_group_ids == [outputs["SecurityGroupId"]]
        assert launcher.service_discovery_namespace_id == outputs["ServiceDiscoveryNamespaceId"]
        assert launcher.execution_role_arn == outputs["ExecutionRoleArn"]
        assert launcher.task_role_arn == outputs["CodeLocationTaskRoleArn"]
        assert launcher.log_group == outputs["LogGroupName"]
        assert launcher.launch_type == "FARGATE"
        assert launcher.server_resources == {"cpu": "1024", "memory": "4096", "replica_count": 1}
        assert launcher.run_resources == {"cpu": "2048", "memory": "8192"}
        # What every code server and run task gets from the agent config.
        assert launcher.secrets == [
            {"name": "DAGSTER_CLOUD_AGENT_TOKEN", "valueFrom": outputs["AgentTokenSecretArn"]}
        ]
        assert launcher.env_vars == ["ML_PLATFORM_PROD_DEPLOYMENT"]

        # Code servers get the agent's config as their instance ref (DAGSTER_INSTANCE_REF, plain
        # text in their task definitions): it names the token's variable, not the token, and
        # loads with only what the code location tasks are given.
        for deployment in (DEPLOYMENT, "pr-17"):
            ref = get_instance_ref_for_user_code(instance.ref_for_deployment(deployment))
            assert TOKEN not in serialize_value(ref)
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


def test_start_command_refuses_an_unset_placeholder(stack: Stack, tmp_path: Path):
    environment = container_environment(stack)
    del environment["DAGSTER_RUN_MEMORY"]
    started = start_agent_container(stack.agent_task_definition(), environment, tmp_path / "home")
    assert started.returncode != 0
    assert "$DAGSTER_RUN_MEMORY" in started.stderr
    assert not (tmp_path / "home" / "agent-args").exists()


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
# Each breakage, and what the refusal says about it.
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
    # The reason sizes are "$NAME" placeholders: these fields take no {env:} source.
    "env source for cpu": (
        lambda c: set_in(c, f"{LAUNCHER}.server_resources.cpu", {"env": "DAGSTER_CODE_SERVER_CPU"}),
        "root:server_resources:cpu",
    ),
    # ... and why the deployment is given as `deployments`.
    "env source for deployment": (
        lambda c: set_in(c, "dagster_cloud_api.deployment", {"env": "DAGSTER_CLOUD_DEPLOYMENT"}),
        "root:dagster_cloud_api:deployment",
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
    """Write a config as the start command would: "$NAME" placeholders expanded."""

    def expand(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: expand(value) for key, value in node.items()}
        if isinstance(node, list):
            return [expand(value) for value in node]
        return os.path.expandvars(node) if isinstance(node, str) else node

    (home / "dagster.yaml").write_text(yaml.safe_dump(expand(config), sort_keys=False))


@pytest.fixture
def agent_environment(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in container_environment(stack).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)


def test_an_intact_copy_loads(ecs_launcher_importable: None, agent_environment: None, tmp_path):
    """The control for the next test: the same writing and loading, nothing broken."""
    write_agent_config(tmp_path, agent_config())
    with load_agent(tmp_path) as (_, launcher):
        assert launcher.server_resources["cpu"] == "1024"


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
