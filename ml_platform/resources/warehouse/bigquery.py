"""The warehouse on BigQuery, through the official ``google-cloud-bigquery`` client.

The code location imports this module (and Kubeflow components reopen it from its
``uri``), so nothing heavy is imported at module top: the Google client, pyarrow and pandas
are imported inside the methods that use them.

How each operation stays atomic on BigQuery:

- ``replace_table``: one load job with ``WRITE_TRUNCATE``. A load job commits all of its
  rows and the new schema at once or nothing, so readers see the old table or the new one.
- ``replace_partition``: the rows are loaded into a fresh staging table, then one
  multi-statement transaction deletes the day and inserts the staged rows; a failure
  anywhere rolls the whole transaction back. The table is created partitioned by the day
  column, so the DELETE drops one partition. BigQuery cancels one of two transactions that
  mutate the same table at once ("Transaction is aborted due to concurrent update"), as a
  backfill of several days can do; the transaction is then retried, which is safe because
  it is idempotent (delete the day, insert the same rows).

  A load job with ``WRITE_TRUNCATE`` into the partition decorator ``table$YYYYMMDD`` would
  avoid that contention, but the emulator the tests run against (bqemulator) cannot
  address a partition, so it could not be tested on the wire; the transaction can.

Every API call gets a bounded retry (google-api-core's, as everywhere: ``retries.py``; for
API calls the client's own ``DEFAULT_RETRY`` predicate: 429, 403 ``rateLimitExceeded``, 5xx,
connection errors) with exponential backoff and a deadline,
and a per-request timeout: the client's default retries a 500 for 600 s, and some servers
(the emulator on SQL it does not support) answer 500 for errors that never go away.
"""

from __future__ import annotations

import io
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from ml_platform.resources.retries import Backoff, is_transient
from ml_platform.resources.warehouse import (
    Warehouse,
    WarehouseError,
    check_identifier,
    check_partition,
)

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from google.api_core.retry import Retry
    from google.cloud import bigquery

_log = logging.getLogger(__name__)

# Project ids: lowercase letters, digits and hyphens (older ones carry a "domain.com:"
# prefix). They are interpolated into SQL between backticks, so nothing else passes.
_PROJECT = re.compile(r"^[a-z][a-z0-9.:-]*[a-z0-9]$")

# Job failures worth submitting the same job again for: BigQuery's transient reasons.
_TRANSIENT_JOB_REASONS = frozenset(
    {
        "backendError",
        "internalError",
        "rateLimitExceeded",
        "jobBackendError",
        "jobInternalError",
        "jobRateLimitExceeded",
    }
)
# What BigQuery says when it cancels a transaction (or serialises a DML statement) because
# another one mutated the same table at the same time.
_CONCURRENT_UPDATE = re.compile(
    r"aborted due to concurrent update|could not serialize access", re.IGNORECASE
)

# A staging table outlives a crashed writer by at most this long.
_STAGING_EXPIRY = timedelta(days=1)


class BigQueryWarehouse(Warehouse):
    """Datasets of one Google Cloud project, in one location.

    ``credentials`` default to Application Default Credentials (on Vertex AI: the job's
    service account); on the ECS agent, backends.py passes the workload identity federation
    credentials of resources/gcp_credentials.py. An ``api_endpoint`` over plain
    ``http://`` is a local emulator: no credentials are sent there (anonymous), since a real
    token must never travel unencrypted.

    ``retry_deadline`` bounds the retries of each API call and of each job (seconds);
    ``request_timeout`` bounds one HTTP request; ``job_timeout`` bounds the wait for one
    job to finish.
    """

    def __init__(
        self,
        project: str,
        location: str,
        *,
        api_endpoint: str | None = None,
        credentials: Any = None,
        retry_deadline: float = 120.0,
        request_timeout: float = 60.0,
        job_timeout: float = 1800.0,
        table_expiration: timedelta | None = None,
    ) -> None:
        if not project or not _PROJECT.fullmatch(project):
            raise WarehouseError(f"not a Google Cloud project id: {project!r}")
        if not location or not re.fullmatch(r"[A-Za-z0-9-]+", location):
            raise WarehouseError(f"not a BigQuery location: {location!r}")
        self.project = project
        self.location = location
        self.api_endpoint = api_endpoint.rstrip("/") if api_endpoint else None
        self.retry_deadline = retry_deadline
        self.request_timeout = request_timeout
        self.job_timeout = job_timeout
        # A pull request's datasets: every table made in a dataset this warehouse creates
        # expires this long after it was (re)written, so an abandoned PR's data goes away.
        self.table_expiration = table_expiration
        self._credentials = credentials
        self._client_instance: bigquery.Client | None = None

    # -- identity ----------------------------------------------------------------------

    @property
    def uri(self) -> str:
        query = {"location": self.location}
        if self.api_endpoint:
            query["api_endpoint"] = self.api_endpoint
        if self.table_expiration is not None:
            query["table_expiration_days"] = f"{self.table_expiration.total_seconds() / 86400:g}"
        return f"bigquery://{self.project}?{urlencode(query)}"

    @classmethod
    def from_uri(cls, uri: str) -> BigQueryWarehouse:
        """``bigquery://PROJECT?location=US[&api_endpoint=URL]`` (what ``uri`` gives)."""
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(uri)
        query = parse_qs(parts.query, keep_blank_values=False)
        unknown = set(query) - {"location", "api_endpoint", "table_expiration_days"}
        if parts.scheme != "bigquery" or not parts.netloc or parts.path not in ("", "/"):
            raise WarehouseError(
                f"not a BigQuery warehouse uri: {uri!r} "
                "(expected bigquery://PROJECT?location=LOCATION[&api_endpoint=URL])"
            )
        if unknown or "location" not in query:
            raise WarehouseError(
                f"BigQuery warehouse uri {uri!r} needs location= and takes only "
                f"location, api_endpoint and table_expiration_days (got {sorted(query)})"
            )
        endpoint = query.get("api_endpoint", [None])[0]
        days = query.get("table_expiration_days", [None])[0]
        expiration = timedelta(days=float(days)) if days else None
        return cls(
            parts.netloc, query["location"][0], api_endpoint=endpoint, table_expiration=expiration
        )

    def __repr__(self) -> str:
        return f"BigQueryWarehouse({self.uri!r})"

    # -- the client and its retries --------------------------------------------------------

    def _client(self) -> bigquery.Client:
        if self._client_instance is None:
            from google.api_core.client_options import ClientOptions
            from google.auth.exceptions import DefaultCredentialsError
            from google.cloud import bigquery

            credentials = self._credentials
            if credentials is None and (self.api_endpoint or "").startswith("http://"):
                from google.auth.credentials import AnonymousCredentials

                credentials = AnonymousCredentials()
            options = ClientOptions(api_endpoint=self.api_endpoint) if self.api_endpoint else None
            try:
                self._client_instance = bigquery.Client(
                    project=self.project,
                    credentials=credentials,
                    location=self.location,
                    client_options=options,
                )
            except DefaultCredentialsError as error:
                raise WarehouseError(
                    f"no Google credentials for BigQuery project {self.project}: {error} "
                    "(Application Default Credentials: set GOOGLE_APPLICATION_CREDENTIALS, "
                    "or run where a service account is attached)"
                ) from error
        return self._client_instance

    def _api_retry(self) -> Retry:
        """The client's own retry predicate (it knows BigQuery's transient error reasons,
        such as a 403 ``rateLimitExceeded``), with backoff and our deadline."""
        from google.cloud.bigquery.retry import DEFAULT_RETRY

        return DEFAULT_RETRY.with_delay(initial=0.5, maximum=16.0, multiplier=2.0).with_timeout(
            self.retry_deadline
        )

    def _job_retry(self, *, concurrent_updates: bool = False) -> Retry:
        """Resubmit a whole job (a load with its upload, or a query) that failed transiently.

        Transient: a job failure with one of BigQuery's transient reasons, or a retryable
        answer (``retries.RETRYABLE_STATUS``) or connection error outside the API calls' own
        retries (the upload). Not a RetryError: that call already retried for the whole
        deadline. With ``concurrent_updates``, also a transaction BigQuery cancelled for a
        concurrent update of the same table. Only used around idempotent operations, so a
        job that did run before its answer was lost can run again without changing the
        outcome. Bounded: about twice ``retry_deadline`` in all (an attempt started before
        the deadline still has its own).
        """
        from google.api_core import exceptions

        def predicate(error: Exception) -> bool:
            if isinstance(error, exceptions.RetryError):
                return False
            reasons = {e.get("reason") for e in getattr(error, "errors", None) or []}
            if reasons & _TRANSIENT_JOB_REASONS or is_transient(error):
                return True
            return concurrent_updates and bool(_CONCURRENT_UPDATE.search(str(error)))

        return Backoff(initial=1.0, maximum=16.0, deadline=self.retry_deadline).retry(predicate)

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn the client's exceptions into a WarehouseError that says what failed."""
        from concurrent.futures import TimeoutError as FutureTimeout

        from google.api_core.exceptions import GoogleAPICallError, RetryError
        from google.auth.exceptions import GoogleAuthError

        try:
            yield
        except WarehouseError:
            raise
        except RetryError as error:
            cause = error.cause if error.cause is not None else error
            raise WarehouseError(
                f"{action} failed: BigQuery kept failing for {self.retry_deadline:.0f} s "
                f"of retries: {_describe(cause)}"
            ) from error
        except FutureTimeout as error:
            raise WarehouseError(
                f"{action} failed: the job did not finish within {self.job_timeout:.0f} s"
            ) from error
        except (GoogleAPICallError, GoogleAuthError, OSError) as error:
            raise WarehouseError(f"{action} failed: {_describe(error)}") from error

    # -- small helpers -----------------------------------------------------------------

    def _table_id(self, dataset: str, table: str) -> str:
        return f"{self.project}.{dataset}.{table}"

    def _sql_table(self, dataset: str, table: str) -> str:
        return f"`{self.project}.{dataset}.{table}`"

    def _get_table(self, dataset: str, table: str) -> bigquery.Table | None:
        from google.api_core.exceptions import NotFound

        try:
            return self._client().get_table(
                self._table_id(dataset, table),
                retry=self._api_retry(),
                timeout=self.request_timeout,
            )
        except NotFound:
            return None

    def _ensure_dataset(self, dataset: str) -> None:
        """Create the dataset in this warehouse's location, or check the existing one's."""
        from google.api_core.exceptions import NotFound
        from google.cloud import bigquery

        client = self._client()
        dataset_id = f"{self.project}.{dataset}"
        try:
            existing = client.get_dataset(
                dataset_id, retry=self._api_retry(), timeout=self.request_timeout
            )
        except NotFound:
            new = bigquery.Dataset(dataset_id)
            new.location = self.location
            if self.table_expiration is not None:
                new.default_table_expiration_ms = int(self.table_expiration.total_seconds() * 1000)
            # exists_ok: another writer may create it between our get and our insert.
            existing = client.create_dataset(
                new, exists_ok=True, retry=self._api_retry(), timeout=self.request_timeout
            )
        if existing.location and existing.location.lower() != self.location.lower():
            # A job runs in one location; tables in another cannot be written from here.
            raise WarehouseError(
                f"dataset {dataset} is in location {existing.location}, but this warehouse "
                f"works in {self.location}"
            )

    def _query(
        self, sql: str, parameters: list[Any] | None = None, *, concurrent_updates: bool = False
    ) -> bigquery.table.RowIterator:
        """Run one query job and wait for it, with bounded retries everywhere.

        Always ``jobs.insert`` + ``getQueryResults`` (``client.query``), never
        ``query_and_wait``'s ``jobs.query``: the emulator answers a failed ``jobs.query``
        with HTTP 200 and the error in the body, which the client takes for an empty result.
        The client's own ``job_retry`` is off (``None``): with it, the client wraps
        ``jobs.insert`` in a private retry of 600 s; ``_job_retry`` resubmits instead.
        """
        from google.cloud import bigquery

        config = bigquery.QueryJobConfig(query_parameters=parameters or [])

        def run() -> bigquery.table.RowIterator:
            job = self._client().query(
                sql,
                job_config=config,
                retry=self._api_retry(),
                timeout=self.request_timeout,
                job_retry=None,
            )
            return job.result(retry=self._api_retry(), timeout=self.job_timeout, job_retry=None)

        return self._job_retry(concurrent_updates=concurrent_updates)(run)()

    def _load(
        self,
        data: pa.Table,
        schema: list[bigquery.SchemaField],
        table_id: str,
        write_disposition: str,
    ) -> None:
        """Upload ``data`` as Parquet and load it with one load job, retried if transient."""
        from google.cloud import bigquery

        payload = _to_parquet(data, table_id)
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            schema=schema,
            write_disposition=write_disposition,
            create_disposition=bigquery.CreateDisposition.CREATE_IF_NEEDED,
        )

        def load_once() -> None:
            # No `size`: the client then uses a resumable upload (a multipart one is only
            # for known small sizes, and the emulator rejects its `*/*` media part). Upload
            # retries are left to the job retry around this function, so there is one
            # bounded retry policy and not two multiplied.
            job = self._client().load_table_from_file(
                io.BytesIO(payload),
                table_id,
                num_retries=0,
                job_config=config,
                timeout=self.request_timeout,
            )
            job.result(retry=self._api_retry(), timeout=self.job_timeout)

        self._job_retry()(load_once)()

    # -- the interface -----------------------------------------------------------------

    def replace_table(self, dataset: str, table: str, data: pa.Table) -> int:
        check_identifier(dataset, table)
        where = f"{dataset}.{table}"
        schema = bigquery_schema(data.schema, where)
        with self._errors(f"replacing {where} with {data.num_rows} rows"):
            self._ensure_dataset(dataset)
            if data.num_rows == 0:
                # An empty Parquet upload is not a dependable load source; an empty table
                # with the same columns is one atomic DDL statement.
                columns = ", ".join(f"{f.name} {f.field_type}" for f in schema)
                self._query(
                    f"CREATE OR REPLACE TABLE {self._sql_table(dataset, table)} ({columns})"
                )
            else:
                self._load(data, schema, self._table_id(dataset, table), "WRITE_TRUNCATE")
        return data.num_rows

    def replace_partition(
        self, dataset: str, table: str, column: str, value: date, data: pa.Table
    ) -> int:
        check_identifier(dataset, table, column)
        where = f"{dataset}.{table}"
        if not isinstance(value, date) or isinstance(value, datetime):
            raise WarehouseError(f"partition value for {where} must be a date, got {value!r}")
        # Refused before anything is written: rows of another day, or without the column.
        check_partition(data, where, column, value)
        schema = bigquery_schema(data.schema, where)
        column_type = next(f.field_type for f in schema if f.name == column)
        if column_type != "DATE":
            raise WarehouseError(
                f"partition column {where}.{column} must be a DATE, the rows carry {column_type}"
            )
        with self._errors(f"replacing {where} partition {column}={value}"):
            self._ensure_dataset(dataset)
            self._ensure_partitioned_table(dataset, table, column, schema)
            target = self._sql_table(dataset, table)
            # A date's isoformat is digits and dashes only: safe as a literal. (A query
            # parameter would do on BigQuery; the emulator does not bind parameters in scripts.)
            day = f"DATE '{value.isoformat()}'"
            if data.num_rows == 0:
                # One DML statement is atomic by itself; there is nothing to insert.
                self._query(
                    f"DELETE FROM {target} WHERE {column} = {day}",
                    concurrent_updates=True,
                )
                return 0
            staged: list[str] = []
            try:
                staging = self._stage(dataset, table, data, schema, staged)
                columns = ", ".join(f.name for f in schema)
                script = (
                    "BEGIN TRANSACTION;\n"
                    f"DELETE FROM {target} WHERE {column} = {day};\n"
                    f"INSERT INTO {target} ({columns})\n"
                    f"  SELECT {columns} FROM {self._sql_table(dataset, staging)};\n"
                    "COMMIT TRANSACTION;"
                )
                self._query(script, concurrent_updates=True)
            finally:
                for name in staged:
                    self._drop_staging(dataset, name)
        return data.num_rows

    def _ensure_partitioned_table(
        self, dataset: str, table: str, column: str, schema: list[bigquery.SchemaField]
    ) -> None:
        """Create the table partitioned by day on ``column``, or check the existing one fits."""
        from google.cloud import bigquery

        where = f"{dataset}.{table}"
        existing = self._get_table(dataset, table)
        if existing is None:
            new = bigquery.Table(self._table_id(dataset, table), schema=schema)
            new.time_partitioning = bigquery.TimePartitioning(
                type_=bigquery.TimePartitioningType.DAY, field=column
            )
            self._client().create_table(
                new, exists_ok=True, retry=self._api_retry(), timeout=self.request_timeout
            )
            return
        have = {f.name: f.field_type for f in existing.schema}
        missing = [f.name for f in schema if f.name not in have]
        if missing:
            raise WarehouseError(
                f"rows do not fit {where}: it has no columns {missing} "
                f"(it has {sorted(have)}); nothing was written"
            )

    def _stage(
        self,
        dataset: str,
        table: str,
        data: pa.Table,
        schema: list[bigquery.SchemaField],
        staged: list[str],
    ) -> str:
        """Load ``data`` into a new, empty staging table; returns its name.

        ``WRITE_EMPTY``: a retried load can never add the rows twice (if a load ran but its
        answer was lost, the retry fails instead). The table expires on its own if this
        process dies before dropping it.
        """
        from google.cloud import bigquery

        name = f"{table}__staging_{uuid.uuid4().hex[:16]}"
        staged.append(name)
        staging = bigquery.Table(self._table_id(dataset, name), schema=schema)
        staging.expires = datetime.now(UTC) + _STAGING_EXPIRY
        self._client().create_table(staging, retry=self._api_retry(), timeout=self.request_timeout)
        self._load(data, schema, self._table_id(dataset, name), "WRITE_EMPTY")
        return name

    def _drop_staging(self, dataset: str, name: str) -> None:
        from google.api_core.exceptions import GoogleAPICallError, RetryError

        try:
            self._client().delete_table(
                self._table_id(dataset, name),
                not_found_ok=True,
                retry=self._api_retry(),
                timeout=self.request_timeout,
            )
        except (GoogleAPICallError, RetryError, OSError) as error:
            # Never hide the outcome of the write for a cleanup: the table expires anyway.
            _log.warning("could not drop staging table %s.%s: %s", dataset, name, error)

    def read_table(
        self,
        dataset: str,
        table: str,
        *,
        date_column: str | None = None,
        start: date | None = None,
        end: date | None = None,
    ) -> pd.DataFrame:
        check_identifier(dataset, table)
        where = f"{dataset}.{table}"
        with self._errors(f"reading {where}"):
            existing = self._get_table(dataset, table)
            if existing is None:
                raise WarehouseError(
                    f"table {where} does not exist in BigQuery project {self.project}"
                )
            conditions: list[str] = []
            parameters: list[Any] = []
            if date_column is not None and (start is not None or end is not None):
                check_identifier(date_column)
                types = {f.name: f.field_type for f in existing.schema}
                if date_column not in types:
                    raise WarehouseError(
                        f"{where} has no column {date_column!r} (has {sorted(types)})"
                    )
                for name, bound, operator in (("start", start, ">="), ("end", end, "<")):
                    if bound is not None:
                        conditions.append(f"{date_column} {operator} @{name}")
                        parameters.append(_date_parameter(name, bound, types[date_column], where))
            sql = f"SELECT * FROM {self._sql_table(dataset, table)}"
            if conditions:
                sql += " WHERE " + " AND ".join(conditions)
            rows = self._query(sql, parameters).to_arrow(create_bqstorage_client=False)
        return _to_pandas(rows)

    def row_count(
        self, dataset: str, table: str, *, column: str | None = None, value: Any = None
    ) -> int:
        check_identifier(dataset, table)
        where = f"{dataset}.{table}"
        with self._errors(f"counting rows of {where}"):
            if self._get_table(dataset, table) is None:
                return 0
            sql = f"SELECT COUNT(*) AS n FROM {self._sql_table(dataset, table)}"
            parameters = []
            if column is not None:
                check_identifier(column)
                sql += f" WHERE {column} = @value"
                parameters.append(_scalar_parameter("value", value, where))
            rows = list(self._query(sql, parameters))
        return int(rows[0][0])

    def table_exists(self, dataset: str, table: str) -> bool:
        check_identifier(dataset, table)
        with self._errors(f"looking up {dataset}.{table}"):
            return self._get_table(dataset, table) is not None

    def ensure_datasets(self, datasets: Iterable[str]) -> None:
        for dataset in datasets:
            check_identifier(dataset)
            with self._errors(f"creating dataset {dataset}"):
                self._ensure_dataset(dataset)

    @contextmanager
    def writer_turn(self, purpose: str) -> Iterator[None]:
        # BigQuery takes any number of writers at once; conflicting DML is retried where it
        # happens (replace_partition).
        yield

    def drop_dataset(self, dataset: str) -> bool:
        from google.api_core.exceptions import NotFound

        check_identifier(dataset)
        client = self._client()
        with self._errors(f"dropping dataset {dataset}"):
            try:
                client.get_dataset(
                    f"{self.project}.{dataset}",
                    retry=self._api_retry(),
                    timeout=self.request_timeout,
                )
            except NotFound:
                return False
            client.delete_dataset(
                f"{self.project}.{dataset}",
                delete_contents=True,
                not_found_ok=True,
                retry=self._api_retry(),
                timeout=self.request_timeout,
            )
        return True


# -- conversions -----------------------------------------------------------------------


def bigquery_schema(schema: pa.Schema, where: str) -> list[bigquery.SchemaField]:
    """The BigQuery columns for an Arrow schema; an unsupported type names its column.

    Naive timestamps are DATETIME (the raw data's UTC hours, like DuckDB's TIMESTAMP),
    timestamps with a time zone are TIMESTAMP. Every column is NULLABLE.
    """
    import pyarrow as pa
    from google.cloud import bigquery

    def bq_type(arrow_type: pa.DataType) -> str | None:
        if pa.types.is_dictionary(arrow_type):
            return bq_type(arrow_type.value_type)
        checks: list[tuple[Callable[[pa.DataType], bool], str]] = [
            (pa.types.is_boolean, "BOOL"),
            (pa.types.is_integer, "INT64"),
            (pa.types.is_floating, "FLOAT64"),
            (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "STRING"),
            (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "BYTES"),
            (pa.types.is_date, "DATE"),
            (pa.types.is_time, "TIME"),
            (pa.types.is_decimal, "NUMERIC"),
        ]
        if pa.types.is_timestamp(arrow_type):
            return "TIMESTAMP" if arrow_type.tz else "DATETIME"
        if pa.types.is_decimal(arrow_type) and (arrow_type.precision > 38 or arrow_type.scale > 9):
            return "BIGNUMERIC"
        return next((name for check, name in checks if check(arrow_type)), None)

    fields = []
    for field in schema:
        check_identifier(field.name)
        field_type = bq_type(field.type)
        if field_type is None:
            raise WarehouseError(
                f"column {where}.{field.name} has type {field.type}, which this warehouse "
                "does not map to BigQuery"
            )
        fields.append(bigquery.SchemaField(field.name, field_type, mode="NULLABLE"))
    return fields


def _to_parquet(data: pa.Table, table_id: str) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    try:
        # BigQuery keeps microseconds; refuse to drop finer digits silently.
        pq.write_table(data, buffer, coerce_timestamps="us", allow_truncated_timestamps=False)
    except (pa.ArrowException, ValueError) as error:
        raise WarehouseError(
            f"rows for {table_id} cannot be written as Parquet: {error}"
        ) from error
    return buffer.getvalue()


def _to_pandas(rows: pa.Table) -> pd.DataFrame:
    """The same dtypes DuckDB's ``fetch_df`` gives: dates as datetime64, nullable ints."""
    import pandas as pd
    import pyarrow as pa

    mapping = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}
    return rows.to_pandas(date_as_object=False, types_mapper=mapping.get)


def _date_parameter(name: str, bound: date, column_type: str, where: str) -> Any:
    """A bound of a date range, typed like the column it is compared with."""
    from google.cloud import bigquery

    midnight = datetime.combine(bound, time())
    if column_type == "DATE":
        return bigquery.ScalarQueryParameter(name, "DATE", bound)
    if column_type == "DATETIME":
        return bigquery.ScalarQueryParameter(name, "DATETIME", midnight)
    if column_type == "TIMESTAMP":
        return bigquery.ScalarQueryParameter(name, "TIMESTAMP", midnight.replace(tzinfo=UTC))
    raise WarehouseError(f"cannot filter {where} by date: the column is {column_type}")


def _scalar_parameter(name: str, value: Any, where: str) -> Any:
    from google.cloud import bigquery

    # bool before int (bool is an int), datetime before date (a datetime is a date).
    if isinstance(value, bool):
        kind = "BOOL"
    elif isinstance(value, int):
        kind = "INT64"
    elif isinstance(value, float):
        kind = "FLOAT64"
    elif isinstance(value, str):
        kind = "STRING"
    elif isinstance(value, datetime):
        kind = "TIMESTAMP" if value.tzinfo else "DATETIME"
    elif isinstance(value, date):
        kind = "DATE"
    else:
        raise WarehouseError(f"cannot compare a column of {where} with {value!r}")
    return bigquery.ScalarQueryParameter(name, kind, value)


def _describe(error: BaseException) -> str:
    """One line: the status, BigQuery's message and the job id when there is one."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__
