"""The warehouse: one small interface, a DuckDB implementation here, BigQuery beside it.

Assets talk to it through Dagster, and Kubeflow components reopen the same warehouse from
its ``uri`` (a component runs in another process, on Vertex AI in another machine), so
this module imports no Dagster and nothing heavy at module top.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import duckdb
    import pandas as pd
    import pyarrow as pa

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class WarehouseError(RuntimeError):
    """A warehouse operation failed; the message names the table and what was wrong."""


def check_identifier(*names: str) -> None:
    """Dataset, table and column names are interpolated into SQL, so only plain names pass."""
    for name in names:
        if not _IDENTIFIER.fullmatch(name):
            raise WarehouseError(f"not a plain SQL identifier: {name!r}")


class Warehouse(ABC):
    """What the platform needs from a warehouse, and nothing more."""

    @property
    @abstractmethod
    def uri(self) -> str:
        """A string a pipeline component can reopen the warehouse from (see ``open_warehouse``)."""

    @abstractmethod
    def replace_table(self, dataset: str, table: str, data: pa.Table) -> int:
        """Atomically replace a whole table with ``data``; returns the row count."""

    @abstractmethod
    def replace_partition(
        self, dataset: str, table: str, column: str, value: date, data: pa.Table
    ) -> int:
        """Atomically replace the rows where ``column = value`` with ``data``.

        Every row of ``data`` must carry that value, so re-running a day never duplicates
        rows and never touches another day. Returns the number of rows written.
        """

    @abstractmethod
    def read_table(
        self,
        dataset: str,
        table: str,
        *,
        date_column: str | None = None,
        start: date | None = None,
        end: date | None = None,
    ) -> pd.DataFrame:
        """Read a table, optionally only rows with ``start <= date_column < end``."""

    @abstractmethod
    def row_count(
        self, dataset: str, table: str, *, column: str | None = None, value: Any = None
    ) -> int:
        """Rows in a table (where ``column = value`` when given); 0 if it does not exist."""

    @abstractmethod
    def table_exists(self, dataset: str, table: str) -> bool: ...

    @abstractmethod
    def drop_dataset(self, dataset: str) -> bool:
        """Drop a dataset and everything in it; False if there was none (a closed pull
        request's datasets are dropped this way)."""

    @abstractmethod
    def wait_until_writable(self) -> None:
        """Return once this process could start writing; called before dbt, which opens the
        warehouse itself and does not wait for other writers."""


def _check_partition(data: pa.Table, table: str, column: str, value: date) -> None:
    if column not in data.column_names:
        raise WarehouseError(f"rows for {table} have no partition column {column!r}")
    others = {v for v in data.column(column).to_pylist() if v != value}
    if others:
        shown = ", ".join(sorted(str(v) for v in others)[:3])
        raise WarehouseError(
            f"rows for {table} partition {column}={value} carry other values ({shown}); "
            "refusing to write them into this partition"
        )


class DuckDBWarehouse(Warehouse):
    """A DuckDB file. DuckDB lets one process write at a time, so opening waits for the lock."""

    def __init__(self, path: str | Path, *, lock_timeout: float = 120.0) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout

    @property
    def uri(self) -> str:
        return f"duckdb://{self.path.resolve()}"

    @contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        import duckdb

        if read_only and not self.path.exists():
            raise WarehouseError(f"the warehouse {self.path} does not exist yet (run the ingest)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.05
        while True:
            try:
                connection = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.IOException as error:
                # Another process (dbt, a pipeline component) holds the file: wait our turn.
                if "lock" not in str(error).lower() or time.monotonic() > deadline:
                    raise WarehouseError(f"cannot open {self.path}: {error}") from error
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        try:
            yield connection
        finally:
            connection.close()

    def wait_until_writable(self) -> None:
        # dbt-duckdb fails at once when another process (a pipeline component started from
        # the CLI, say) holds the file: wait here for it to let go, then hand over to dbt.
        # Another writer could still slip in between, but it would have to start within
        # the few milliseconds dbt takes to open the file.
        with self.connect():
            pass

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.connect() as connection:
            connection.execute("BEGIN TRANSACTION")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def replace_table(self, dataset: str, table: str, data: pa.Table) -> int:
        check_identifier(dataset, table)
        with self._transaction() as connection:
            connection.execute(f"CREATE SCHEMA IF NOT EXISTS {dataset}")
            connection.register("incoming", data)
            connection.execute(
                f"CREATE OR REPLACE TABLE {dataset}.{table} AS SELECT * FROM incoming"
            )
            connection.unregister("incoming")
        return data.num_rows

    def replace_partition(
        self, dataset: str, table: str, column: str, value: date, data: pa.Table
    ) -> int:
        check_identifier(dataset, table, column)
        _check_partition(data, f"{dataset}.{table}", column, value)
        with self._transaction() as connection:
            connection.execute(f"CREATE SCHEMA IF NOT EXISTS {dataset}")
            connection.register("incoming", data)
            connection.execute(
                f"CREATE TABLE IF NOT EXISTS {dataset}.{table} AS SELECT * FROM incoming LIMIT 0"
            )
            connection.execute(f"DELETE FROM {dataset}.{table} WHERE {column} = ?", [value])
            try:
                connection.execute(f"INSERT INTO {dataset}.{table} BY NAME SELECT * FROM incoming")
            except Exception as error:
                raise WarehouseError(
                    f"rows do not fit {dataset}.{table} (columns {data.column_names}): {error}"
                ) from error
            connection.unregister("incoming")
        return data.num_rows

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
        conditions, parameters = [], []
        if date_column is not None:
            check_identifier(date_column)
            if start is not None:
                conditions.append(f"{date_column} >= ?")
                parameters.append(start)
            if end is not None:
                conditions.append(f"{date_column} < ?")
                parameters.append(end)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        with self.connect(read_only=True) as connection:
            if not self._exists(connection, dataset, table):
                raise WarehouseError(f"table {dataset}.{table} does not exist in {self.path}")
            return connection.execute(
                f"SELECT * FROM {dataset}.{table}{where}", parameters
            ).fetch_df()

    def row_count(
        self, dataset: str, table: str, *, column: str | None = None, value: Any = None
    ) -> int:
        check_identifier(dataset, table)
        if not self.path.exists():
            return 0
        with self.connect(read_only=True) as connection:
            if not self._exists(connection, dataset, table):
                return 0
            if column is None:
                return connection.execute(f"SELECT count(*) FROM {dataset}.{table}").fetchone()[0]
            check_identifier(column)
            return connection.execute(
                f"SELECT count(*) FROM {dataset}.{table} WHERE {column} = ?", [value]
            ).fetchone()[0]

    def table_exists(self, dataset: str, table: str) -> bool:
        if not self.path.exists():
            return False
        with self.connect(read_only=True) as connection:
            return self._exists(connection, dataset, table)

    def drop_dataset(self, dataset: str) -> bool:
        check_identifier(dataset)
        if not self.path.exists():
            return False
        with self._transaction() as connection:
            found = connection.execute(
                "SELECT count(*) FROM information_schema.schemata WHERE schema_name = ?",
                [dataset],
            ).fetchone()[0]
            connection.execute(f"DROP SCHEMA IF EXISTS {dataset} CASCADE")
        return found > 0

    @staticmethod
    def _exists(connection: duckdb.DuckDBPyConnection, dataset: str, table: str) -> bool:
        found = connection.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = ? AND table_name = ?",
            [dataset, table],
        ).fetchone()[0]
        return found > 0


def open_warehouse(uri: str) -> Warehouse:
    """Reopen a warehouse from its ``uri``: how pipeline components reach it."""
    scheme, _, rest = uri.partition("://")
    if scheme == "duckdb" and rest:
        return DuckDBWarehouse(rest)
    if scheme == "bigquery" and rest:
        # Imported here: the BigQuery module is only needed by BigQuery deployments.
        from ml_platform.resources.bigquery_warehouse import BigQueryWarehouse

        return BigQueryWarehouse.from_uri(uri)
    raise WarehouseError(
        f"unsupported warehouse uri {uri!r} "
        "(expected duckdb:///path or bigquery://PROJECT?location=LOCATION)"
    )
