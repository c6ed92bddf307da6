"""The dbt project as Dagster assets: staging + features before the model, reporting after
the predictions. dbt tests become asset checks; dbt sources map to the Python assets."""

import json
from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliResource,
    DbtProject,
    dbt_assets,
)

from ml_platform.settings import DBT_PROJECT_DIR, Settings

# Parsed for the local target: the manifest only names models and their dependencies,
# which are the same for every target. `dagster dev` re-parses on load; elsewhere the
# manifest is prepared ahead (`make prepare`, the image build).
DBT_PROJECT = DbtProject(project_dir=DBT_PROJECT_DIR, target="local")
DBT_PROJECT.prepare_if_dev()

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
