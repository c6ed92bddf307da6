"""deploy/gcp/iam-bindings.yaml: the Google Cloud identities, checked offline.

No Google API can be reached from here, so the bindings are checked as data, and their IAM
conditions are evaluated by a small evaluator of the part of CEL that IAM conditions allow on
names (startsWith, endsWith, ==, !=, !, &&, ||, api.getAttribute), against the names
ml_platform.settings gives the prod deployment and branch deployments:

- a branch identity (branch code location, branch pipeline runner, PR CI) holds nothing on a
  prod resource: every binding of it on the shared project or bucket is conditioned to pull
  requests' datasets and `pipeline_root/branch/`, or is one of a few project-level roles that
  reach no data (checked by name, with the reason the YAML gives), and its conditions grant no
  prod dataset, table or object;
- the PR CI identity holds no owner, admin or editor role and no write on prod's repositories;
- prod's and the branch identities are separate: different pools and subjects may act as them,
  none may act as one of the other side, and nobody may act as every account;
- the custom roles hold the permissions the code calls, and no more;
- deploy/gcp/README.md shows exactly the commands rendered from the YAML, and the condition
  files those commands write evaluate like the YAML.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ml_platform.settings import DATASETS, Settings

ROOT = Path(__file__).resolve().parents[2]
GCP_DIR = ROOT / "deploy" / "gcp"
README = GCP_DIR / "README.md"

# Values for the shell variables the README sets ("Before you start").
SHELL = {
    "PROJECT_ID": "acme-ml",
    "PROJECT_NUMBER": "123456789",
    "REGION": "europe-west4",
    "BUCKET": "acme-ml-pipelines",
    "TEMPLATES_REPOSITORY": "pipeline-templates",
    "IMAGES_REPOSITORY": "ml-platform",
    "TEMPLATES_REPOSITORY_PR": "pipeline-templates-pr",
    "IMAGES_REPOSITORY_PR": "ml-platform-pr",
    "GITHUB_REPOSITORY": "acme/ml-platform",
    "POOL": "ml-platform-aws",
    "BRANCH_POOL": "ml-platform-aws-branch",
    "GITHUB_POOL": "github",
    "AWS_ROLE": "arn:aws:sts::123456789012:assumed-role/agent-CodeLocationTaskRole-AbC",
    "BRANCH_AWS_ROLE": "arn:aws:sts::123456789012:assumed-role/agent-BranchCodeLocationTaskRole-D",
}
GCP_ENV = {
    "ML_PLATFORM_GCP_PROJECT": SHELL["PROJECT_ID"],
    "ML_PLATFORM_GCS_BUCKET": SHELL["BUCKET"],
}


def _load_commands_module():
    spec = importlib.util.spec_from_file_location("iam_commands", GCP_DIR / "iam_commands.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


iam_commands = _load_commands_module()
SPEC = iam_commands.load()
ACCOUNTS: dict[str, dict[str, Any]] = SPEC["service_accounts"]
RESOURCES: dict[str, dict[str, Any]] = SPEC["resources"]


def substitute(text: str) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: SHELL[m[1]], text)


def side_of(account: str) -> str:
    return ACCOUNTS[account]["side"]


def bindings(account: str) -> list[dict[str, Any]]:
    return ACCOUNTS[account]["bindings"]


# -- a CEL evaluator for IAM conditions on names --------------------------------------------


class Cel:
    """Evaluates an IAM condition expression for one request: ``resource`` is
    {"name", "type", "service"}, ``api`` the request's API attributes. Only what IAM
    conditions allow on names is known; anything else is an error, so an expression that IAM
    would reject, or that this evaluator would misread, fails the test."""

    TOKEN = re.compile(
        r"\s*(?:(?P<op>\|\||&&|==|!=|!|\(|\)|,|\.)"
        r'|"(?P<dq>[^"\\]*)"|\'(?P<sq>[^\'\\]*)\'|(?P<name>[A-Za-z_]\w*))'
    )
    METHODS = frozenset({"startsWith", "endsWith"})

    def __init__(self, expression: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        position = 0
        expression = expression.strip()
        while position < len(expression):
            match = self.TOKEN.match(expression, position)
            assert match and match.end() > position, f"cannot read {expression[position:]!r}"
            position = match.end()
            if match["op"]:
                self.tokens.append(("op", match["op"]))
            elif match["dq"] is not None or match["sq"] is not None:
                self.tokens.append(("str", match["dq"] if match["dq"] is not None else match["sq"]))
            else:
                self.tokens.append(("name", match["name"]))

    def evaluate(self, resource: dict[str, str], api: dict[str, str] | None = None) -> bool:
        self.context = {"resource": resource, "api": api or {}}
        self.position = 0
        value = self._or()
        assert self.position == len(self.tokens), f"trailing {self.tokens[self.position :]}"
        assert isinstance(value, bool), value
        return value

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self, op: str) -> bool:
        if self._peek() == ("op", op):
            self.position += 1
            return True
        return False

    def _expect(self, kind: str) -> str:
        token = self._peek()
        assert token and token[0] == kind, f"expected {kind}, got {token}"
        self.position += 1
        return token[1]

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
        if self._take("!"):
            return not self._not()
        left = self._postfix()
        if self._take("=="):
            return left == self._postfix()
        if self._take("!="):
            return left != self._postfix()
        return left

    def _args(self) -> list[Any]:
        args: list[Any] = []
        if self._take(")"):
            return args
        while True:
            args.append(self._or())
            if self._take(")"):
                return args
            assert self._take(","), "expected , or )"

    def _postfix(self) -> Any:
        if self._take("("):
            value = self._or()
            assert self._take(")"), "unbalanced parentheses"
        elif (self._peek() or ("",))[0] == "str":
            value = self._expect("str")
        else:
            name = self._expect("name")
            assert name in self.context, f"unknown identifier {name}"
            value = self.context[name]
        while self._take("."):
            member = self._expect("name")
            if self._take("("):
                args = self._args()
                if isinstance(value, str):
                    assert member in self.METHODS, f"{member}() is not allowed on names"
                    assert len(args) == 1 and isinstance(args[0], str)
                    value = getattr(value, member.lower())(args[0])
                else:
                    assert value is self.context["api"] and member == "getAttribute", member
                    key, default = args
                    value = value.get(key, default)
            else:
                assert isinstance(value, dict) and value is self.context["resource"], member
                assert member in {"name", "type", "service"}, member
                value = value.get(member, "")
        return value


def condition(name: str) -> Cel:
    return Cel(substitute(SPEC["conditions"][name]["expression"]))


# -- the names prod and branch deployments use ----------------------------------------------

PROJECT, BUCKET = SHELL["PROJECT_ID"], SHELL["BUCKET"]
PROD = Settings.from_env({"DAGSTER_CLOUD_DEPLOYMENT_NAME": "prod", **GCP_ENV})
BRANCHES = [
    Settings.from_env(
        {
            "DAGSTER_CLOUD_DEPLOYMENT_NAME": f"pr-{number}",
            "DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT": "1",
            "DAGSTER_CLOUD_PULL_REQUEST_ID": number,
            **GCP_ENV,
        }
    )
    for number in ("7", "42", "1234")
]


def dataset_resources(project: str, dataset: str) -> list[dict[str, str]]:
    """A dataset, and a table, a view-like table with `_pr_` in its name, a routine and a model
    in it: what BigQuery authorises requests on."""
    base = f"projects/{project}/datasets/{dataset}"
    service = "bigquery.googleapis.com"
    return [
        {"name": base, "type": f"{service}/Dataset", "service": service},
        {"name": f"{base}/tables/flights", "type": f"{service}/Table", "service": service},
        {"name": f"{base}/tables/copy_pr_7", "type": f"{service}/Table", "service": service},
        {"name": f"{base}/routines/f", "type": f"{service}/Routine", "service": service},
        {"name": f"{base}/models/m", "type": f"{service}/Model", "service": service},
    ]


def object_resource(bucket: str, name: str) -> dict[str, str]:
    return {
        "name": f"projects/_/buckets/{bucket}/objects/{name}",
        "type": "storage.googleapis.com/Object",
        "service": "storage.googleapis.com",
    }


def bucket_listing(bucket: str, prefix: str) -> tuple[dict[str, str], dict[str, str]]:
    """A storage.objects.list request: authorised on the bucket, with the request's prefix."""
    resource = {
        "name": f"projects/_/buckets/{bucket}",
        "type": "storage.googleapis.com/Bucket",
        "service": "storage.googleapis.com",
    }
    return resource, {"storage.googleapis.com/objectListPrefix": prefix}


def storage_name(settings: Settings) -> str:
    """The pipeline root's object name prefix in the bucket (without gs://BUCKET/)."""
    return settings.pipeline_root.removeprefix(f"gs://{BUCKET}/")


PROD_REQUESTS: list[tuple[dict[str, str], dict[str, str]]] = [
    *((r, {}) for d in PROD.datasets.values() for r in dataset_resources(PROJECT, d)),
    # Whatever else prod or anyone keeps in the project: any dataset not a PR's.
    *((r, {}) for r in dataset_resources(PROJECT, "flights_raw_backup")),
    *((r, {}) for r in dataset_resources(PROJECT, "pr_7")),
    (object_resource(BUCKET, f"{storage_name(PROD)}/model/1.joblib"), {}),
    (object_resource(BUCKET, "pipeline_root/branch"), {}),
    (object_resource(BUCKET, "pipeline_root/branches/x"), {}),
    (object_resource(BUCKET, "other/pipeline_root/branch/x"), {}),
    bucket_listing(BUCKET, f"{storage_name(PROD)}/"),
    bucket_listing(BUCKET, ""),
    bucket_listing(BUCKET, "pipeline_root/"),
    # The same PR names elsewhere: another project's datasets, another bucket.
    *((r, {}) for r in dataset_resources("other-project", BRANCHES[0].datasets["raw"])),
    (object_resource("other-bucket", f"{storage_name(BRANCHES[0])}/x"), {}),
    ({"name": f"projects/{PROJECT}", "type": "cloudresourcemanager.googleapis.com/Project"}, {}),
]
BRANCH_BIGQUERY = [
    (r, {}) for b in BRANCHES for d in b.datasets.values() for r in dataset_resources(PROJECT, d)
]
BRANCH_STORAGE = [
    request
    for b in BRANCHES
    for request in (
        (object_resource(BUCKET, f"{storage_name(b)}/model/1.joblib"), {}),
        bucket_listing(BUCKET, f"{storage_name(b)}/"),
    )
]


def test_the_names_are_what_settings_gives():
    assert set(PROD.datasets.values()) == {f"flights_{layer}" for layer in DATASETS}
    assert storage_name(PROD) == "pipeline_root/prod"
    for branch in BRANCHES:
        suffix = f"_pr_{branch.pull_request_id}"
        assert all(name.endswith(suffix) for name in branch.datasets.values())
        assert storage_name(branch) == f"pipeline_root/branch/pr-{branch.pull_request_id}"


@pytest.mark.parametrize("name", sorted(SPEC["conditions"]))
def test_no_condition_grants_anything_of_prod(name: str):
    cel = condition(name)
    for resource, api in PROD_REQUESTS:
        assert not cel.evaluate(resource, api), (name, resource, api)


def test_the_conditions_grant_every_pull_requests_data():
    datasets, roots, both = (
        condition("pull-request-datasets"),
        condition("branch-pipeline-roots"),
        condition("branch-data"),
    )
    for resource, api in BRANCH_BIGQUERY:
        assert datasets.evaluate(resource, api) and both.evaluate(resource, api), resource
        assert not roots.evaluate(resource, api), resource
    for resource, api in BRANCH_STORAGE:
        assert roots.evaluate(resource, api) and both.evaluate(resource, api), (resource, api)
        assert not datasets.evaluate(resource, api), resource


def test_the_evaluator_reads_conditions_as_iam_does():
    cel = Cel('resource.name.startsWith("a/") && !(resource.type == "t") || false_ == "x"')
    with pytest.raises(AssertionError, match="unknown identifier"):
        cel.evaluate({"name": "a/b", "type": "u"})
    assert Cel('resource.name.startsWith("a/") && !(resource.type == "t")').evaluate(
        {"name": "a/b", "type": "u"}
    )
    assert not Cel("resource.name.endsWith('/b') && resource.type != 'u'").evaluate(
        {"name": "a/b", "type": "u"}
    )
    assert Cel('api.getAttribute("k", "").startsWith("p/")').evaluate({}, {"k": "p/q"})
    assert not Cel('api.getAttribute("k", "").startsWith("p/")').evaluate({})
    with pytest.raises(AssertionError, match="not allowed"):
        Cel('resource.name.matches("flights_.*_pr_.*")').evaluate({"name": "x"})


# -- the branch identities ------------------------------------------------------------------

BRANCH_ACCOUNTS = sorted(a for a in ACCOUNTS if side_of(a) == "branch")
PROD_ACCOUNTS = sorted(a for a in ACCOUNTS if side_of(a) == "prod")
# Project-level roles a branch identity may hold without a condition: none reaches data (a
# job's tables are authorised on the tables; the custom roles are checked below), and each is
# one IAM conditions cannot scope by name (deploy/gcp/iam-bindings.yaml says why).
UNCONDITIONED_ON_PROJECT = {
    "roles/bigquery.jobUser",
    "projects/${PROJECT_ID}/roles/mlPlatformDatasetCreator",
    "projects/${PROJECT_ID}/roles/mlPlatformPipelineJobSubmitter",
}
# The branch pipeline runner's Vertex AI role: documented there as a residual risk.
UNCONDITIONED_RUNNER_ROLES = {"roles/aiplatform.user"}


def test_the_sides_are_what_the_plan_says():
    assert BRANCH_ACCOUNTS == [
        "ml-platform-ci-pr",
        "ml-platform-dagster-branch",
        "ml-platform-pipelines-branch",
    ]
    assert PROD_ACCOUNTS == ["ml-platform-ci", "ml-platform-dagster", "ml-platform-pipelines"]


@pytest.mark.parametrize("account", BRANCH_ACCOUNTS)
def test_a_branch_identity_holds_nothing_on_prod(account: str):
    for binding in bindings(account):
        target, role = binding["resource"], binding["role"]
        where = f"{account}: {role} on {target}"
        if target.startswith("service_account:"):
            assert side_of(target.split(":", 1)[1]) == "branch", where
            continue
        side = RESOURCES[target]["side"]
        assert side != "prod", where
        if side == "branch":
            continue
        # The shared project and bucket: conditioned to PR names, or a role that reaches no
        # data, with the reason in the YAML.
        if "condition" in binding:
            assert binding["condition"] in SPEC["conditions"], where
            assert "unconditioned" not in binding, where
            continue
        assert RESOURCES[target]["kind"] == "project", f"{where}: unconditioned on the bucket"
        allowed = UNCONDITIONED_ON_PROJECT | (
            UNCONDITIONED_RUNNER_ROLES if account == "ml-platform-pipelines-branch" else set()
        )
        assert role in allowed, f"{where}: unconditioned on the project"
        assert binding.get("unconditioned"), f"{where}: say why it needs no condition"


@pytest.mark.parametrize("account", BRANCH_ACCOUNTS)
def test_a_branch_identitys_data_roles_reach_pull_requests_only(account: str):
    """Every role of a branch identity that reads or writes BigQuery or GCS data is
    conditioned, and its condition grants the pull requests' names and none of prod's."""
    for binding in bindings(account):
        role = binding["role"]
        data_role = (
            role.startswith(("roles/bigquery.data", "roles/storage."))
            or "Cleaner" in role
            or binding["resource"] == "bucket"
        )
        if not data_role:
            continue
        assert "condition" in binding, f"{account}: {role} has no condition"
        cel = condition(binding["condition"])
        assert not any(cel.evaluate(r, a) for r, a in PROD_REQUESTS), (account, role)
        granted = BRANCH_STORAGE if binding["resource"] == "bucket" else BRANCH_BIGQUERY
        if role.startswith("roles/bigquery.") or binding["resource"] == "bucket":
            assert all(cel.evaluate(r, a) for r, a in granted), (account, role)


def test_the_pr_ci_identity_has_no_owner_admin_or_prod_write():
    roles = {b["role"] for b in bindings("ml-platform-ci-pr")}
    assert not [r for r in roles if re.search(r"dataOwner|admin|Admin|owner|editor", r)], roles
    for binding in bindings("ml-platform-ci-pr"):
        if binding["role"].startswith("roles/artifactregistry."):
            assert RESOURCES[binding["resource"]]["side"] == "branch", binding
            assert RESOURCES[binding["resource"]]["kind"] == "repository", binding
    # Prod's repositories are written by prod's CI alone.
    writers = {
        (account, b["resource"])
        for account in ACCOUNTS
        for b in bindings(account)
        if b["role"] == "roles/artifactregistry.writer"
    }
    assert {r for a, r in writers if a == "ml-platform-ci"} == {"templates", "images"}
    assert {r for a, r in writers if a == "ml-platform-ci-pr"} == {"templates-pr", "images-pr"}
    assert {a for a, r in writers if RESOURCES[r]["side"] == "prod"} == {"ml-platform-ci"}


def test_no_ci_identity_holds_bigquery_ownership_or_storage_admin():
    for account in ("ml-platform-ci", "ml-platform-ci-pr"):
        for binding in bindings(account):
            assert binding["role"] not in {
                "roles/bigquery.dataOwner",
                "roles/bigquery.admin",
                "roles/storage.objectAdmin",
                "roles/storage.admin",
                "roles/owner",
                "roles/editor",
            }, (account, binding)


# -- prod and branch are separate -----------------------------------------------------------


def test_prod_and_branch_identities_are_separate():
    def principals(side: str) -> set[str]:
        return {p for a in ACCOUNTS if side_of(a) == side for p in ACCOUNTS[a]["impersonated_by"]}

    prod, branch = principals("prod"), principals("branch")
    assert prod and branch and not prod & branch
    # Different pools for the two task roles; different OIDC subjects for the two CIs.
    assert all("${BRANCH_POOL}" not in p and "${BRANCH_AWS_ROLE}" not in p for p in prod)
    assert all("${POOL}/" not in p and "${AWS_ROLE}" not in p for p in branch)
    assert {p.rsplit(":", 1)[1] for p in prod if "/subject/" in p} == {"production"}
    assert {p.rsplit(":", 1)[1] for p in branch if "/subject/" in p} == {"branch-deployments"}
    # One principal per account, each a single task role or a single environment's subject.
    for account, sa in ACCOUNTS.items():
        assert len(sa["impersonated_by"]) <= 1, account
        for principal in sa["impersonated_by"]:
            assert re.search(r"/attribute\.aws_role/\$\{\w+\}$|/subject/repo:", principal)
    # No account acts as one of the other side.
    for account in ACCOUNTS:
        for binding in bindings(account):
            if binding["resource"].startswith("service_account:"):
                other = binding["resource"].split(":", 1)[1]
                assert side_of(other) == side_of(account), (account, other)


def test_nobody_may_act_as_every_account():
    for account in ACCOUNTS:
        for binding in bindings(account):
            if binding["role"] in {
                "roles/iam.serviceAccountUser",
                "roles/iam.serviceAccountTokenCreator",
                "roles/iam.workloadIdentityUser",
            }:
                assert binding["resource"].startswith("service_account:"), (account, binding)


def test_the_ci_subjects_are_the_workflows_environments():
    """The GitHub subjects the CI accounts trust are the environments the workflows use."""
    workflows = "\n".join(p.read_text() for p in (ROOT / ".github" / "workflows").glob("*.yml"))
    for account, environment in (
        ("ml-platform-ci", "production"),
        ("ml-platform-ci-pr", "branch-deployments"),
    ):
        (principal,) = ACCOUNTS[account]["impersonated_by"]
        assert principal.endswith(f"/subject/repo:${{GITHUB_REPOSITORY}}:environment:{environment}")
        assert f"'{environment}'" in workflows or f"name: {environment}" in workflows
        # The subject stays within Google's 127-byte limit for google.subject.
        assert len(f"repo:{SHELL['GITHUB_REPOSITORY']}:environment:{environment}") <= 127


# -- the custom roles hold what the code calls ----------------------------------------------


def custom_role(name: str) -> set[str]:
    return set(SPEC["custom_roles"][name]["permissions"])


def test_the_pipeline_job_submitter_covers_the_calls_of_the_vertex_runner():
    """The branch code location's only Vertex AI permissions: one per call the code makes."""
    source = (ROOT / "ml_platform" / "resources" / "pipeline_runs" / "vertex.py").read_text()
    calls = set(re.findall(r"_client\.(\w+)_pipeline_jobs?\b", source))
    assert calls == {"create", "get", "list", "cancel"}
    assert custom_role("mlPlatformPipelineJobSubmitter") == {
        f"aiplatform.pipelineJobs.{call}" for call in calls
    }


def test_the_cleaner_can_delete_and_nothing_else():
    permissions = custom_role("mlPlatformBranchDataCleaner")
    assert permissions == {
        # BigQueryWarehouse.drop_dataset: get_dataset, delete_dataset(delete_contents=True).
        "bigquery.datasets.get",
        "bigquery.datasets.delete",
        "bigquery.tables.list",
        "bigquery.tables.delete",
        # GcsArtifactStore.delete_prefix: list_blobs(prefix=...), delete_blobs.
        "storage.objects.list",
        "storage.objects.delete",
    }
    (binding,) = [
        b
        for b in bindings("ml-platform-ci-pr")
        if b["role"].endswith("mlPlatformBranchDataCleaner")
    ]
    assert binding["condition"] == "branch-data"
    assert custom_role("mlPlatformDatasetCreator") == {"bigquery.datasets.create"}


def test_every_custom_role_and_condition_is_used():
    used_roles = {b["role"].rsplit("/", 1)[1] for a in ACCOUNTS for b in bindings(a)}
    assert set(SPEC["custom_roles"]) <= used_roles
    used_conditions = {b["condition"] for a in ACCOUNTS for b in bindings(a) if "condition" in b}
    assert used_conditions == set(SPEC["conditions"])


# -- the README shows the commands ----------------------------------------------------------


def readme_text() -> str:
    return README.read_text()


def test_the_readme_shows_exactly_the_rendered_commands():
    assert iam_commands.readme_block(readme_text()) == iam_commands.render(SPEC), (
        "deploy/gcp/README.md's IAM block differs from iam-bindings.yaml: paste the output of "
        "`uv run python deploy/gcp/iam_commands.py` between the iam-bindings markers"
    )


def test_the_commands_are_bash_and_use_only_variables_the_readme_sets():
    block = iam_commands.render(SPEC)
    subprocess.run(["bash", "-n"], input=block, text=True, check=True)
    before = readme_text().split("## Before you start", 1)[1].split("\n## ", 1)[0]
    defined = set(re.findall(r"^([A-Z_]+)=", before, re.M)) | {"CONDITIONS"}
    used = set(re.findall(r"\$\{?([A-Z_]+)\}?", block))
    assert used <= defined, f"undefined in the README: {used - defined}"
    assert set(SHELL) <= defined


def test_accounts_are_created_before_they_are_named():
    block = iam_commands.render(SPEC)
    for account in ACCOUNTS:
        created = block.index(f"gcloud iam service-accounts create {account} ")
        first_use = block.index(f"{account}@")
        assert created < first_use, account


def test_the_condition_files_the_commands_write_evaluate_like_the_yaml(tmp_path: Path):
    """Run the block's condition part in bash (with the README's variables) and read the
    files gcloud is given: their expressions are the ones tested above."""
    block = iam_commands.render(SPEC)
    start = block.index("CONDITIONS=$(mktemp -d)")
    end = block.rindex("\nEOF\n") + len("\nEOF\n")
    script = block[start:end].replace("CONDITIONS=$(mktemp -d)", f"CONDITIONS={tmp_path}")
    subprocess.run(
        ["bash", "-e", "-c", script], env={"PATH": os.environ["PATH"], **SHELL}, check=True
    )
    assert {p.stem for p in tmp_path.glob("*.yaml")} == set(SPEC["conditions"])
    for name, spec in SPEC["conditions"].items():
        written = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
        assert written["title"] == spec["title"]
        assert written["expression"] == " ".join(substitute(spec["expression"]).split())
        cel = Cel(written["expression"])
        assert not any(cel.evaluate(r, a) for r, a in PROD_REQUESTS), name
    # Every binding's condition flag names one of those files.
    flags = set(re.findall(r'--condition-from-file="\$CONDITIONS/([\w-]+)\.yaml"', block))
    assert flags == set(SPEC["conditions"])


def test_every_binding_is_one_command():
    block = iam_commands.render(SPEC)
    count = sum(len(bindings(a)) + len(ACCOUNTS[a]["impersonated_by"]) for a in ACCOUNTS)
    assert block.count("add-iam-policy-binding") == count
    # Project bindings without a condition say so (gcloud asks otherwise).
    for command in block.split("\ngcloud ")[1:]:
        if command.startswith("projects add-iam-policy-binding"):
            assert "--condition=None" in command or "--condition-from-file=" in command
