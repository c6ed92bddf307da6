"""parliament on every IAM policy document, cfripper on the agent template (both kinds).

Every finding either linter reports must be listed below with the reason it is accepted (the
matching comment sits next to the statement in deploy/ecs/agent.yaml or deploy/ecs/README.md),
and every listed finding must still be reported: a new finding fails the test, and so does an
explanation that no longer explains anything.

checkov is not used: its releases from 3.0 pin networkx below 2.7, which the project cannot
install (dbt needs networkx 3; pyproject.toml pins 3.1 for P1), and the newest one that resolves
is a 2021 release. cfripper is the CloudFormation security linter that installs beside it.
cfn-lint runs in tests/deploy/test_ecs_agent.py.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import re
import sys
import types
from typing import Any

import pytest

from tests.deploy.test_iam_catalogue import (
    KINDS,
    TEMPLATE_PATH,
    readme_policy_files,
    resolved_template,
    template_documents,
)

# parliament 1.6's statement.py has regular expressions in plain strings ("\\d"), which Python
# warns about when it compiles the module.
pytestmark = pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")


def import_parliament() -> Any:
    """parliament 1.6 finds its data files with pkg_resources, which setuptools no longer ships
    (the project's setuptools is 80+). Give it the one function it calls, on importlib.resources."""
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, name: str(  # type: ignore[attr-defined]
            importlib.resources.files(package) / name
        )
        sys.modules["pkg_resources"] = shim
    import parliament

    return parliament


def policy_documents() -> dict[str, tuple[dict[str, Any], bool]]:
    """Every policy document: name -> (document, is a role's trust policy)."""
    documents = {}
    for kind in KINDS:
        for name, document in template_documents(TEMPLATE_PATH.read_text(), kind).items():
            documents[name] = (document, name.endswith("/trust"))
    for name, document in readme_policy_files().items():
        documents[f"README {name}"] = (document, name.endswith("-trust.json"))
    return documents


# (finding, document name pattern, detail pattern) -> why it is accepted.
PARLIAMENT_ACCEPTED = {
    (
        "MALFORMED",
        r".*(/trust|-trust\.json)",
        r"Statement contains neither Resource nor NotResource",
    ): "A role's trust policy is a resource policy whose resource is the role itself: IAM "
    "refuses a Resource element in it. parliament reads every document as an identity policy.",
    (
        "UNKNOWN_FEDERATION_SOURCE",
        r"README github-(prod|branch)-trust\.json",
        r"arn:aws:iam::\d{12}:oidc-provider/token\.actions\.githubusercontent\.com",
    ): "GitHub's OIDC provider, which parliament's list of federation sources predates; the trust "
    "requires the audience and one exact subject (an environment of this repository).",
    (
        "CREDENTIALS_EXPOSURE",
        r"agent\.yaml\[(prod|branch)\] ExecutionRole/.*|README github-(prod|branch)-policy\.json",
        r".*ecr:getauthorizationtoken.*",
    ): "ECR's registry login: pulling (ECS) and pushing (CI) an ECR image needs it, and it has no "
    "resource-level permissions; the image actions themselves are limited to one repository.",
    (
        "PERMISSIONS_MANAGEMENT_ACTIONS",
        r"agent\.yaml\[(prod|branch)\] AgentTaskRole/ecs-user-code-launcher",
        r".*iam:passrole.*",
    ): "The agent hands code servers and runs their roles: PassRole is limited to this stack's "
    "execution role and code location task role, and to ecs-tasks.amazonaws.com.",
    (
        "RESOURCE_STAR",
        r"agent\.yaml\[(prod|branch)\] AgentTaskRole/ecs-user-code-launcher",
        r"\['ecs:RegisterTaskDefinition'\]",
    ): "agent.yaml, TaskDefinitions: what may be registered is bounded by PassRole, running it by "
    "RunTasks; kept at * as in Dagster's own agent policy.",
    (
        "RESOURCE_STAR",
        r"agent\.yaml\[(prod|branch)\] AgentTaskRole/ecs-user-code-launcher",
        r"\['ecs:ListTasks'\]",
    ): "ListTasks' only resource type is a container instance, which Fargate has none of; the "
    "statement is limited to this stack's cluster by the ecs:cluster condition.",
}


def parliament_findings() -> list[tuple[str, str, str]]:
    parliament = import_parliament()
    findings = []
    for name, (document, _) in policy_documents().items():
        policy = parliament.analyze_policy_string(
            json.dumps(document), filepath=name, include_community_auditors=True
        )
        for finding in policy.findings:
            detail = finding.detail or finding.location.get("actions", "")
            findings.append((finding.issue, name, str(detail)))
    return findings


def accepted_by(
    finding: tuple[str, str, str], accepted: dict[tuple[str, str, str], str]
) -> tuple[str, str, str] | None:
    issue, name, detail = finding
    for key in accepted:
        if key[0] == issue and re.fullmatch(key[1], name) and re.fullmatch(key[2], detail):
            return key
    return None


def test_parliament_finds_nothing_unexplained():
    findings = parliament_findings()
    assert len({name for _, name, _ in findings}) >= 4
    unexplained = [f for f in findings if accepted_by(f, PARLIAMENT_ACCEPTED) is None]
    assert unexplained == []
    used = {accepted_by(f, PARLIAMENT_ACCEPTED) for f in findings}
    assert set(PARLIAMENT_ACCEPTED) - used == set(), "explanations of findings no longer made"


def test_parliament_would_report_the_gaps_of_issue_11():
    """The control: parliament on the Cloud Map statements agent.yaml had before issue 11."""
    from tests.deploy.test_iam_catalogue import ISSUE_11_CLOUD_MAP

    parliament = import_parliament()
    document = {"Version": "2012-10-17", "Statement": ISSUE_11_CLOUD_MAP}
    policy = parliament.analyze_policy_string(json.dumps(document), filepath="before")
    mismatches = [f.detail for f in policy.findings if f.issue == "RESOURCE_MISMATCH"]
    reported = {entry["action"] for detail in mismatches for entry in detail}
    assert {
        "servicediscovery:CreateService",
        "servicediscovery:ListTagsForResource",
        "servicediscovery:TagResource",
    } <= reported


# (rule, logical resource, actions) -> why it is accepted. cfripper flags every "*" resource of
# an action it believes takes resource-level permissions; its list is older than AWS's catalogue,
# which tests/deploy/test_iam_catalogue.py checks each of these against.
CFRIPPER_ACCEPTED = {
    (
        "WildcardResourceRule",
        "AgentTaskRole",
        "ecs:DescribeTaskDefinition",
    ): "No resource-level permissions in AWS's catalogue (agent.yaml, TaskDefinitions).",
    (
        "WildcardResourceRule",
        "AgentTaskRole",
        "ecs:ListAccountSettings",
    ): "No resource-level permissions in AWS's catalogue (agent.yaml, TaskDefinitions).",
    (
        "WildcardResourceRule",
        "AgentTaskRole",
        "ecs:ListServices",
    ): "agent.yaml, ListInCluster: no resource-level permissions; limited by the ecs:cluster "
    "condition.",
    (
        "WildcardResourceRule",
        "AgentTaskRole",
        "ecs:RegisterTaskDefinition",
    ): "agent.yaml, TaskDefinitions: bounded by PassRole and RunTasks; * as in Dagster's policy.",
    (
        "WildcardResourceRule",
        "AgentTaskRole",
        "ecs:ListTasks",
    ): "agent.yaml, ListInCluster: no Fargate resource to name; limited by the ecs:cluster "
    "condition.",
    (
        "WildcardResourceRule",
        "AgentTaskRole",
        "servicediscovery:GetOperation",
    ): "agent.yaml, CloudMapAccountLevel: an operation id names no namespace; read-only status.",
    (
        "WildcardResourceRule",
        "AgentTaskRole",
        "servicediscovery:ListInstances",
    ): "agent.yaml, CloudMapAccountLevel: the two catalogues disagree on its resource type; * "
    "works under both; read-only.",
    (
        "WildcardResourceRule",
        "AgentTaskRole",
        "servicediscovery:ListServices",
    ): "No resource-level permissions in AWS's catalogue (cfripper's list is older).",
    (
        "WildcardResourceRule",
        "AgentTaskRole",
        "servicediscovery:TagResource",
    ): "No resource-level permissions in AWS's catalogue (cfripper's list is older); tags given "
    "at CreateService.",
    (
        "WildcardResourceRule",
        "AgentTaskRole",
        "servicediscovery:ListTagsForResource",
    ): "No resource-level permissions in AWS's catalogue (cfripper's list is older).",
    (
        "WildcardResourceRule",
        "AgentTaskRole",
        "tag:GetResources",
    ): "No resource-level permissions in AWS's catalogue; finds the agent's own code servers by "
    "tag in one call.",
}


def cfripper_findings(kind: str) -> list[tuple[str, str, str, str]]:
    import pycfmodel
    from cfripper.config.config import Config
    from cfripper.rule_processor import RuleProcessor
    from cfripper.rules import DEFAULT_RULES

    # cfripper's own resolver (pycfmodel's) leaves Fn::GetAtt and resource Refs unresolved:
    # give it the template with the catalogue test's representative ARNs instead.
    model = pycfmodel.parse(resolved_template(TEMPLATE_PATH.read_text(), kind))
    config = Config(rules=list(DEFAULT_RULES), aws_account_id="123456789012")
    processor = RuleProcessor(*[DEFAULT_RULES[rule](config) for rule in config.rules])
    result = processor.process_cf_template(model, config)
    findings = []
    for failure in result.failures:
        for resource_id in sorted(failure.resource_ids or {"-"}):
            for action in sorted(failure.actions or {"-"}):
                findings.append((failure.rule, resource_id, action, failure.rule_mode))
    return findings


@pytest.mark.parametrize("kind", KINDS)
def test_cfripper_finds_nothing_unexplained(kind: str):
    findings = cfripper_findings(kind)
    unexplained = [f for f in findings if tuple(f[:3]) not in CFRIPPER_ACCEPTED]
    assert unexplained == []
    assert set(CFRIPPER_ACCEPTED) - {tuple(f[:3]) for f in findings} == set(), (
        "explanations of findings no longer made"
    )
