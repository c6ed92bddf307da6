"""The dbt project as Dagster assets: staging + features before the model, reporting after
the predictions. dbt tests become asset checks; dbt sources map to the Python assets."""

import fcntl
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliResource,
    DbtProject,
    dbt_assets,
)

from ml_platform.settings import DBT_EXECUTABLE, DBT_PROJECT_DIR, Settings


def prepare_when_stale(project: DbtProject) -> None:
    """Parse the dbt project only when a file in it is newer than the manifest.

    dagster-dbt's `prepare_if_dev` re-parses on every load under `dagster dev`, and every
    run and step process loads the code location: about 8 s each time. Here a load parses
    only after an edit (or when there is no manifest yet), under a lock so that two
    processes never write the manifest at once. The image build prepares the manifest
    ahead, so a deployed code location never parses.
    """
    if not _manifest_is_stale(project):
        return
    target = project.project_dir / project.target_path
    target.mkdir(parents=True, exist_ok=True)
    with (target / ".prepare.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _manifest_is_stale(project):
            DbtCliResource(project_dir=project, dbt_executable=str(DBT_EXECUTABLE)).cli(
                ["parse", "--quiet"], target_path=project.target_path
            ).wait()


def _manifest_is_stale(project: DbtProject) -> bool:
    if not project.manifest_path.exists():
        return True
    built = project.manifest_path.stat().st_mtime
    skip = {project.project_dir / project.target_path, project.project_dir / "logs"}
    for folder, subfolders, files in os.walk(project.project_dir):
        subfolders[:] = [name for name in subfolders if Path(folder, name) not in skip]
        # Dotfiles (dbt's .user.yml, editor files) are not part of the project.
        sources = (name for name in files if not name.startswith("."))
        if any(Path(folder, name).stat().st_mtime > built for name in sources):
            return True
    return False


# Parsed for the local target: the manifest only names models and their dependencies,
# which are the same for every target.
DBT_PROJECT = DbtProject(project_dir=DBT_PROJECT_DIR, target="local")
prepare_when_stale(DBT_PROJECT)

REPORTING_SELECTION = "tag:reporting"
# The predictions table is written by a pipeline, after the features: its source tests run
# with the reporting models, not before the predictions exist.
PREDICTIONS_SOURCE = "source:predictions"


class Translator(DagsterDbtTranslator):
    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        # Models are grouped by their folder: staging, features, reporting.
        if dbt_resource_props["resource_type"] == "model":
            return dbt_resource_props["fqn"][1]
        return super().get_group_name(dbt_resource_props)


def build_dbt_assets(settings: Settings) -> list[dg.AssetsDefinition]:
    dbt_vars = ["--vars", json.dumps(settings.dbt_vars)]
    # Source tests become checks on the Python assets they test (raw/*, the predictions).
    translator = Translator(DagsterDbtTranslatorSettings(enable_source_tests_as_checks=True))

    @dbt_assets(
        manifest=DBT_PROJECT.manifest_path,
        project=DBT_PROJECT,
        exclude=f"{REPORTING_SELECTION} {PREDICTIONS_SOURCE}",
        name="dbt_features",
        dagster_dbt_translator=translator,
    )
    def dbt_features(context: dg.AssetExecutionContext, dbt: DbtCliResource):
        """Staging views and the feature tables the model trains and scores on."""
        yield from dbt.cli(["build", *dbt_vars], context=context).stream()

    @dbt_assets(
        manifest=DBT_PROJECT.manifest_path,
        project=DBT_PROJECT,
        select=f"{REPORTING_SELECTION} {PREDICTIONS_SOURCE}",
        name="dbt_reporting",
        dagster_dbt_translator=translator,
    )
    def dbt_reporting(context: dg.AssetExecutionContext, dbt: DbtCliResource):
        """Reporting tables over the predictions: refreshed after new predictions land."""
        yield from dbt.cli(["build", *dbt_vars], context=context).stream()

    return [dbt_features, dbt_reporting]
