"""The GitHub Actions workflows (.github/workflows/*.yml): linted, and the promises they keep.

- actionlint finds nothing: expressions and contexts, action inputs, runner labels, actions on
  deprecated runtimes, and the `run:` scripts through shellcheck where shellcheck is installed.
- check-jsonschema validates every file against its vendored GitHub workflow schema.
- Security: every job declares its permissions and writes only what it must; `id-token: write`
  exactly in the jobs that use OIDC, whose steps take no keys; the only secrets are the
  Dagster+ API token and GITHUB_TOKEN; every job that reaches Dagster+ or a cloud runs in a
  GitHub environment, `production` exactly for main and release tags and `branch-deployments`
  for pull requests, whose variables render the branch agent's task role and credential secret
  and the pull requests' repositories; every action is pinned by commit SHA with its tag in a
  comment.
- Behaviour, by simulating which jobs run for each event (their triggers and job-level `if:`s,
  evaluated): tests on every push and pull request, running exactly the README's test command;
  prod deploys on main; a branch deployment and its smoke run for a pull request (not from a
  fork); the branch data cleanup only when a pull request closes; templates on version tags.
- Wiring: the deploy follows dagster-cloud-action's Hybrid sequence without the deprecated
  `ci check`, and hands the `ci` commands a rendered dagster_cloud.yaml that gets every
  variable it reads; the smoke run's
  job, assets and config are valid for the code location's own definitions; the steps that run
  `ml-platform` resolve, through Settings, to the deployment they act for; uv and the
  dagster-cloud action are the versions the Makefile and uv.lock pin.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from ml_platform.settings import DATASETS, Deployment, Settings

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = ROOT / ".github" / "workflows"
WORKFLOW_PATHS = sorted([*WORKFLOWS_DIR.glob("*.yml"), *WORKFLOWS_DIR.glob("*.yaml")])
BIN = Path(sys.executable).parent

# What the repository's settings provide (Settings > Secrets and variables > Actions); the
# header of deploy.yml lists them. Repository variables are the same for every job; a job that
# references an environment sees that environment's variables over them (GitHub's precedence).
SECRETS = {"DAGSTER_CLOUD_API_TOKEN", "GITHUB_TOKEN"}
PRODUCTION, BRANCH_DEPLOYMENTS = "production", "branch-deployments"
REPOSITORY_VARIABLES = {
    "DAGSTER_CLOUD_ORGANIZATION": "acme",
    "AWS_REGION": "eu-west-1",
    "GCP_WORKLOAD_IDENTITY_PROVIDER": "projects/1/locations/global/workloadIdentityPools/gh/"
    "providers/gh",
    "ML_PLATFORM_GCP_PROJECT": "acme-ml",
    "ML_PLATFORM_GCP_REGION": "europe-west4",
    "ML_PLATFORM_BIGQUERY_LOCATION": "EU",
    "ML_PLATFORM_GCS_BUCKET": "acme-ml-pipelines",
}
ENVIRONMENT_VARIABLES = {
    PRODUCTION: {
        "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/ml-platform-github-deploy",
        "ECR_REPOSITORY_URI": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/ml-platform",
        "GCP_SERVICE_ACCOUNT": "ml-platform-ci@acme-ml.iam.gserviceaccount.com",
        "CODE_LOCATION_TASK_ROLE_ARN": "arn:aws:iam::123456789012:role/agent-CodeLocationTaskRole",
        "GCP_CREDENTIAL_CONFIG_SECRET_ARN": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:"
        "ml-platform/gcp-credential-config-AbCdEf",
        "COMPONENT_IMAGE_REPOSITORY": "europe-west4-docker.pkg.dev/acme-ml/images/components",
        "ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY": "pipelines",
        "ML_PLATFORM_VERTEX_SERVICE_ACCOUNT": "ml-platform-pipelines@acme-ml.iam."
        "gserviceaccount.com",
        "SLACK_TOKEN_SECRET_ARN": "",
        "ML_PLATFORM_SLACK_CHANNEL": "#ml-platform",
    },
    BRANCH_DEPLOYMENTS: {
        "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/ml-platform-github-pr",
        "ECR_REPOSITORY_URI": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/ml-platform-branch",
        "GCP_SERVICE_ACCOUNT": "ml-platform-ci-pr@acme-ml.iam.gserviceaccount.com",
        "CODE_LOCATION_TASK_ROLE_ARN": "arn:aws:iam::123456789012:role/"
        "agent-BranchCodeLocationTaskRole",
        "GCP_CREDENTIAL_CONFIG_SECRET_ARN": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:"
        "ml-platform-branch/gcp-credential-config-GhIjKl",
        "COMPONENT_IMAGE_REPOSITORY": "europe-west4-docker.pkg.dev/acme-ml/images-pr/components",
        "ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY": "pipelines-pr",
        "ML_PLATFORM_VERTEX_SERVICE_ACCOUNT": "ml-platform-pipelines-branch@acme-ml.iam."
        "gserviceaccount.com",
        "ML_PLATFORM_SLACK_BRANCH_CHANNEL": "#ml-platform-pr",
    },
}
# Every variable name the workflows may read.
VARIABLE_NAMES = set(REPOSITORY_VARIABLES).union(*map(set, ENVIRONMENT_VARIABLES.values()))
PR_NUMBER = 7
HEAD_SHA = "0123456789abcdef0123456789abcdef01234567"
DIGEST = "sha256:" + "e" * 64
# Stand-ins for the expressions that are not `github.*` (those are evaluated per event).
STAND_INS = {
    "secrets.DAGSTER_CLOUD_API_TOKEN": "agent:acme:0123",
    "github.token": "ghs_0123",
    "steps.components.outputs.digest": DIGEST,
    "needs.deploy.outputs.deployment": "split-the-split",
    "needs.deploy.outputs.url": "https://acme.dagster.cloud",
    "runner.temp": "/runner/temp",
}

DAGSTER_CLOUD_ACTION = "dagster-io/dagster-cloud-action"
OIDC_ACTIONS = ("aws-actions/configure-aws-credentials", "google-github-actions/auth")
# The only scopes a job may write, each where it is needed: OIDC tokens, and the Dagster+
# status comment on a pull request.
WRITABLE_SCOPES = {"id-token", "pull-requests"}
LONG_LIVED_KEYS = re.compile(
    r"AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|aws-access-key-id|aws-secret-access-key"
    r"|credentials_json|GOOGLE_CREDENTIALS|_json_key|service_account_key",
    re.IGNORECASE,
)
# `uses: owner/repo[/path]@<commit SHA> # vX.Y.Z`, the tag the SHA was resolved from.
PINNED_USES = re.compile(
    r"^\s*(?:-\s+)?uses:\s+(?P<action>[\w.-]+/[\w.-]+(?:/[\w./-]+)?)@(?P<sha>[0-9a-f]{40})"
    r"\s+#\s+(?P<tag>v\d+\.\d+\.\d+)\s*$"
)


# -- reading the workflows -------------------------------------------------------------------


def load_workflow(path: Path) -> dict[str, Any]:
    workflow = yaml.safe_load(path.read_text())
    # YAML 1.1 (PyYAML) reads the key `on` as the boolean True.
    if True in workflow:
        workflow["on"] = workflow.pop(True)
    on = workflow["on"]
    if isinstance(on, str):
        on = [on]
    if isinstance(on, list):
        on = dict.fromkeys(on)
    workflow["on"] = {event: config or {} for event, config in on.items()}
    return workflow


WORKFLOWS = {path.name: load_workflow(path) for path in WORKFLOW_PATHS}


def all_jobs() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for name, workflow in WORKFLOWS.items():
        for job_id, job in workflow["jobs"].items():
            yield name, job_id, job


def steps_of(job: dict[str, Any]) -> list[dict[str, Any]]:
    return job.get("steps", [])


def needs_of(job: dict[str, Any]) -> list[str]:
    needs = job.get("needs", [])
    return [needs] if isinstance(needs, str) else list(needs)


def action_of(step: dict[str, Any]) -> str:
    """`owner/repo[/path]` of a `uses:` step, without the ref; '' for a `run:` step."""
    return step.get("uses", "").split("@")[0]


def uses_action(job: dict[str, Any], prefix: str) -> bool:
    return any(action_of(step).startswith(prefix) for step in steps_of(job))


def command_of(step: dict[str, Any]) -> str:
    """The dagster-cloud command a dagster-cloud-cli step runs, on one line; '' otherwise."""
    if action_of(step) != f"{DAGSTER_CLOUD_ACTION}/actions/utils/dagster-cloud-cli":
        return ""
    return " ".join(step["with"]["command"].split())


def scripts_of(job: dict[str, Any]) -> list[str]:
    return [step["run"] for step in steps_of(job) if "run" in step]


def readme_test_command() -> str:
    """The test command of the README's "Two commands" block (the text before its comment)."""
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", readme, re.DOTALL):
        for line in block.splitlines():
            command = line.split("#", 1)[0].strip()
            if command.startswith("make test"):
                return command
    raise AssertionError("README.md shows no `make test` command")


def makefile_uv_version() -> str:
    match = re.search(r"^UV_VERSION\s*:?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "the Makefile pins no UV_VERSION"
    return match.group(1)


def locked_version(package: str) -> str:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return next(p["version"] for p in lock["package"] if p["name"] == package)


def code_location_name() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["dagster"][
        "code_location_name"
    ]


# -- GitHub expressions and events -----------------------------------------------------------


class Expression:
    """Evaluates the GitHub Actions expressions the workflows use in `if:` and `env:`: paths
    into the `github` context, string literals, ==, !=, !, &&, || (which, as in GitHub, yield
    an operand, not a boolean), parentheses, true/false/null, and the status functions (a job
    evaluated here has been reached, so success() and always() are true)."""

    TOKEN = re.compile(
        r"\s*(?:(?P<op>\|\||&&|==|!=|!|\(|\))|'(?P<string>(?:[^']|'')*)'"
        r"|(?P<name>[A-Za-z_][\w.-]*)(?P<call>\(\))?)"
    )
    STATUS: ClassVar[dict[str, bool]] = {
        "success": True,
        "always": True,
        "failure": False,
        "cancelled": False,
    }

    def __init__(self, text: str, github: dict[str, Any]) -> None:
        text = text.strip()
        if text.startswith("${{") and text.endswith("}}"):
            text = text[3:-2].strip()
        self.tokens: list[tuple[str, Any]] = []
        position = 0
        while position < len(text):
            match = self.TOKEN.match(text, position)
            assert match and match.end() > position, f"cannot read {text[position:]!r}"
            position = match.end()
            if match["op"]:
                self.tokens.append(("op", match["op"]))
            elif match["string"] is not None:
                self.tokens.append(("value", match["string"].replace("''", "'")))
            elif match["call"]:
                self.tokens.append(("value", self.STATUS[match["name"]]))
            else:
                self.tokens.append(("value", self._lookup(match["name"], github)))
        self.position = 0

    @staticmethod
    def _lookup(name: str, github: dict[str, Any]) -> Any:
        literals = {"true": True, "false": False, "null": None}
        if name in literals:
            return literals[name]
        context, *path = name.split(".")
        assert context == "github", f"no stand-in for the {context} context"
        value: Any = github
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def evaluate(self) -> Any:
        value = self._or()
        assert self.position == len(self.tokens), "trailing tokens"
        return value

    def _take(self, op: str) -> bool:
        if self.position < len(self.tokens) and self.tokens[self.position] == ("op", op):
            self.position += 1
            return True
        return False

    def _or(self) -> Any:
        value = self._and()
        while self._take("||"):
            right = self._and()
            value = value or right
        return value

    def _and(self) -> Any:
        value = self._not()
        while self._take("&&"):
            right = self._not()
            value = value and right
        return value

    def _not(self) -> Any:
        return not self._not() if self._take("!") else self._comparison()

    def _comparison(self) -> Any:
        left = self._atom()
        if self._take("=="):
            return left == self._atom()
        if self._take("!="):
            return left != self._atom()
        return left

    def _atom(self) -> Any:
        if self._take("("):
            value = self._or()
            assert self._take(")"), "unbalanced parentheses"
            return value
        kind, value = self.tokens[self.position]
        assert kind == "value", f"unexpected {value!r}"
        self.position += 1
        return value


def variables_of(environment: str | None) -> dict[str, str]:
    """The `vars` context of a job in ``environment`` (None: a job without one)."""
    return {**REPOSITORY_VARIABLES, **ENVIRONMENT_VARIABLES.get(environment or "", {})}


def resolve(text: str, github: dict[str, Any], variables: dict[str, str] | None = None) -> str:
    """``text`` with each `${{ ... }}` replaced: variables and stand-ins first, else evaluated.
    An unset variable is '' (as in GitHub)."""

    def value(match: re.Match[str]) -> str:
        expression = match.group(1).strip()
        if expression.startswith("vars."):
            assert variables is not None, f"{expression} outside a job"
            return variables.get(expression.removeprefix("vars."), "")
        if expression in STAND_INS:
            return STAND_INS[expression]
        result = Expression(expression, github).evaluate()
        if isinstance(result, bool):
            return str(result).lower()
        return "" if result is None else str(result)

    return re.sub(r"\$\{\{(.*?)\}\}", value, text)


REPOSITORY = "acme/ml-platform"


def push(ref: str) -> dict[str, Any]:
    return {
        "event_name": "push",
        "ref": ref,
        "ref_name": ref.split("/", 2)[2],
        "sha": HEAD_SHA,
        "run_id": "123456789",
        "repository": REPOSITORY,
        "event": {},
    }


def pull_request(action: str, *, fork: bool = False) -> dict[str, Any]:
    head = "someone/ml-platform" if fork else REPOSITORY
    return {
        "event_name": "pull_request",
        "ref": f"refs/pull/{PR_NUMBER}/merge",
        "ref_name": f"{PR_NUMBER}/merge",
        "sha": "f" * 40,  # the merge commit GitHub made
        "run_id": "123456789",
        "repository": REPOSITORY,
        "event": {
            "action": action,
            "pull_request": {
                "number": PR_NUMBER,
                "head": {"sha": HEAD_SHA, "repo": {"full_name": head}},
                "base": {"ref": "main"},
            },
        },
    }


def is_triggered(workflow: dict[str, Any], github: dict[str, Any]) -> bool:
    on, event = workflow["on"], github["event_name"]
    if event not in on:
        return False
    config = on[event]
    if event == "pull_request":
        types = config.get("types", ["opened", "synchronize", "reopened"])
        return github["event"]["action"] in types
    branches, tags = config.get("branches"), config.get("tags")
    if branches is None and tags is None:
        return True
    kind, _, name = github["ref"].removeprefix("refs/").partition("/")
    patterns = branches if kind == "heads" else tags
    return patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def jobs_that_run(workflow: dict[str, Any], github: dict[str, Any]) -> set[str]:
    if not is_triggered(workflow, github):
        return set()
    ran: dict[str, bool] = {}
    pending = dict(workflow["jobs"])
    while pending:
        for job_id, job in list(pending.items()):
            needs = needs_of(job)
            if not all(need in ran for need in needs):
                continue
            condition = str(job.get("if", "success()"))
            # Without a status function GitHub adds success(): a job whose needs did not
            # run is skipped.
            has_status = re.search(r"\b(success|always|failure|cancelled)\(\)", condition)
            reached = bool(has_status) or all(ran[need] for need in needs)
            ran[job_id] = reached and bool(Expression(condition, github).evaluate())
            del pending[job_id]
    return {job_id for job_id, did_run in ran.items() if did_run}


def role_of(job: dict[str, Any]) -> str | None:
    """What a job is for, recognised by what it runs (not by its name)."""
    commands = [command_of(step) for step in steps_of(job)]
    scripts = "\n".join(scripts_of(job))
    if "ml-platform branch cleanup" in scripts:
        return "cleanup"
    if any(command.startswith("ci deploy") for command in commands):
        return "deploy"
    if "ml-platform pipelines publish" in scripts:
        return "publish"
    if any(command.startswith("job launch") for command in commands):
        return "smoke"
    if uses_action(job, f"{DAGSTER_CLOUD_ACTION}/actions/utils/prerun"):
        return "close branch deployment"
    if any(script.strip() == readme_test_command() for script in scripts_of(job)):
        return "tests"
    return None


def job_with_role(role: str) -> tuple[str, dict[str, Any]]:
    (found,) = [(name, job) for name, _, job in all_jobs() if role_of(job) == role]
    return found


def environment_of(job: dict[str, Any], github: dict[str, Any]) -> str | None:
    """The GitHub environment a job runs in for an event (its name evaluated), or None."""
    environment = job.get("environment")
    if environment is None:
        return None
    name = environment["name"] if isinstance(environment, dict) else environment
    return resolve(str(name), github, {})


def step_env(role: str, step: dict[str, Any], github: dict[str, Any]) -> dict[str, str]:
    """A step's environment (workflow, job and step `env:`), its expressions resolved with the
    variables of the job's environment for this event."""
    name, job = job_with_role(role)
    variables = variables_of(environment_of(job, github))
    env = {**WORKFLOWS[name].get("env", {}), **job.get("env", {}), **step.get("env", {})}
    return {key: resolve(str(value), github, variables) for key, value in env.items()}


def step_named(role: str, name: str) -> dict[str, Any]:
    _, job = job_with_role(role)
    (step,) = [step for step in steps_of(job) if step.get("name") == name]
    return step


def step_running(role: str, text: str) -> dict[str, Any]:
    _, job = job_with_role(role)
    (step,) = [step for step in steps_of(job) if text in step.get("run", "")]
    return step


SCENARIOS = {
    "push to main": (push("refs/heads/main"), {"tests", "deploy"}),
    "push to a feature branch": (push("refs/heads/feature/split"), {"tests"}),
    "version tag": (push("refs/tags/v1.2.0"), {"tests", "publish"}),
    "pull request opened": (pull_request("opened"), {"tests", "deploy", "smoke"}),
    "pull request updated": (pull_request("synchronize"), {"tests", "deploy", "smoke"}),
    "pull request reopened": (pull_request("reopened"), {"tests", "deploy", "smoke"}),
    "pull request closed": (pull_request("closed"), {"close branch deployment", "cleanup"}),
    # No secrets or OIDC tokens for a fork's pull request: tested, never deployed.
    "fork's pull request opened": (pull_request("opened", fork=True), {"tests"}),
    "fork's pull request closed": (pull_request("closed", fork=True), set()),
}


# -- linters ---------------------------------------------------------------------------------


def test_the_workflows_exist():
    assert {"tests.yml", "deploy.yml", "publish-pipelines.yml"} <= set(WORKFLOWS)


def test_actionlint_finds_nothing():
    command = [str(BIN / "actionlint"), "-no-color"]
    # actionlint checks `run:` scripts with shellcheck when it can find it (GitHub's runners
    # have it); a shellcheck in the venv is used too.
    shellcheck = shutil.which("shellcheck") or (
        str(BIN / "shellcheck") if (BIN / "shellcheck").exists() else None
    )
    if shellcheck:
        command.append(f"-shellcheck={shellcheck}")
    result = subprocess.run(
        [*command, *(str(path.relative_to(ROOT)) for path in WORKFLOW_PATHS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_workflows_match_the_github_workflow_schema():
    result = subprocess.run(
        [
            str(BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.github-workflows",
            *map(str, WORKFLOW_PATHS),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- security --------------------------------------------------------------------------------


def test_every_job_declares_minimal_permissions():
    for name, workflow in WORKFLOWS.items():
        # Jobs get nothing by default; each one says what it needs.
        assert workflow.get("permissions") == {}, name
    for name, job_id, job in all_jobs():
        permissions = job.get("permissions")
        assert isinstance(permissions, dict), f"{name}:{job_id} declares no permissions map"
        assert set(permissions.values()) <= {"read", "write", "none"}, f"{name}:{job_id}"
        written = {scope for scope, access in permissions.items() if access == "write"}
        assert written <= WRITABLE_SCOPES, f"{name}:{job_id} writes {written - WRITABLE_SCOPES}"
        comments = uses_action(job, f"{DAGSTER_CLOUD_ACTION}/actions/utils/ci-init") or any(
            command_of(step).startswith("ci notify") for step in steps_of(job)
        )
        assert ("pull-requests" in written) == comments, f"{name}:{job_id}"


def test_id_token_write_exactly_where_oidc_is_used():
    for name, job_id, job in all_jobs():
        oidc = any(uses_action(job, action) for action in OIDC_ACTIONS)
        assert (job["permissions"].get("id-token") == "write") == oidc, f"{name}:{job_id}"


def test_cloud_credentials_come_from_oidc_only():
    for name, job_id, job in all_jobs():
        for step in steps_of(job):
            inputs = step.get("with", {})
            if action_of(step) == "aws-actions/configure-aws-credentials":
                assert inputs.get("role-to-assume") == "${{ vars.AWS_ROLE_ARN }}", job_id
                assert not {"aws-access-key-id", "aws-secret-access-key"} & set(inputs), job_id
            if action_of(step) == "google-github-actions/auth":
                assert inputs.get("workload_identity_provider") == (
                    "${{ vars.GCP_WORKLOAD_IDENTITY_PROVIDER }}"
                ), f"{name}:{job_id}"
                assert inputs.get("service_account") == "${{ vars.GCP_SERVICE_ACCOUNT }}"
                assert "credentials_json" not in inputs, f"{name}:{job_id}"


def reaches_outside(job: dict[str, Any]) -> bool:
    """Whether a job holds a credential of Dagster+ or a cloud: an OIDC action, or a secret
    other than the job's own GITHUB_TOKEN."""
    text = yaml.safe_dump(job)
    secrets = set(re.findall(r"\bsecrets\.(\w+)", text)) - {"GITHUB_TOKEN"}
    return bool(secrets) or any(uses_action(job, action) for action in OIDC_ACTIONS)


def test_every_job_with_a_credential_runs_in_a_github_environment():
    """Secrets and the OIDC subject come from the job's environment: a job without one would
    get repository-level values, which any pull request's copy of the workflow can read."""
    for name, job_id, job in all_jobs():
        if reaches_outside(job):
            assert job.get("environment"), f"{name}:{job_id} has a credential but no environment"
        else:
            assert not job.get("environment"), f"{name}:{job_id} needs no environment"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_only_main_and_releases_run_in_production(scenario: str):
    """`production` (prod's token, roles, task role and repositories) for a push to main or a
    release tag, and for nothing else; every pull request job that holds a credential runs in
    `branch-deployments`. The environment's own deployment branch policy (main and v* only,
    deploy/gcp/README.md step 6) refuses `production` to a pull request that edits this."""
    github, _ = SCENARIOS[scenario]
    prod_ref = github["event_name"] == "push" and (
        github["ref"] == "refs/heads/main" or github["ref"].startswith("refs/tags/v")
    )
    for workflow in WORKFLOWS.values():
        for job_id in jobs_that_run(workflow, github):
            job = workflow["jobs"][job_id]
            environment = environment_of(job, github)
            if not reaches_outside(job):
                assert environment is None, job_id
            elif prod_ref:
                assert environment == PRODUCTION, job_id
            else:
                assert github["event_name"] == "pull_request"
                assert environment == BRANCH_DEPLOYMENTS, job_id


def test_each_environment_holds_its_own_sides_identities():
    """The names whose values differ between prod and pull requests are environment
    variables, set in both environments (and not at repository level, which a job without an
    environment would read); the workflows read every one of them."""
    per_side = {
        "AWS_ROLE_ARN",
        "ECR_REPOSITORY_URI",
        "GCP_SERVICE_ACCOUNT",
        "CODE_LOCATION_TASK_ROLE_ARN",
        "GCP_CREDENTIAL_CONFIG_SECRET_ARN",
        "COMPONENT_IMAGE_REPOSITORY",
        "ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY",
        "ML_PLATFORM_VERTEX_SERVICE_ACCOUNT",
    }
    assert not per_side & set(REPOSITORY_VARIABLES)
    prod, branch = ENVIRONMENT_VARIABLES[PRODUCTION], ENVIRONMENT_VARIABLES[BRANCH_DEPLOYMENTS]
    for name in per_side:
        assert prod[name] and branch[name] and prod[name] != branch[name], name
    read = {
        name for path in WORKFLOW_PATHS for name in re.findall(r"\bvars\.(\w+)", path.read_text())
    }
    assert per_side <= read
    # Branch alerts never reach prod's Slack channel.
    assert not branch.get("SLACK_TOKEN_SECRET_ARN")
    assert not branch.get("ML_PLATFORM_SLACK_CHANNEL")
    readme = (ROOT / "deploy" / "gcp" / "README.md").read_text()
    for name in per_side | {"DAGSTER_CLOUD_API_TOKEN", "ML_PLATFORM_SLACK_BRANCH_CHANNEL"}:
        assert re.search(rf"^\| `{name}` \|", readme, re.M), f"deploy/gcp/README.md: {name}"


@pytest.mark.parametrize("path", WORKFLOW_PATHS, ids=lambda path: path.name)
def test_no_long_lived_keys_and_only_known_secrets_and_variables(path: Path):
    text = path.read_text()
    assert not LONG_LIVED_KEYS.findall(text)
    assert set(re.findall(r"\bsecrets\.(\w+)", text)) <= SECRETS
    assert set(re.findall(r"\bvars\.(\w+)", text)) <= VARIABLE_NAMES


def uses_lines() -> list[tuple[str, str]]:
    """Every `uses:` line of the workflows, as (file name, line)."""
    return [
        (path.name, line)
        for path in WORKFLOW_PATHS
        for line in path.read_text().splitlines()
        if re.match(r"\s*(-\s+)?uses:", line)
    ]


def test_every_action_is_pinned_by_commit_sha_with_its_tag():
    """`owner/repo[/path]@<40 hex> # vX.Y.Z`: a tag can be moved to other code, a commit
    cannot. One action, one commit: the same tag everywhere."""
    assert uses_lines()
    pins: dict[str, set[tuple[str, str]]] = {}
    for name, line in uses_lines():
        action = line.split("uses:", 1)[1].strip().split("@")[0]
        repository = "/".join(action.split("/")[:2])
        match = PINNED_USES.match(line)
        assert match, f"{name}: not pinned by commit SHA with its tag in a comment: {line.strip()}"
        pins.setdefault(repository, set()).add((match["sha"], match["tag"]))
    assert all(len(refs) == 1 for refs in pins.values()), pins


def test_dagster_cloud_action_is_pinned_by_commit():
    lines = [line for _, line in uses_lines() if DAGSTER_CLOUD_ACTION in line]
    assert lines and all(PINNED_USES.match(line) for line in lines)


# The commands the deploy runs through the action, each present in the pinned action's
# dagster-cloud-cli (dagster_cloud_cli/commands/{ci,job} of the 1.13.7 wheel on PyPI, the CLI
# its pex bundles).
ACTION_CLI_COMMANDS = {
    ("ci", name) for name in ("template", "init", "set-build-output", "deploy", "notify", "status")
} | {("job", "launch")}


def test_dagster_cloud_action_bundles_a_cli_of_the_locked_dagster_cloud_minor():
    """The action bundles its own dagster-cloud CLI (its tags follow dagster-cloud's releases).
    It must be a release of the locked dagster-cloud's minor version, and no newer than it, so
    the CLI speaks the API of the agent and code location built with the lock."""
    lines = {
        line.split("uses:", 1)[1].strip().split("#")[0].strip(): line for _, line in uses_lines()
    }
    tags = {
        PINNED_USES.match(lines[step["uses"]])["tag"]
        for _, _, job in all_jobs()
        for step in steps_of(job)
        if action_of(step).startswith(DAGSTER_CLOUD_ACTION)
    }
    assert len(tags) == 1, tags
    action = tuple(int(part) for part in tags.pop().removeprefix("v").split("."))
    locked = tuple(int(part) for part in locked_version("dagster-cloud").split("."))
    assert action[:2] == locked[:2] and action <= locked, (action, locked)
    used = {
        tuple(step["with"]["command"].split()[:2])
        for _, _, job in all_jobs()
        for step in steps_of(job)
        if action_of(step).startswith(DAGSTER_CLOUD_ACTION) and "command" in step.get("with", {})
    }
    assert used <= ACTION_CLI_COMMANDS, used


def test_setup_uv_installs_the_makefiles_uv():
    versions = [
        step["with"]["version"]
        for _, _, job in all_jobs()
        for step in steps_of(job)
        if action_of(step) == "astral-sh/setup-uv"
    ]
    assert versions, "no workflow sets up uv"
    assert set(versions) == {makefile_uv_version()}


def test_every_workflow_serialises_its_runs_and_every_job_has_a_timeout():
    for name, workflow in WORKFLOWS.items():
        assert workflow["concurrency"]["group"], name
    for name, job_id, job in all_jobs():
        assert 0 < job["timeout-minutes"] <= 90, f"{name}:{job_id}"
        # A pinned runner image: the test job relies on what the image ships.
        assert not str(job["runs-on"]).endswith("-latest"), f"{name}:{job_id}"


# -- which jobs run when ---------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_which_jobs_run_for_each_event(scenario: str):
    github, expected = SCENARIOS[scenario]
    roles = [
        role_of(workflow["jobs"][job_id])
        for workflow in WORKFLOWS.values()
        for job_id in jobs_that_run(workflow, github)
    ]
    assert None not in roles, "a job with no recognised role runs"
    assert sorted(roles) == sorted(expected)


def test_the_test_workflow_runs_exactly_the_readme_test_command():
    command = readme_test_command()
    assert command == "make test"
    workflow = WORKFLOWS["tests.yml"]
    assert workflow["on"] == {"push": {}, "pull_request": {}}, "every push and pull request"
    (job,) = workflow["jobs"].values()
    scripts = [script.strip() for script in scripts_of(job)]
    assert scripts.count(command) == 1
    # Nothing else runs the linters or the suite: CI runs what a developer runs.
    others = [script for script in scripts if script != command]
    assert not [s for s in others if re.search(r"\b(pytest|ruff|uv (sync|run))\b", s)]


def test_the_test_workflow_caches_uv_and_cancels_superseded_runs():
    workflow = WORKFLOWS["tests.yml"]
    group = workflow["concurrency"]["group"]
    assert "github.event.pull_request.number || github.ref" in group
    assert workflow["concurrency"]["cancel-in-progress"]
    (job,) = workflow["jobs"].values()
    caches = [step["with"] for step in steps_of(job) if action_of(step) == "actions/cache"]
    assert len(caches) == 1
    assert "~/.cache/uv" in caches[0]["path"].split()
    assert "hashFiles('uv.lock'" in caches[0]["key"]


# -- the deploy ------------------------------------------------------------------------------


def deploy_sequence() -> list[str]:
    """The deploy job's steps that matter, in order, by what they do."""
    _, job = job_with_role("deploy")
    sequence = []
    for step in steps_of(job):
        if command := command_of(step):
            sequence.append(" ".join(command.split()[:2]))
        elif action_of(step).endswith("/actions/utils/ci-init"):
            sequence.append("ci init")
        elif action_of(step) == "docker/build-push-action":
            sequence.append(f"build {step['with']['target']}")
        elif action_of(step) in (*OIDC_ACTIONS, "aws-actions/amazon-ecr-login"):
            sequence.append(action_of(step))
        elif "ml-platform pipelines publish" in step.get("run", ""):
            sequence.append("publish templates")
    return sequence


def test_the_deploy_follows_the_hybrid_ci_sequence():
    """dagster-cloud-action's Hybrid template: ci init, our own image build and push,
    ci set-build-output, ci deploy; before it, the components image and the templates this
    commit's code location will resolve; dagster_cloud.yaml rendered (and so validated by
    dagster-cloud's models) before any `ci` command reads it. No `ci check`: dagster-cloud 1.13
    deprecates it, and its two checks are `ci template`'s validation and `ci init`'s login."""
    sequence = deploy_sequence()
    order = sequence.index
    assert "ci check" not in sequence
    assert order("google-github-actions/auth") < order("build components")
    assert order("build components") < order("publish templates") < order("ci template")
    assert order("ci template") < order("ci init")
    assert order("aws-actions/amazon-ecr-login") < order("build code-location")
    assert order("ci init") < order("build code-location") < order("ci set-build-output")
    assert order("ci set-build-output") < order("ci deploy")


def test_images_go_to_the_registries_the_variables_name():
    registries = {
        "code-location": "${{ vars.ECR_REPOSITORY_URI }}:",
        "components": "${{ vars.COMPONENT_IMAGE_REPOSITORY }}:",
    }
    builds = [
        step["with"]
        for _, _, job in all_jobs()
        for step in steps_of(job)
        if action_of(step) == "docker/build-push-action"
    ]
    assert {inputs["target"] for inputs in builds} == set(registries)
    for inputs in builds:
        assert str(inputs["push"]).lower() == "true"
        for tag in inputs["tags"].strip().splitlines():
            assert tag.strip().startswith(registries[inputs["target"]]), tag


def run_step(step: dict[str, Any], env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Run a bash step as the runner would; returns what it appended to $GITHUB_ENV."""
    github_env = tmp_path / "github_env"
    github_env.touch()
    subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", step["run"]],
        cwd=ROOT,
        env={
            "PATH": os.environ["PATH"],
            **env,
            "GITHUB_ENV": str(github_env),
            "GITHUB_STEP_SUMMARY": str(tmp_path / "summary"),
        },
        check=True,
    )
    return dict(line.split("=", 1) for line in github_env.read_text().splitlines())


def deploy_environment(github: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    """The deploy job's environment once the tags and the components image are recorded."""
    env = step_env("deploy", {}, github) | {"GITHUB_EVENT_NAME": github["event_name"]}
    for text in ("IMAGE_TAG=", "ML_PLATFORM_COMPONENT_IMAGE="):
        step = step_running("deploy", text)
        env |= run_step(step, env | step_env("deploy", step, github), tmp_path)
    return env


@pytest.mark.parametrize("scenario", ["push to main", "pull request opened"])
def test_the_ci_commands_get_dagster_cloud_yaml_rendered_with_every_variable(
    scenario: str, tmp_path: Path, monkeypatch
):
    """dagster_cloud.yaml is a Jinja template. `ci template` renders it, but `ci init` reads
    the file it is given as plain YAML (dagster-cloud 1.13), and
    `ci set-build-output` and `ci deploy` read the file `ci init` recorded: they must all get
    the rendered copy, rendered with every variable the template reads."""
    from dagster_cloud_cli.config.jinja_template_loader import JinjaTemplateLoader
    from dagster_cloud_cli.config.models import load_dagster_cloud_yaml

    template = ROOT / "dagster_cloud.yaml"
    if not template.exists():
        pytest.skip("no dagster_cloud.yaml yet")
    _, job = job_with_role("deploy")
    (render,) = [s for s in steps_of(job) if command_of(s).startswith("ci template")]
    rendered_path = command_of(render).split(">")[1].strip().strip('"')
    (init,) = [s for s in steps_of(job) if action_of(s).endswith("/actions/utils/ci-init")]
    assert resolve(init["with"]["dagster_cloud_yaml_path"], {}) == resolve(
        rendered_path.replace("$RUNNER_TEMP", "${{ runner.temp }}"), {}
    )

    github, _ = SCENARIOS[scenario]
    variables = variables_of(environment_of(job, github))
    env = deploy_environment(github, tmp_path)
    read = set(re.findall(r"get_env\(\s*'(\w+)'", template.read_text()))
    assert read <= set(env), (
        f"dagster_cloud.yaml reads variables the deploy lacks: {read - set(env)}"
    )
    for name in read:
        monkeypatch.setenv(name, env[name])
    (location,) = load_dagster_cloud_yaml(
        JinjaTemplateLoader().render(str(template), context={})
    ).locations
    assert location.location_name == code_location_name()
    assert WORKFLOWS["deploy.yml"]["env"]["LOCATION_NAME"] == location.location_name
    assert location.build.registry == variables["ECR_REPOSITORY_URI"]
    container_env = dict(e.split("=", 1) for e in location.container_context["ecs"]["env_vars"])
    # The code location resolves the templates this deploy published, built on its image.
    assert container_env["ML_PLATFORM_TEMPLATE_TAG"] == f"sha-{HEAD_SHA[:12]}"
    assert container_env["ML_PLATFORM_COMPONENT_IMAGE"] == (
        f"{variables['COMPONENT_IMAGE_REPOSITORY']}@{DIGEST}"
    )


def rendered_location(env: dict[str, str], tmp_path: Path, monkeypatch) -> dict[str, Any]:
    """dagster_cloud.yaml rendered in ``env`` as `ci template` does, then the document `ci
    deploy` sends for the location (dagster_cloud_cli.config_utils.get_location_document)."""
    from dagster_cloud_cli.config.loader import DagsterCloudLocationsConfigLoader
    from dagster_cloud_cli.config_utils import get_location_document

    template = ROOT / "dagster_cloud.yaml"
    for name in set(re.findall(r"get_env\(\s*'(\w+)'", template.read_text())):
        monkeypatch.setenv(name, env.get(name, ""))
    (location,) = DagsterCloudLocationsConfigLoader.load_from_template(
        str(template), context={}
    ).locations
    rendered = tmp_path / "rendered-dagster_cloud.yaml"
    rendered.write_text(yaml.safe_dump({"locations": [location.model_dump(exclude_none=True)]}))
    return get_location_document(
        location.location_name, {"location_file": str(rendered), "image": "image:tag"}
    )


@pytest.mark.parametrize("scenario", ["push to main", "pull request opened"])
def test_each_deploy_renders_its_own_sides_agent_task_role_and_secret(
    scenario: str, tmp_path: Path, monkeypatch
):
    """What reaches Dagster+ for the location: prod's task role, credential secret and runner
    for prod; the branch agent's task role, the branch credential secret, runner and Slack
    channel for a pull request. The document passes
    dagster-cloud's own location schema (what the agent validates)."""
    from dagster_cloud.workspace.config_schema import validate_workspace_location

    github, _ = SCENARIOS[scenario]
    _, job = job_with_role("deploy")
    environment = environment_of(job, github)
    variables = ENVIRONMENT_VARIABLES[environment]
    document = rendered_location(deploy_environment(github, tmp_path), tmp_path, monkeypatch)
    assert validate_workspace_location(document) == []
    ecs = document["container_context"]["ecs"]
    assert ecs["task_role_arn"] == variables["CODE_LOCATION_TASK_ROLE_ARN"]
    (credential,) = [s for s in ecs["secrets"] if s["name"] == "ML_PLATFORM_GCP_CREDENTIAL_CONFIG"]
    assert credential["valueFrom"] == variables["GCP_CREDENTIAL_CONFIG_SECRET_ARN"]
    env = dict(item.split("=", 1) for item in ecs["env_vars"])
    assert (
        env["ML_PLATFORM_VERTEX_SERVICE_ACCOUNT"] == variables["ML_PLATFORM_VERTEX_SERVICE_ACCOUNT"]
    )
    assert "agent_queue" not in document  # the agents are told apart by deployment
    channel = (
        "ML_PLATFORM_SLACK_CHANNEL"
        if environment == PRODUCTION
        else "ML_PLATFORM_SLACK_BRANCH_CHANNEL"
    )
    assert {name: value for name, value in env.items() if "SLACK" in name} == {
        channel: variables[channel]
    }


def test_the_variable_check_names_a_missing_pipeline_runner(tmp_path: Path):
    """ML_PLATFORM_VERTEX_SERVICE_ACCOUNT is required: without it the first training run
    would fail (or run as the Compute Engine default account), long after the deploy."""
    github = pull_request("opened")
    step = step_named("deploy", "Check the variables dagster_cloud.yaml needs")
    env = step_env("deploy", step, github)
    run_step(step, env, tmp_path)  # every variable set: passes
    del env["ML_PLATFORM_VERTEX_SERVICE_ACCOUNT"]
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", step["run"]],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "ML_PLATFORM_VERTEX_SERVICE_ACCOUNT" in result.stdout


@pytest.mark.parametrize(
    ("scenario", "deployment"),
    [("push to main", Deployment.PROD), ("pull request opened", Deployment.BRANCH)],
)
def test_the_deploy_publishes_its_commits_templates_as_its_own_deployment(
    scenario: str, deployment: Deployment, tmp_path: Path
):
    github, _ = SCENARIOS[scenario]
    step = step_named("deploy", "Publish this commit's pipeline templates")
    assert step["run"].strip().endswith('publish --tag "$ML_PLATFORM_TEMPLATE_TAG"')
    env = deploy_environment(github, tmp_path) | step_env("deploy", step, github)
    settings = Settings.from_env(env)
    assert settings.deployment is deployment
    # Each side's own repositories: a pull request publishes nothing into prod's.
    environment = PRODUCTION if deployment is Deployment.PROD else BRANCH_DEPLOYMENTS
    variables = ENVIRONMENT_VARIABLES[environment]
    assert settings.component_image == f"{variables['COMPONENT_IMAGE_REPOSITORY']}@{DIGEST}"
    assert settings.artifact_registry_url == (
        f"https://europe-west4-kfp.pkg.dev/acme-ml/{variables['ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY']}"
    )
    if deployment is Deployment.BRANCH:
        assert settings.pull_request_id == str(PR_NUMBER)
        assert "-pr" in settings.artifact_registry_url


def test_what_prod_runs_is_tagged_prod_once_deployed_and_only_from_main(tmp_path: Path):
    _, job = job_with_role("deploy")
    names = [step.get("name") for step in steps_of(job)]
    step = step_named("deploy", "Mark what prod runs")
    # After the deploy succeeded (a failed deploy leaves the tags on what prod still runs).
    assert names.index("Mark what prod runs") > names.index("Deploy to Dagster+")
    assert "if" in step and "always()" not in step["if"]
    for scenario, marks in [("push to main", True), ("pull request opened", False)]:
        github, _ = SCENARIOS[scenario]
        assert bool(Expression(step["if"], github).evaluate()) is marks, scenario
    # Images built from main carry the prefix ECR's lifecycle policy keeps (agent.yaml).
    pull_request_env = deploy_environment(SCENARIOS["pull request opened"][0], tmp_path)
    assert pull_request_env["IMAGE_TAG"].startswith(HEAD_SHA)
    github, _ = SCENARIOS["push to main"]
    env = deploy_environment(github, tmp_path) | step_env("deploy", step, github)
    assert env["IMAGE_TAG"].startswith(f"main-{HEAD_SHA}-")
    assert Settings.from_env(env).deployment is Deployment.PROD
    # The same templates as the publish step (same tag, same image), now also tagged prod,
    # and the components image prod's templates name, by digest.
    assert 'publish --tag "$ML_PLATFORM_TEMPLATE_TAG" --tag prod' in step["run"]
    assert '"${COMPONENT_IMAGE_REPOSITORY}:prod"' in step["run"]
    assert step["run"].rstrip().endswith('"$ML_PLATFORM_COMPONENT_IMAGE"')


def test_the_smoke_run_is_valid_for_the_code_locations_definitions(local_settings: Settings):
    """The job, asset selection and run config the smoke step launches are checked against
    the definitions as the server would (a multi-asset that cannot be subset, an op name, a
    config field), so a rename breaks this test rather than every branch deployment."""
    import dagster as dg

    from ml_platform.definitions import build_definitions

    name, job = job_with_role("smoke")
    assert "deploy" in [role_of(WORKFLOWS[name]["jobs"][need]) for need in needs_of(job)]
    (launch,) = [s for s in steps_of(job) if command_of(s).startswith("job launch")]
    env = step_env("smoke", launch, pull_request("opened"))
    words = shlex.split(launch["with"]["command"])
    words = words[: words.index(">")] if ">" in words else words
    options: dict[str, list[str]] = {}
    for option, value in zip(words[2::2], words[3::2], strict=True):
        options.setdefault(option, []).append(re.sub(r"\$(\w+)", lambda m: env[m[1]], value))
    # `--wait` exits 0 even when the run fails (dagster-cloud 1.13); the next step polls.
    assert "--wait" not in words
    assert options["--deployment"] == [STAND_INS["needs.deploy.outputs.deployment"]]
    assert options["--location"] == [code_location_name()]
    assert json.loads(options["--tags"][0])["ci/smoke"] == "true"

    defs = build_definitions(local_settings)
    subset = defs.resolve_job_def(options["--job"][0]).get_subset(
        asset_selection={dg.AssetKey(key.split("/")) for key in options["--asset-key"]}
    )
    dg.validate_run_config(subset, json.loads(options["--config-json"][0]))
    # The ingest and the dbt source tests on its tables: nothing that starts a Vertex AI job.
    assert set(subset.graph.node_names()) <= {"ingest_nycflights13", "dbt_features"}


def test_the_smoke_run_is_awaited_and_terminated_if_abandoned():
    _, job = job_with_role("smoke")
    (wait,) = [script for script in scripts_of(job) if "runOrError" in script]
    assert "SUCCESS)" in wait and "terminateRun" in wait
    assert re.search(r"trap .*terminate.* INT TERM", wait)


# -- cleanup and releases --------------------------------------------------------------------


def test_the_cleanup_drops_exactly_the_pull_requests_branch_data():
    github = pull_request("closed")
    step = step_running("cleanup", "ml-platform branch cleanup")
    env = step_env("cleanup", step, github)
    assert step["run"].strip().endswith('--pull-request "$PR_NUMBER"')
    assert env["PR_NUMBER"] == str(PR_NUMBER)
    settings = Settings.from_env(env)
    # The CLI runs as the PR's branch deployment: the names it drops are the PR's.
    assert settings.deployment is Deployment.BRANCH
    assert settings.pull_request_id == str(PR_NUMBER)
    assert settings.datasets == {
        logical: f"flights_{logical}_pr_{PR_NUMBER}" for logical in DATASETS
    }
    assert settings.pipeline_root == (
        f"gs://{REPOSITORY_VARIABLES['ML_PLATFORM_GCS_BUCKET']}/pipeline_root/branch/pr-{PR_NUMBER}"
    )


def test_templates_are_published_for_prod_naming_the_components_image_by_digest():
    assert WORKFLOWS["publish-pipelines.yml"]["on"] == {"push": {"tags": ["v*"]}}
    github = push("refs/tags/v1.2.0")
    step = step_running("publish", "ml-platform pipelines publish")
    assert '--tag "$TAG"' in step["run"] and "--tag latest" in step["run"]
    # The image the build step pushed, by its digest (immutable), never by a tag.
    assert step["env"]["ML_PLATFORM_COMPONENT_IMAGE"] == (
        "${{ vars.COMPONENT_IMAGE_REPOSITORY }}@${{ steps.components.outputs.digest }}"
    )
    _, job = job_with_role("publish")
    (build,) = [s for s in steps_of(job) if s.get("id") == "components"]
    assert action_of(build) == "docker/build-push-action"
    assert build["with"]["target"] == "components"
    env = step_env("publish", step, github)
    assert env["TAG"] == "v1.2.0"
    settings = Settings.from_env(env)
    assert settings.deployment is Deployment.PROD
    assert settings.component_image.endswith(f"@{DIGEST}")


def test_the_dockerfile_has_the_targets_the_workflows_build():
    path = ROOT / "Dockerfile"
    if not path.exists():
        pytest.skip("no Dockerfile yet")
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", path.read_text(), re.IGNORECASE | re.M))
    targets = {
        step["with"]["target"]
        for _, _, job in all_jobs()
        for step in steps_of(job)
        if action_of(step) == "docker/build-push-action"
    }
    assert targets == {"code-location", "components"}
    assert targets <= stages
