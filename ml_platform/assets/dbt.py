"""The dbt project as Dagster assets: staging + features before the model, reporting after
the predictions. dbt tests become asset checks; dbt sources map to the Python assets.

How dbt-bigquery authenticates: dbt runs as a subprocess and builds its own Google
credentials from the profile, so it cannot share the code location's Python credentials
object. With no credential configuration (Application Default Credentials) dbt runs the
deployment's target (`branch`, `prod`: `method: oauth`) and finds the same ADC. With one (the
ECS agent: workload identity federation from the AWS task role, which dbt's google-auth
cannot reach on Fargate), dbt runs the `access_token` target (`method: oauth-secrets`) and
each dbt command gets an access token minted from the code location's credentials just
before it starts, in one environment variable of its own process only (`start_dbt`).
"""

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg

# Private, no public API: DbtCliResource.cli takes no environment of its own (see start_dbt).
from dagster._utils.env import environ
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliInvocation,
    DbtCliResource,
    DbtProject,
    dbt_assets,
)

from ml_platform.resources.backends import dbt_target
from ml_platform.resources.gcp_credentials import (
    DBT_ACCESS_TOKEN_VARIABLE,
    dbt_uses_access_token,
    fresh_access_token,
    google_credentials,
)
from ml_platform.resources.warehouse import Warehouse
from ml_platform.settings import DBT_PROJECT_DIR, Deployment, Settings, get_settings

PARTIAL_PARSE = "partial_parse.msgpack"  # dbt's saved parse, in a target folder


def manifest_is_stale(project: DbtProject) -> bool:
    if not project.manifest_path.exists():
        return True
    built = project.manifest_path.stat().st_mtime
    skip = {project.project_dir / "target", project.project_dir / "logs"}
    for folder, subfolders, files in os.walk(project.project_dir):
        subfolders[:] = [name for name in subfolders if Path(folder, name) not in skip]
        # Dotfiles (dbt's .user.yml, editor files) are not part of the project.
        sources = (name for name in files if not name.startswith("."))
        if any(Path(folder, name).stat().st_mtime > built for name in sources):
            return True
    return False


def prepared_target_path(settings: Settings) -> str:
    """Where the dbt project is parsed for a deployment, relative to the project.

    dbt's partial parsing only reuses a parse made with the same vars, profile and target
    (the DuckDB file is part of the profile). `target` serves the image build, the deployed
    code locations and a checkout's `make run` and `make dev` (the default local data
    folder); another local data folder (a test's, say) gets a folder of its own, so that
    neither parses again for the other.
    """
    if not settings.is_local or settings.dbt_vars == Settings(Deployment.LOCAL).dbt_vars:
        return "target"
    digest = hashlib.sha256(json.dumps(settings.dbt_vars, sort_keys=True).encode())
    return f"target/local-{digest.hexdigest()[:12]}"


# Parsed for this process's deployment: with the vars and target of the dbt commands its
# assets run, so that each of them parses only what changed (`dbt parse` takes 2.2 s instead
# of 3.5 s here: bench/p5_dbt_parse.py).
_SETTINGS = get_settings()
DBT_PROJECT = DbtProject(
    project_dir=DBT_PROJECT_DIR,
    target_path=prepared_target_path(_SETTINGS),
    target=dbt_target(_SETTINGS),
    prepare_project_cli_args=["parse", "--quiet", "--vars", json.dumps(_SETTINGS.dbt_vars)],
)
# dagster-dbt's prepare_if_dev parses on every load under `dagster dev`, and every run and
# step process loads the code location: about 5 s each time. Here a load parses only after
# an edit, or with no manifest yet, through dagster-dbt's own preparer, which keeps two
# processes from preparing at once (it runs the `dbt` on PATH: `uv run`, `make` and the
# image put the project's first). The image build prepares ahead (`dagster-dbt project
# prepare-and-package`), so a deployed code location never parses at load.
if manifest_is_stale(DBT_PROJECT):
    DBT_PROJECT.preparer.prepare(DBT_PROJECT)

REPORTING_SELECTION = "tag:reporting"
# The two dbt assets: everything before the model, and the reporting after the predictions.
DBT_ASSETS = {
    "dbt_features": (
        {"exclude": REPORTING_SELECTION},
        "Staging views and the feature tables the model trains and scores on.",
    ),
    "dbt_reporting": (
        {"select": REPORTING_SELECTION},
        "Reporting tables over the predictions: refreshed after new predictions land.",
    ),
}


def start_dbt(
    dbt: DbtCliResource,
    args: list[str],
    *,
    settings: Settings,
    context: dg.AssetExecutionContext | None = None,
    target_path: Path | None = None,
) -> DbtCliInvocation:
    """Start a dbt command; with workload identity federation, with a fresh access token.

    ``dbt`` is the resource ``backends.py`` builds: with a credential configuration its target
    is profiles.yml's ``access_token``, which reads the token from DBT_ACCESS_TOKEN_VARIABLE
    (dbt masks DBT_ENV_SECRET_* values in its logs and accepts them only in profiles.yml and
    packages.yml, never in SQL).

    The token goes to the dbt process's environment and nowhere else: not into --vars or
    the command line, which Dagster logs. DbtCliResource.cli has no parameter for extra
    variables: it copies this process's environment when it starts the subprocess (before
    returning), so the variable is set for the duration of that call only and then removed,
    with dagster's own `environ` helper (what the dagster-dbt maintainers recommend for
    this, dagster-io/dagster#29656). That is safe because a process runs one step at a
    time (locally the in-process executor runs a run's steps one after the other; on Google
    Cloud the multiprocess executor gives each step a process of its own), and nothing else
    in it starts a subprocess meanwhile.

    The token lives as long as the credentials grant (an hour by default; the configuration's
    service_account_impersonation.token_lifetime_seconds can extend it to 12 hours, see
    deploy/gcp/README.md). dbt cannot refresh it: a dbt command still running when it
    expires fails on its next BigQuery request with 401. The expiry is logged.
    """
    credentials = google_credentials(settings) if dbt_uses_access_token(settings) else None
    if credentials is None:
        return dbt.cli(args, context=context, target_path=target_path)
    token, expiry = fresh_access_token(credentials)
    if context is not None:
        until = expiry.isoformat(timespec="seconds") if expiry else "an unknown time"
        context.log.info(f"dbt authenticates to BigQuery with an access token valid until {until}")
    with environ({DBT_ACCESS_TOKEN_VARIABLE: token}):
        return dbt.cli(args, context=context, target_path=target_path)


class Translator(DagsterDbtTranslator):
    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        # Models are grouped by their folder: staging, features, reporting.
        if dbt_resource_props["resource_type"] == "model":
            return dbt_resource_props["fqn"][1]
        return super().get_group_name(dbt_resource_props)


def build_dbt_assets(settings: Settings) -> list[dg.AssetsDefinition]:
    dbt_vars = ["--vars", json.dumps(settings.dbt_vars)]
    # Source tests become checks on the Python assets they test (raw/*).
    translator = Translator(DagsterDbtTranslatorSettings(enable_source_tests_as_checks=True))

    def define(name: str, selection: dict[str, str], description: str) -> dg.AssetsDefinition:
        def assets(
            context: dg.AssetExecutionContext,
            dbt: DbtCliResource,
            warehouse: dg.ResourceParam[Warehouse],
        ):
            # A target folder per invocation, starting from the parse prepared for this
            # deployment (dagster-dbt would copy the one in target/, the default one's).
            target_path = Path(DBT_PROJECT.target_path, f"{name}-{uuid.uuid4().hex[:12]}")
            prepared = DBT_PROJECT.project_dir / DBT_PROJECT.target_path / PARTIAL_PARSE
            if prepared.exists():
                (DBT_PROJECT.project_dir / target_path).mkdir(parents=True)
                shutil.copy(prepared, DBT_PROJECT.project_dir / target_path / PARTIAL_PARSE)
            # Made by us first, so they carry the deployment's defaults (a pull request's
            # tables expire), which the datasets dbt creates itself would not.
            warehouse.ensure_datasets(settings.datasets.values())
            with warehouse.writer_turn(f"dbt build of {name}, Dagster run {context.run.run_id}"):
                invocation = start_dbt(
                    dbt,
                    ["build", *dbt_vars],
                    settings=settings,
                    context=context,
                    target_path=target_path,
                )
                yield from invocation.stream()
            # Every invocation gets a target folder of its own; once it has succeeded, its
            # logs and artifacts are in the run's logs, and the folders would pile up. A
            # failed invocation's folder stays, with the dbt.log its error message points to.
            target = Path(invocation.project_dir, invocation.target_path)
            shutil.rmtree(target, ignore_errors=True)

        assets.__doc__ = description  # the op's description in the UI
        return dbt_assets(
            manifest=DBT_PROJECT.manifest_path,
            project=DBT_PROJECT,
            name=name,
            dagster_dbt_translator=translator,
            **selection,
        )(assets)

    return [define(name, *spec) for name, spec in DBT_ASSETS.items()]
