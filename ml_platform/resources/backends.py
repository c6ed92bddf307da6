"""Picks the implementation of every interface for a deployment, from its settings."""

from __future__ import annotations

from typing import Any

from dagster_dbt import DbtCliResource

from ml_platform.resources.artifact_registry import ArtifactRegistryTemplates
from ml_platform.resources.artifacts import GcsArtifactStore, LocalArtifactStore
from ml_platform.resources.bigquery_warehouse import BigQueryWarehouse
from ml_platform.resources.google_credentials import (
    DBT_ACCESS_TOKEN_TARGET,
    dbt_uses_access_token,
    google_credentials,
)
from ml_platform.resources.local_pipelines import LocalPipelineRunner
from ml_platform.resources.template_registry import LocalTemplateRegistry
from ml_platform.resources.vertex_pipelines import VertexPipelineRunner
from ml_platform.resources.warehouse import DuckDBWarehouse
from ml_platform.settings import DBT_EXECUTABLE, DBT_PROJECT_DIR, Settings


def build_resources(settings: Settings) -> dict[str, Any]:
    """The resources of one deployment: warehouse, pipeline runner, templates, artifacts and
    dbt (the alert channel is chosen with the alert sensors, in ml_platform/alerting.py)."""
    dbt = DbtCliResource(
        project_dir=str(DBT_PROJECT_DIR),
        # With workload identity federation, the BigQuery target that takes the access token
        # the dbt assets mint for each command (assets/dbt.py); else the deployment's own.
        target=DBT_ACCESS_TOKEN_TARGET if dbt_uses_access_token(settings) else settings.dbt_target,
        dbt_executable=str(DBT_EXECUTABLE),
    )
    if settings.is_local:
        templates = LocalTemplateRegistry(settings.template_dir)
        return {
            "warehouse": DuckDBWarehouse(settings.duckdb_path),
            "templates": templates,
            "pipeline_runner": LocalPipelineRunner(
                settings.job_store_path, settings.pipeline_root, templates
            ),
            "artifacts": LocalArtifactStore(settings.pipeline_root),
            "dbt": dbt,
        }
    # Branch and prod: Google Cloud. Nothing here calls Google; clients are made on first use.
    # One credentials object for every client (None: Application Default Credentials), so
    # the process exchanges tokens once and google-auth refreshes them in one place.
    credentials = google_credentials(settings)

    def over_tls(endpoint: str | None) -> Any:
        # A plain-HTTP endpoint is a local stand-in: no real token travels unencrypted. With
        # None the warehouse and runner go anonymous there.
        return None if endpoint and endpoint.startswith("http://") else credentials

    templates = ArtifactRegistryTemplates(settings.artifact_registry_url, auth=credentials)
    return {
        "warehouse": BigQueryWarehouse(
            settings.gcp_project,
            settings.bigquery_location,
            api_endpoint=settings.bigquery_api_endpoint,
            credentials=over_tls(settings.bigquery_api_endpoint),
        ),
        "templates": templates,
        "pipeline_runner": VertexPipelineRunner.from_settings(
            settings, templates, credentials=over_tls(settings.vertex_api_endpoint)
        ),
        "artifacts": GcsArtifactStore(
            settings.pipeline_root, project=settings.gcp_project, credentials=credentials
        ),
        "dbt": dbt,
    }
