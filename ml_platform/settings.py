"""Everything that differs between deployments, resolved once from the environment.

This is the only module that reads ``os.environ``. Every other module asks the
``Settings`` object, so the rules below (above all: a branch deployment can never name a
prod dataset) live in one place and are unit-tested.

Deployments:

- ``local``: no ``DAGSTER_CLOUD_DEPLOYMENT_NAME``. DuckDB, kfp.local and folders under
  the project's data folder; works offline.
- ``branch``: ``DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT=1``. BigQuery datasets, GCS prefixes
  and Vertex labels carry the pull request id.
- ``prod``: ``DAGSTER_CLOUD_DEPLOYMENT_NAME`` equals the prod deployment's name.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from enum import StrEnum
from functools import cache
from pathlib import Path

from ml_platform.resources.templates import is_tag_or_version

PROJECT_DIR = Path(__file__).resolve().parent.parent
DBT_PROJECT_DIR = PROJECT_DIR / "dbt_project"
# The dbt installed beside this Python, whether or not its folder is on PATH, as the project's
# own script (ml_platform/dbt_command.py: dbt, with a --version that asks no server).
DBT_EXECUTABLE = Path(sys.executable).parent / "ml-platform-dbt"

# The logical datasets (DuckDB schemas locally, BigQuery datasets on Google Cloud).
DATASETS = ("raw", "staging", "features", "predictions", "reporting")
DATASET_PREFIX = "flights_"

# Google Cloud regions: us-central1, europe-west4, northamerica-northeast1, ...
_REGION = re.compile(r"[a-z]+(-[a-z]+)+[0-9]+")

# Vertex AI label rules: keys and values at most 63 characters of lowercase letters,
# digits, '_' and '-'; keys start with a letter.
_LABEL_MAX = 63


class SettingsError(ValueError):
    """The environment describes a deployment that cannot be run safely."""


# The workload identity federation credential configuration (deploy/gcp/README.md).
GCP_CREDENTIAL_CONFIG_VARIABLE = "ML_PLATFORM_GCP_CREDENTIAL_CONFIG"


class Deployment(StrEnum):
    LOCAL = "local"
    BRANCH = "branch"
    PROD = "prod"


def sanitize_label_value(value: str) -> str:
    """Map any string onto Vertex AI's label value rules (lowercase, [a-z0-9_-], ≤63)."""
    cleaned = re.sub(r"[^a-z0-9_-]+", "-", value.lower()).strip("-")
    return cleaned[:_LABEL_MAX]


def sanitize_label_key(value: str) -> str:
    """Label keys follow the value rules and must also start with a letter."""
    cleaned = sanitize_label_value(value).replace("-", "_")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = f"k_{cleaned}"
    return cleaned[:_LABEL_MAX]


@dataclass(frozen=True)
class EcsTaskRole:
    """Where ECS serves the task role's credentials, and the task's AWS region.

    ECS sets these variables in every task whose task definition names a task role (and
    AWS SDKs read them from there). They are read with the rest of the environment here
    and handed to the Google credentials (``resources/gcp_credentials.py``), because
    google-auth's own AWS source knows only access-key variables and the EC2 metadata
    service, and Fargate has neither.
    """

    # AWS_CONTAINER_CREDENTIALS_RELATIVE_URI: a path on http://169.254.170.2 (ECS sets it).
    credentials_relative_uri: str | None = None
    # AWS_CONTAINER_CREDENTIALS_FULL_URI (+ AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]): a
    # whole URL, as EKS Pod Identity or a local credentials server give.
    credentials_full_uri: str | None = None
    authorization_token: str | None = field(default=None, repr=False)
    authorization_token_file: str | None = None
    # AWS_REGION, else AWS_DEFAULT_REGION: the region of the STS endpoint the signed
    # GetCallerIdentity request names.
    region: str | None = None

    @property
    def serves_credentials(self) -> bool:
        return bool(self.credentials_relative_uri or self.credentials_full_uri)


@dataclass(frozen=True)
class Settings:
    deployment: Deployment
    # Local backends.
    data_dir: Path = PROJECT_DIR / "data"
    # Dagster+ facts.
    deployment_name: str = "local"
    pull_request_id: str | None = None
    git_sha: str | None = None
    # Google Cloud (branch and prod).
    gcp_project: str | None = None
    gcp_region: str = "us-central1"
    bigquery_location: str = "US"
    gcs_bucket: str | None = None
    artifact_registry_repository: str | None = None
    vertex_service_account: str | None = None
    vertex_network: str | None = None
    # Vertex AI's step cache (a step whose inputs did not change is not run again).
    vertex_caching: bool = True
    # API endpoints other than Google's public ones (Private Service Connect, or the local
    # servers the tests run); None means the default regional endpoint.
    vertex_api_endpoint: str | None = None
    bigquery_api_endpoint: str | None = None
    # Which published pipeline template (tag) runs use, and the image its components run in.
    template_tag: str = "latest"
    component_image: str = "ml-platform:local"
    # How the Google clients authenticate. None: Application Default Credentials (gcloud's
    # login on a developer's machine, the attached service account on Google Cloud). Else
    # the JSON of a workload identity federation credential configuration
    # (ML_PLATFORM_GCP_CREDENTIAL_CONFIG; on ECS, from the AWS task role), no key involved.
    gcp_credential_config: str | None = field(default=None, repr=False)
    ecs_task_role: EcsTaskRole = field(default_factory=EcsTaskRole)
    # Alerts: posted to Slack when a token is configured, else only logged. A branch
    # deployment posts to its own channel, if one is named, never to prod's.
    slack_token: str | None = field(default=None, repr=False)
    slack_channel: str = "#ml-platform-alerts"
    slack_branch_channel: str | None = None
    # A pull request's BigQuery tables expire this many days after they were last written.
    branch_data_days: int = 14
    # Where people open the Dagster UI (links in alerts): `dagster dev` locally; on
    # Dagster+ the organisation's URL and the deployment (None: alerts carry no link).
    dagster_ui_url: str | None = "http://127.0.0.1:3000"
    # How often the completion sensor looks for ended pipeline jobs, and how far back
    # before the newest end it has seen (an end time can be recorded late).
    sensor_interval_seconds: int = 30
    sensor_lookback_seconds: int = 900
    # The Dagster instance the main command records its runs in (and `dagster dev` shows).
    dagster_home: Path = PROJECT_DIR / "dagster_home"
    # Model and scoring defaults (the same in every deployment).
    training_cutoff: date = date(2013, 10, 1)
    extra_labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.deployment is Deployment.BRANCH and not self.pull_request_id:
            raise SettingsError(
                "branch deployment without a pull request id: set "
                "DAGSTER_CLOUD_PULL_REQUEST_ID (Dagster+ sets it for every branch deployment)"
            )
        if self.pull_request_id is not None and not re.fullmatch(r"[0-9]+", self.pull_request_id):
            raise SettingsError(
                f"DAGSTER_CLOUD_PULL_REQUEST_ID must be a number, got {self.pull_request_id!r}"
            )
        if self.deployment is not Deployment.LOCAL:
            missing = [
                name
                for name, value in (
                    ("ML_PLATFORM_GCP_PROJECT", self.gcp_project),
                    ("ML_PLATFORM_GCS_BUCKET", self.gcs_bucket),
                )
                if not value
            ]
            if missing:
                raise SettingsError(
                    f"the {self.deployment} deployment runs on Google Cloud and needs "
                    + ", ".join(missing)
                )
        if self.gcp_credential_config is not None:
            _check_credential_config(self.gcp_credential_config)
        if not is_tag_or_version(self.template_tag):
            raise SettingsError(
                "ML_PLATFORM_TEMPLATE_TAG must be a pipeline template tag (letters, digits, "
                f"'.', '_', '-'; at most 128) or a sha256: version, got {self.template_tag!r}"
            )
        if not _REGION.fullmatch(self.gcp_region):
            raise SettingsError(
                "ML_PLATFORM_GCP_REGION must be a Google Cloud region such as us-central1 or "
                f"europe-west4, got {self.gcp_region!r}"
            )

    # -- names -------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return self.deployment is Deployment.LOCAL

    @property
    def dataset_suffix(self) -> str:
        return f"_pr_{self.pull_request_id}" if self.deployment is Deployment.BRANCH else ""

    def dataset(self, logical: str) -> str:
        """The physical dataset (schema) for a logical one; the single place names are made.

        A branch deployment's names always carry its pull request suffix, and the result is
        checked against the prod names, so no code path can hand a branch a prod dataset.
        """
        if logical not in DATASETS:
            raise SettingsError(f"unknown dataset {logical!r}; known: {', '.join(DATASETS)}")
        name = f"{DATASET_PREFIX}{logical}{self.dataset_suffix}"
        if self.deployment is Deployment.BRANCH and name in PROD_DATASETS:
            raise SettingsError(f"branch deployment resolved the prod dataset {name!r}")
        return name

    @property
    def datasets(self) -> dict[str, str]:
        return {logical: self.dataset(logical) for logical in DATASETS}

    @property
    def duckdb_path(self) -> Path:
        return self.data_dir / "warehouse.duckdb"

    @property
    def pipeline_root(self) -> str:
        """Where pipeline artifacts go: a local folder, or a GCS prefix per deployment."""
        if self.is_local:
            return str(self.data_dir / "pipeline_root")
        return f"{self.gcs_artifact_root}/{self.storage_prefix}"

    @property
    def gcs_artifact_root(self) -> str:
        """Every deployment's pipeline roots live under it (prod, branch/pr-N)."""
        return f"gs://{self.gcs_bucket}/pipeline_root"

    @property
    def storage_prefix(self) -> str:
        """A path segment that separates deployments (and pull requests) in shared storage."""
        if self.deployment is Deployment.BRANCH:
            return f"branch/pr-{self.pull_request_id}"
        return str(self.deployment)

    @property
    def artifact_registry_url(self) -> str:
        """The KFP-format Artifact Registry repository holding the pipeline templates."""
        if not self.artifact_registry_repository:
            raise SettingsError(
                f"the {self.deployment} deployment needs ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY "
                "(the name of a KFP-format Artifact Registry repository)"
            )
        return (
            f"https://{self.gcp_region}-kfp.pkg.dev/{self.gcp_project}/"
            f"{self.artifact_registry_repository}"
        )

    @property
    def job_store_path(self) -> Path:
        return self.data_dir / "pipeline_jobs.sqlite"

    @property
    def model_registry_path(self) -> Path:
        return self.data_dir / "model_registry.sqlite"

    @property
    def template_dir(self) -> Path:
        return self.data_dir / "templates"

    @property
    def labels(self) -> dict[str, str]:
        """Labels for every pipeline job; the sensor filters on them and billing groups by them."""
        labels = {"app": "ml-platform", "deployment": sanitize_label_value(str(self.deployment))}
        if self.pull_request_id:
            labels["pull_request"] = sanitize_label_value(self.pull_request_id)
        for key, value in self.extra_labels.items():
            labels[sanitize_label_key(key)] = sanitize_label_value(value)
        return labels

    def job_labels(
        self, *, asset: str, partition: str | None, run_id: str | None, inputs: str | None = None
    ) -> dict[str, str]:
        """Labels of one pipeline job: which asset and partition, a digest of its inputs
        (template version and parameters), and the Dagster run that started it (no such
        label on a job started outside Dagster)."""
        labels = {
            **self.labels,
            "asset": sanitize_label_value(asset),
            "partition": sanitize_label_value(partition or "none"),
        }
        if inputs:
            labels["inputs"] = sanitize_label_value(inputs)
        if run_id:
            labels["dagster_run_id"] = sanitize_label_value(run_id)
        return labels

    @property
    def gcp_credential_info(self) -> dict[str, object] | None:
        """The credential configuration, parsed (validated when the settings were made)."""
        if self.gcp_credential_config is None:
            return None
        return json.loads(self.gcp_credential_config)

    @property
    def dbt_target(self) -> str:
        return str(self.deployment)

    @property
    def dbt_vars(self) -> dict[str, object]:
        dbt_vars: dict[str, object] = {"datasets": self.datasets}
        if self.is_local:
            dbt_vars["duckdb_path"] = str(self.duckdb_path)
        else:
            dbt_vars["gcp_project"] = self.gcp_project
            dbt_vars["bigquery_location"] = self.bigquery_location
            if self.bigquery_api_endpoint:
                dbt_vars["bigquery_api_endpoint"] = self.bigquery_api_endpoint
        return dbt_vars

    @property
    def alert_channel(self) -> str | None:
        """The Slack channel alerts go to (None: the log only): a branch deployment's own,
        never prod's, which its pull request's failures would flood."""
        if not self.slack_token:
            return None
        return (
            self.slack_branch_channel
            if self.deployment is Deployment.BRANCH
            else self.slack_channel
        )

    @property
    def automation_runs_by_default(self) -> bool:
        """Sensors start on their own locally and in prod; in a branch deployment they exist,
        stopped: each open pull request would poll Vertex AI and alert for its own tests."""
        return self.deployment is not Deployment.BRANCH

    @property
    def table_expiration(self) -> timedelta | None:
        """How long a branch deployment's tables live after they were last written: an
        abandoned pull request's data goes away even if its cleanup never ran."""
        if self.deployment is Deployment.BRANCH:
            return timedelta(days=self.branch_data_days)
        return None

    def check_code_location(self) -> None:
        """What the code location of a Google Cloud deployment needs, checked when it loads
        (so a deploy fails, not the first run): the commands that only publish templates or
        clean up after a pull request do without."""
        if self.is_local:
            return
        missing = [
            name
            for name, value in (
                ("ML_PLATFORM_VERTEX_SERVICE_ACCOUNT", self.vertex_service_account),
                ("ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY", self.artifact_registry_repository),
            )
            if not value
        ]
        if missing:
            raise SettingsError(
                f"the {self.deployment} code location needs {', '.join(missing)} (without a "
                "service account, Vertex AI runs pipelines as the project's default one)"
            )

    def for_pull_request(self, pull_request_id: str) -> Settings:
        """The settings of the branch deployment of a pull request (for cleaning up after
        it from CI, where the environment describes another deployment)."""
        return replace(self, deployment=Deployment.BRANCH, pull_request_id=str(pull_request_id))

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        deployment_name = env.get("DAGSTER_CLOUD_DEPLOYMENT_NAME")
        prod_name = env.get("ML_PLATFORM_PROD_DEPLOYMENT", "prod")
        if env.get("DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT", "").lower() in ("1", "true"):
            deployment = Deployment.BRANCH
        elif not deployment_name and _on_ecs(env):
            # Fail closed: a task of the agent without Dagster+'s variables must not quietly
            # run as the local deployment (DuckDB in the container, nothing on BigQuery).
            raise SettingsError(
                "running in an ECS task without DAGSTER_CLOUD_DEPLOYMENT_NAME (nor "
                "DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT): refusing to run as the local deployment; "
                "Dagster+'s agent sets them in the tasks it starts"
            )
        elif not deployment_name:
            deployment = Deployment.LOCAL
        elif deployment_name == prod_name:
            deployment = Deployment.PROD
        else:
            raise SettingsError(
                f"Dagster+ deployment {deployment_name!r} is neither a branch deployment nor "
                f"the prod deployment {prod_name!r} (set ML_PLATFORM_PROD_DEPLOYMENT)"
            )
        data_dir = env.get("ML_PLATFORM_DATA_DIR")
        optional = {
            "gcp_project": env.get("ML_PLATFORM_GCP_PROJECT"),
            "gcp_region": env.get("ML_PLATFORM_GCP_REGION"),
            "gcs_bucket": env.get("ML_PLATFORM_GCS_BUCKET"),
            "artifact_registry_repository": env.get("ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY"),
            "vertex_service_account": env.get("ML_PLATFORM_VERTEX_SERVICE_ACCOUNT"),
            "vertex_network": env.get("ML_PLATFORM_VERTEX_NETWORK"),
            "bigquery_location": env.get("ML_PLATFORM_BIGQUERY_LOCATION"),
            "vertex_api_endpoint": env.get("ML_PLATFORM_VERTEX_API_ENDPOINT"),
            "bigquery_api_endpoint": env.get("ML_PLATFORM_BIGQUERY_API_ENDPOINT"),
            "template_tag": env.get("ML_PLATFORM_TEMPLATE_TAG"),
            "component_image": env.get("ML_PLATFORM_COMPONENT_IMAGE"),
            "slack_token": env.get("ML_PLATFORM_SLACK_TOKEN"),
            "slack_channel": env.get("ML_PLATFORM_SLACK_CHANNEL"),
            "slack_branch_channel": env.get("ML_PLATFORM_SLACK_BRANCH_CHANNEL"),
            "dagster_home": Path(env["DAGSTER_HOME"]) if env.get("DAGSTER_HOME") else None,
            "git_sha": env.get("DAGSTER_CLOUD_GIT_SHA"),
            "gcp_credential_config": _credential_config(env),
        }
        caching = env.get("ML_PLATFORM_VERTEX_CACHING", "true").lower()
        if caching not in ("true", "false", "1", "0"):
            raise SettingsError(
                f"ML_PLATFORM_VERTEX_CACHING must be true or false, got {caching!r}"
            )
        seconds = {
            name: _positive_int(env, variable)
            for name, variable in (
                ("sensor_interval_seconds", "ML_PLATFORM_SENSOR_INTERVAL_SECONDS"),
                ("sensor_lookback_seconds", "ML_PLATFORM_SENSOR_LOOKBACK_SECONDS"),
                ("branch_data_days", "ML_PLATFORM_BRANCH_DATA_DAYS"),
            )
            if env.get(variable)
        }
        return cls(
            deployment=deployment,
            vertex_caching=caching in ("true", "1"),
            **seconds,
            deployment_name=deployment_name or "local",
            pull_request_id=env.get("DAGSTER_CLOUD_PULL_REQUEST_ID") or None,
            data_dir=Path(data_dir).resolve() if data_dir else PROJECT_DIR / "data",
            **{key: value for key, value in optional.items() if value},
            dagster_ui_url=_dagster_ui_url(env, deployment, deployment_name),
            ecs_task_role=EcsTaskRole(
                credentials_relative_uri=env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or None,
                credentials_full_uri=env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") or None,
                authorization_token=env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN") or None,
                authorization_token_file=env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") or None,
                region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            ),
        )


def _on_ecs(env: Mapping[str, str]) -> bool:
    """An ECS task: ECS sets its task metadata endpoint in every container it starts."""
    return bool(env.get("ECS_CONTAINER_METADATA_URI_V4") or env.get("ECS_CONTAINER_METADATA_URI"))


def _dagster_ui_url(
    env: Mapping[str, str], deployment: Deployment, deployment_name: str | None
) -> str | None:
    if env.get("ML_PLATFORM_DAGSTER_UI_URL"):
        return env["ML_PLATFORM_DAGSTER_UI_URL"]
    if deployment is Deployment.LOCAL:
        return "http://127.0.0.1:3000"
    # Never a localhost link in a cloud alert: the org's URL and the deployment, or none.
    org = env.get("ML_PLATFORM_DAGSTER_ORG_URL")  # e.g. https://acme.dagster.cloud
    return f"{org.rstrip('/')}/{deployment_name}" if org and deployment_name else None


def _credential_config(env: Mapping[str, str]) -> str | None:
    """The credential configuration's JSON: the variable's value itself (what ECS injects
    from Secrets Manager), or, when the value does not start with "{", the file it names
    (what `gcloud iam workload-identity-pools create-cred-config --output-file` wrote)."""
    value = env.get(GCP_CREDENTIAL_CONFIG_VARIABLE, "").strip()
    if not value:
        return None
    if value.startswith("{"):
        return value
    try:
        return Path(value).expanduser().read_text()
    except OSError as error:
        # The value is repeated only when it looks like a path: it could be a secret pasted
        # into the wrong variable.
        shown = f" {value!r}" if value[0] in "/~." and "\n" not in value else ""
        raise SettingsError(
            f"{GCP_CREDENTIAL_CONFIG_VARIABLE} holds neither a JSON credential configuration "
            f"(it does not start with '{{') nor the path of a readable file{shown}: "
            f"{error.strerror}"
        ) from error


def _check_credential_config(config: str) -> None:
    # The message never repeats the value: it is configuration, not a secret, but it is long
    # and a mistyped secret could be pasted into the wrong variable.
    try:
        info = json.loads(config)
    except json.JSONDecodeError as error:
        raise SettingsError(
            f"{GCP_CREDENTIAL_CONFIG_VARIABLE} is not valid JSON ({error.msg} at line "
            f"{error.lineno}, column {error.colno})"
        ) from error
    kind = info.get("type") if isinstance(info, dict) else type(info).__name__
    if kind != "external_account":
        hint = " Service account keys are not accepted here;" if kind == "service_account" else ""
        raise SettingsError(
            f"{GCP_CREDENTIAL_CONFIG_VARIABLE} must be a workload identity federation "
            f'credential configuration ("type": "external_account"), got type {kind!r}.{hint} '
            "`gcloud iam workload-identity-pools create-cred-config` writes one "
            "(deploy/gcp/README.md)"
        )
    missing = [key for key in ("audience", "subject_token_type") if not info.get(key)]
    if missing:
        raise SettingsError(
            f"{GCP_CREDENTIAL_CONFIG_VARIABLE} lacks {', '.join(missing)}: not a complete "
            "credential configuration"
        )


def _positive_int(env: Mapping[str, str], variable: str) -> int:
    value = env[variable]
    if not value.isdigit() or int(value) < 1:
        raise SettingsError(f"{variable} must be a positive whole number, got {value!r}")
    return int(value)


# The prod names, computed from the same rule, so the branch guard cannot drift from it.
PROD_DATASETS = frozenset(f"{DATASET_PREFIX}{logical}" for logical in DATASETS)


def child_environment(settings: Settings) -> dict[str, str]:
    """The environment of the Dagster processes a command starts (a daemon, `dagster-graphql`):
    this process's, with the deployment's instance and data folder, and this Python's scripts
    first on PATH (dagster-dbt runs `dbt` from there)."""
    return {
        **os.environ,
        "DAGSTER_HOME": str(settings.dagster_home),
        "ML_PLATFORM_DATA_DIR": str(settings.data_dir),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }


@cache
def get_settings() -> Settings:
    """The settings of this process, resolved once."""
    return Settings.from_env()
