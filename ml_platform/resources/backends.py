"""The one place that names both backends of every outside system.

``build_resources`` picks them for a deployment, from its settings; ``open_warehouse``
reopens a warehouse from its ``uri`` inside a pipeline component. Importing this module is
cheap (every backend imports its SDK on first use), and it imports no Dagster at module top,
because pipeline components import it in processes of their own.
"""

from __future__ import annotations

from typing import Any

from ml_platform.resources.artifacts import GcsArtifactStore, LocalArtifactStore
from ml_platform.resources.gcp_credentials import (
    DBT_ACCESS_TOKEN_TARGET,
    dbt_uses_access_token,
    google_credentials,
)
from ml_platform.resources.model_registry import ModelRegistry
from ml_platform.resources.model_registry.local import LocalModelRegistry
from ml_platform.resources.model_registry.vertex import VertexModelRegistry
from ml_platform.resources.pipeline_runs.local import LocalPipelineRunner
from ml_platform.resources.pipeline_runs.vertex import VertexPipelineRunner
from ml_platform.resources.templates.artifact_registry import ArtifactRegistryTemplates
from ml_platform.resources.templates.local import LocalTemplateRegistry
from ml_platform.resources.warehouse import Warehouse, WarehouseError
from ml_platform.resources.warehouse.bigquery import BigQueryWarehouse
from ml_platform.resources.warehouse.duckdb import DuckDBWarehouse
from ml_platform.settings import DBT_EXECUTABLE, DBT_PROJECT_DIR, Settings


def open_warehouse(uri: str) -> Warehouse:
    """Reopen a warehouse from its ``uri`` (what ``Warehouse.uri`` gives): how pipeline
    components reach it."""
    scheme, _, rest = uri.partition("://")
    if scheme == "duckdb" and rest:
        return DuckDBWarehouse(rest)
    if scheme == "bigquery" and rest:
        return BigQueryWarehouse.from_uri(uri)
    raise WarehouseError(
        f"unsupported warehouse uri {uri!r} "
        "(expected duckdb:///path or bigquery://PROJECT?location=LOCATION)"
    )


def dbt_target(settings: Settings) -> str:
    """The profiles.yml target of this deployment's dbt commands: with workload identity
    federation, the BigQuery target that takes the access token the dbt assets mint for each
    command (assets/dbt.py); else the deployment's own."""
    return DBT_ACCESS_TOKEN_TARGET if dbt_uses_access_token(settings) else settings.dbt_target


def model_registry(settings: Settings, credentials: Any = None) -> ModelRegistry:
    """The deployment's model registry: a file under the data folder, or Vertex AI Model
    Registry (one model per deployment: prod's, or a pull request's own)."""
    if settings.is_local:
        return LocalModelRegistry(settings.model_registry_path)
    endpoint = settings.vertex_api_endpoint
    plain_http = endpoint is not None and endpoint.startswith("http://")
    return VertexModelRegistry.from_settings(
        settings, credentials=None if plain_http else credentials
    )


def build_resources(settings: Settings) -> dict[str, Any]:
    """The resources of one deployment: warehouse, pipeline runner, templates, artifacts,
    model registry and dbt (the alert channel is chosen with the alert sensors, in
    ml_platform/alerting.py)."""
    from dagster_dbt import DbtCliResource  # not at module top: pipeline components import us

    dbt = DbtCliResource(
        project_dir=str(DBT_PROJECT_DIR),
        target=dbt_target(settings),
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
            "model_registry": model_registry(settings),
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
            table_expiration=settings.table_expiration,
        ),
        "templates": templates,
        "pipeline_runner": VertexPipelineRunner.from_settings(
            settings, templates, credentials=over_tls(settings.vertex_api_endpoint)
        ),
        "artifacts": GcsArtifactStore(
            settings.pipeline_root, project=settings.gcp_project, credentials=credentials
        ),
        "model_registry": model_registry(settings, credentials),
        "dbt": dbt,
    }
