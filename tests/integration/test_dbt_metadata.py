"""What the UI shows of the dbt assets: row counts on their
materializations, no "(unserializable)" metadata anywhere, and a description on every check.

A real local deployment in a temporary data folder: a week of the raw data is ingested and
the staging and features models are built (real DuckDB, real dbt), in process.
"""

import json

import dagster as dg
import pytest
from dagster._core.remote_representation.external_data import RepositorySnap

from ml_platform.assets.dbt import DBT_PROJECT, describe_test, names_our_tables
from ml_platform.definitions import build_definitions
from ml_platform.resources.warehouse.duckdb import DuckDBWarehouse
from ml_platform.settings import Deployment, Settings

SLICE = {"start_date": "2013-09-01", "end_date": "2013-09-07"}
TABLES = ("features/flight_features", "features/training_data")
VIEWS = ("staging/stg_flights", "staging/stg_weather", "staging/stg_planes")
# Labels the Dagster UI never shows (HIDDEN_METADATA_ENTRY_LABELS in dagster-webserver):
# dagster-dbt needs these objects on its assets and they are unserializable by nature.
HIDDEN_BY_THE_UI = {"dagster_dbt/manifest", "dagster_dbt/dagster_dbt_translator"}


class LocalDeployment:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.defs = build_definitions(settings)
        self.warehouse = DuckDBWarehouse(settings.duckdb_path)

    def sql(self, query: str) -> list[tuple]:
        with self.warehouse.connect(read_only=True) as connection:
            return connection.execute(query).fetchall()

    def table(self, key: str) -> str:
        layer, name = key.split("/")
        return f"{self.settings.dataset(layer)}.{name}"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> LocalDeployment:
    root = tmp_path_factory.mktemp("dbt-metadata")
    return LocalDeployment(
        Settings.from_env(
            {"ML_PLATFORM_DATA_DIR": str(root / "data"), "DAGSTER_HOME": str(root / "home")}
        )
    )


@pytest.fixture(scope="module")
def built(deployment: LocalDeployment) -> dg.ExecuteInProcessResult:
    """The raw data and the staging and features models, with their checks."""
    selection = dg.AssetSelection.groups("ingest") | dg.AssetSelection.groups("staging", "features")
    job = dg.define_asset_job("features", selection=selection)
    defs = dg.Definitions.merge(deployment.defs, dg.Definitions(jobs=[job]))
    result = defs.resolve_job_def("features").execute_in_process(
        run_config={"ops": {"ingest_nycflights13": {"config": SLICE}}},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    return result


def materializations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetMaterialization]:
    return {
        m.asset_key.to_user_string(): m
        for m in result.asset_materializations_for_node("dbt_features")
    }


def test_tables_carry_their_real_row_count(deployment, built):
    events = materializations(built)
    for key in TABLES:
        (count,) = deployment.sql(f"select count(*) from {deployment.table(key)}")[0]
        assert count > 1000
        assert events[key].metadata["dagster/row_count"] == dg.IntMetadataValue(count), key
    # dagster-dbt counts no view's rows: that would run the view's query.
    for key in VIEWS:
        assert "dagster/row_count" not in events[key].metadata


def test_models_carry_their_column_types_and_lineage(deployment, built):
    """The types the warehouse itself reports, and each column's sources, for views and
    tables alike."""
    events = materializations(built)
    for key in (*TABLES, *VIEWS):
        layer, name = key.split("/")
        stored = deployment.sql(
            "select column_name, data_type from information_schema.columns "
            f"where table_schema = '{deployment.settings.dataset(layer)}' "
            f"and table_name = '{name}' order by ordinal_position"
        )
        schema = events[key].metadata["dagster/column_schema"].value
        assert [column.name for column in schema.columns] == [c for c, _ in stored], key
        assert all(column.type for column in schema.columns), key
    # A feature traced to the staging column it comes from, and that to the raw table's.
    lineage = events["features/flight_features"].metadata["dagster/column_lineage"].value
    assert (
        dg.TableColumnDep(dg.AssetKey(["staging", "stg_flights"]), "carrier")
        in (lineage.deps_by_column["carrier"])
    )
    lineage = events["staging/stg_flights"].metadata["dagster/column_lineage"].value
    assert lineage.deps_by_column["air_time"] == [
        dg.TableColumnDep(dg.AssetKey(["raw", "flights"]), "air_time")
    ]


def test_the_step_leaves_the_warehouse_free(deployment, built):
    """The adapter dagster-dbt opened in this process for the fetches let the file go: the
    next step of a run (same process, in-process executor) can write to it."""
    probe = f"{deployment.settings.dataset('staging')}.probe"
    with deployment.warehouse.connect() as connection:
        connection.execute(f"create or replace table {probe} as select 1 as x")
        connection.execute(f"drop table {probe}")


def test_nothing_is_unserializable(deployment, built):
    # What the run recorded: materializations and check results, metadata value by value.
    recorded = [
        e.event_specific_data
        for e in built.all_events
        if e.event_type_value in ("ASSET_MATERIALIZATION", "ASSET_CHECK_EVALUATION")
    ]
    assert len(recorded) > 50
    for data in recorded:
        metadata = getattr(data, "materialization", data).metadata
        for label, value in metadata.items():
            text = dg.serialize_value(value)
            assert dg.deserialize_value(text) == value, label
            assert "(unserializable)" not in text, label
    # What the UI gets of the definitions (the code location's snapshot of its assets).
    snapshot = RepositorySnap.from_def(deployment.defs.get_repository_def())
    dbt_nodes = [n for n in snapshot.asset_nodes if "dagster_dbt/unique_id" in n.metadata]
    assert len(dbt_nodes) > 10
    for node in snapshot.asset_nodes:
        shown = {k: v for k, v in node.metadata.items() if k not in HIDDEN_BY_THE_UI}
        assert "dagster_dbt/project" not in shown
        for label, value in shown.items():
            assert "(unserializable)" not in dg.serialize_value(value), (node.asset_key, label)


def test_every_check_has_a_description(local_settings):
    defs = build_definitions(local_settings)
    specs = [spec for a in defs.resolve_asset_graph().assets_defs for spec in a.check_specs]
    dbt_specs = [spec for spec in specs if "dagster_dbt/unique_id" in spec.metadata]
    assert len(dbt_specs) >= 90
    assert [spec.key for spec in specs if not spec.description] == []
    described = {(s.asset_key.to_user_string(), s.name): s.description for s in dbt_specs}
    flight_features = {
        name: text for (key, name), text in described.items() if key == "features/flight_features"
    }
    assert flight_features["not_null_flight_features_flight_key"] == "not_null on flight_key"
    assert flight_features["accepted_values_flight_features_split__train__test"] == (
        "accepted_values [train, test] on split"
    )
    assert flight_features["value_between_flight_features_month__12__1"] == (
        "value_between 1..12 on month"
    )
    # The singular test (tests/*.sql), described in _features.yml.
    assert flight_features["assert_split_buckets_balanced"].startswith(
        "Every flight's split bucket is in 0..9"
    )
    training = {n: t for (k, n), t in described.items() if k == "features/training_data"}
    assert training["relationships_training_data_flight_key__flight_key__ref_flight_features_"] == (
        "relationships on flight_key to flight_features.flight_key"
    )


def test_a_check_described_in_the_yaml_keeps_its_words():
    test = {
        "name": "assert_split_buckets_balanced",
        "original_file_path": "tests/assert_split_buckets_balanced.sql",
        "description": "Every flight's split bucket\n  agrees with its split.",
    }
    assert describe_test(test) == "Every flight's split bucket agrees with its split."
    assert describe_test({**test, "description": ""}) == (
        "singular test assert_split_buckets_balanced (tests/assert_split_buckets_balanced.sql)"
    )
    combination = {
        "name": "source_unique_combination_of_columns_raw_weather_origin__time_hour",
        "test_metadata": {
            "name": "unique_combination_of_columns",
            "kwargs": {"combination_of_columns": ["origin", "time_hour"], "model": "x"},
        },
    }
    assert describe_test(combination) == "unique_combination_of_columns (origin, time_hour)"
    at_least = {"name": "t", "test_metadata": {"name": "value_between", "kwargs": {
        "column_name": "risk_rank", "min_value": 1, "model": "x"
    }}}  # fmt: skip
    assert describe_test(at_least) == "value_between >= 1 on risk_rank"


def test_no_fetches_through_a_manifest_of_another_deployment(local_settings):
    """The fetches query the relations the manifest names: only this deployment's."""
    manifest = json.loads(DBT_PROJECT.manifest_path.read_text())
    context = dg.build_asset_context()
    assert names_our_tables(manifest, local_settings, context)
    branch = Settings(
        deployment=Deployment.BRANCH,
        pull_request_id="5",
        gcp_project="acme-ml",
        gcs_bucket="acme-ml-artifacts",
        bigquery_location="US",
    )
    assert not names_our_tables(manifest, branch, context)  # DuckDB's, unsuffixed
    # As if parsed for BigQuery in the Google Cloud project acme-ml, with prod's datasets.
    nodes = {
        uid: {**node, "database": "acme-ml"} if node["resource_type"] == "model" else node
        for uid, node in manifest["nodes"].items()
    }
    metadata = {**manifest["metadata"], "adapter_type": "bigquery"}
    on_bigquery = {**manifest, "metadata": metadata, "nodes": nodes}
    assert not names_our_tables(on_bigquery, branch, context)  # not the branch's datasets
    prod = Settings(
        deployment=Deployment.PROD,
        gcp_project="acme-ml",
        gcs_bucket="acme-ml-artifacts",
        bigquery_location="US",
    )
    assert names_our_tables(on_bigquery, prod, context)
    other_project = Settings(
        deployment=Deployment.PROD,
        gcp_project="acme-ml-2",
        gcs_bucket="acme-ml-artifacts",
        bigquery_location="US",
    )
    assert not names_our_tables(on_bigquery, other_project, context)
