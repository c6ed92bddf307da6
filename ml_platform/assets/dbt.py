"""The dbt project as Dagster assets: staging + features before the model, reporting after
the predictions. dbt tests become asset checks (each with a description, see describe_test);
dbt sources map to the Python assets. Materializations carry row counts, column types and
column lineage (dagster-dbt's fetches on the event stream, see build_dbt_assets).

What a dbt step spends besides dbt's own work (bench/p7_dbt_steps.py): dagster-dbt runs
`<dbt_executable> --version` once per DbtCliResource instance, i.e. once per run
(in-process executor) or step process (multiprocess), only to read dbt's version number.
`dbt --version` imports all of dbt and asks PyPI for the latest releases (2.7 s here), so
the resource runs `ml-platform-dbt` (ml_platform/dbt_command.py), which answers that from
the installed package and is dbt's own command line for everything else.

How dbt-bigquery authenticates: dbt runs as a subprocess and builds its own Google
credentials from the profile, so it cannot share the code location's Python credentials
object. With no credential configuration (Application Default Credentials) dbt runs the
deployment's target (`branch`, `prod`: `method: oauth`) and finds the same ADC. With one (the
ECS agent: workload identity federation from the AWS task role, which dbt's google-auth
cannot reach on Fargate), dbt runs the `access_token` target (`method: oauth-secrets`) and
each dbt command gets an access token minted from the code location's credentials just
before it starts, in one environment variable of its own process only (`start_dbt`).
"""

import atexit
import gc
import hashlib
import json
import os
import re
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


def _relation(expression: str) -> str:
    """`ref('flight_features')` -> flight_features, `source('raw', 'flights')` -> raw.flights."""
    names = re.findall(r"""['"]([^'"]+)['"]""", expression)
    return ".".join(names) or expression


def describe_test(test: Mapping[str, Any]) -> str:
    """What a dbt test checks, in a line: its own description when the YAML gives one (dbt's
    `description`, or dagster-dbt's `meta.description`), else one made from the generic
    test's name and arguments: "not_null on flight_key", "accepted_values [train, test] on
    split", "value_between 1..12 on month", "relationships on carrier to
    stg_airlines.carrier"."""
    given = test.get("description") or test.get("meta", {}).get("description")
    if given:
        return " ".join(given.split())
    metadata = test.get("test_metadata") or {}
    if not metadata:  # a singular test (tests/*.sql) with no YAML description
        return f"singular test {test['name']} ({test['original_file_path']})"
    kwargs = dict(metadata.get("kwargs") or {})
    kwargs.pop("model", None)
    column = kwargs.pop("column_name", None)
    name = metadata["name"]
    on = f"on {column}" if column else ""
    if name == "accepted_values":
        words = [name, f"[{', '.join(str(value) for value in kwargs.pop('values', []))}]", on]
    elif name == "value_between":
        low, high = kwargs.pop("min_value", None), kwargs.pop("max_value", None)
        bounds = (
            f"{low}..{high}" if low is not None and high is not None
            else f">= {low}" if low is not None else f"<= {high}"
        )  # fmt: skip
        words = [name, bounds, on]
    elif name == "relationships":
        to, field = _relation(kwargs.pop("to", "")), kwargs.pop("field", "")
        words = [name, on, f"to {to}.{field}"]
    elif name == "unique_combination_of_columns":
        words = [name, f"({', '.join(kwargs.pop('combination_of_columns', []))})", on]
    else:
        words = [name, on]
    # Arguments not spelled out above, as they are.
    words += [f"{key}={value}" for key, value in kwargs.items()]
    return " ".join(word for word in words if word)


class Translator(DagsterDbtTranslator):
    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        # Models are grouped by their folder: staging, features, reporting.
        if dbt_resource_props["resource_type"] == "model":
            return dbt_resource_props["fqn"][1]
        return super().get_group_name(dbt_resource_props)

    def get_asset_check_spec(
        self,
        asset_spec: dg.AssetSpec,
        manifest: Mapping[str, Any],
        unique_id: str,
        project: DbtProject | None,
    ) -> dg.AssetCheckSpec | None:
        # dagster-dbt describes a check only with the test's meta.description, which none of
        # ours has: the UI said "No description provided" for every one.
        spec = super().get_asset_check_spec(asset_spec, manifest, unique_id, project)
        if spec is None or spec.description:
            return spec
        return dg.AssetCheckSpec(
            name=spec.name,
            asset=spec.asset_key,
            description=describe_test(manifest["nodes"][unique_id]),
            additional_deps=spec.additional_deps,
            blocking=spec.blocking,
            metadata=spec.metadata,
            automation_condition=spec.automation_condition,
            partitions_def=spec.partitions_def,
        )


def names_our_tables(
    manifest: Mapping[str, Any], settings: Settings, context: dg.AssetExecutionContext
) -> bool:
    """Whether the manifest was parsed for this deployment's warehouse and datasets.

    dagster-dbt's row counts and column metadata query the relations the manifest names
    (`relation_name`, database and schema), not those of the running dbt command. A manifest
    parsed for another deployment names other tables: the image's is parsed at build time
    for the local target (DuckDB, unsuffixed datasets), so on BigQuery the queries would fail
    (logged as errors) or, worse, read another deployment's tables.
    """
    adapter = manifest.get("metadata", {}).get("adapter_type")
    models = [node for node in manifest["nodes"].values() if node["resource_type"] == "model"]
    schemas = {node["schema"] for node in models}
    ours = adapter == ("duckdb" if settings.is_local else "bigquery")
    ours = ours and schemas <= set(settings.datasets.values())
    if not settings.is_local:  # and the Google Cloud project
        ours = ours and {node["database"] for node in models} == {settings.gcp_project}
    if not ours:
        context.log.info(
            f"The dbt manifest names {adapter} datasets {sorted(schemas)}, not this "
            "deployment's: no row counts, column types or column lineage this time."
        )
    return ours


def close_adapter(invocation: DbtCliInvocation) -> None:
    """Close what the dbt adapter dagster-dbt made in this process holds open.

    dbt-duckdb keeps its database open until the process ends (`keep_open`, its default in
    1.11): after the fetches, this process would go on holding the warehouse file, opened
    read-only, and the next step of a run (the in-process executor runs them all in one
    process) could neither write to it nor open it with another configuration. dbt's own
    end-of-command clean-up, then dbt-duckdb's (its exit hook), which lets the database go.

    The column fetches leave DuckDB objects referenced from what ml_platform.definitions
    froze (gc.freeze) at import; still alive when DuckDB's extension unloads, its bindings
    would print some 45 lines of "nanobind: leaked ..." at exit. Such a process unfreezes at
    exit, as one that imported DuckDB before the freeze does (definitions.py).
    """
    adapter = invocation.adapter
    if adapter is None:
        return
    adapter.cleanup_connections()
    close_all = getattr(type(adapter.connections), "close_all_connections", None)
    if close_all is not None:  # dbt-duckdb
        close_all()
        atexit.unregister(gc.unfreeze)  # once, however many steps
        atexit.register(gc.unfreeze)


def build_dbt_assets(
    settings: Settings, *, table_metadata: bool = True
) -> list[dg.AssetsDefinition]:
    """The two dbt assets. ``table_metadata``: whether their materializations carry row counts,
    column types and column lineage, when the manifest names this deployment's tables (what
    that costs: bench/p7_dbt_steps.py)."""
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
                events = invocation.stream()
                if table_metadata and names_our_tables(invocation.manifest, settings, context):
                    # Row counts (tables only), column types and column lineage, read
                    # through dbt's adapter in this process once each model is built. With
                    # DuckDB, once dbt has exited and released the file: dagster-dbt holds
                    # the step's events until then.
                    events = events.fetch_row_counts().fetch_column_metadata()
                try:
                    yield from events
                finally:
                    close_adapter(invocation)
            # Every invocation gets a target folder of its own; once it has succeeded, its
            # logs and artifacts are in the run's logs, and the folders would pile up. A
            # failed invocation's folder stays, with the dbt.log its error message points to.
            target = Path(invocation.project_dir, invocation.target_path)
            shutil.rmtree(target, ignore_errors=True)

        assets.__doc__ = description  # the op's description in the UI
        # No `project=`: dagster-dbt would put the DbtProject object into every asset's
        # metadata, which the UI shows as "[DbtProject] (unserializable)". Without it the
        # commands run in the resource's project_dir (the same folder), and nothing else of
        # ours needs it (no code references, no path selectors).
        return dbt_assets(
            manifest=DBT_PROJECT.manifest_path,
            name=name,
            dagster_dbt_translator=translator,
            **selection,
        )(assets)

    return [define(name, *spec) for name, spec in DBT_ASSETS.items()]
